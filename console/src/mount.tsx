/**
 * A Toru plugin's UI, mounted as Toru's frontend mounted it: the plugin's `bundle.js`
 * (fetched through the API from the plugin's own routes) runs as a script in this page;
 * it registers `window.ToruPlugins[<id>]` (or `window.toru_plugin_<id>`) with
 * `mount(container, api)` and `unmount(container)`. What `api` offers, and what a plugin
 * UI can and cannot do, is in docs/SECURITY.md ("Plugin UIs in the console").
 */
import { useEffect, useRef, useState } from "react";
import type { Session } from "./api";
import { describe } from "./api";
import { navigate, toast, useTitle } from "./ui";

/** What a bundle gets as `api`. */
export interface PluginApi {
  fetch(path: string, init?: RequestInit): Promise<Response>;
  kv: {
    get(key: string): Promise<string | null>;
    set(key: string, value: string): Promise<void>;
    delete(key: string): Promise<boolean>;
  };
  navigate(path: string): void;
  showToast(message: string, type?: "success" | "error" | "info"): void;
}

interface Registered {
  mount(container: HTMLElement, api: PluginApi): void;
  unmount(container: HTMLElement): void;
}

declare global {
  interface Window {
    ToruPlugins?: Record<string, Partial<Registered> | undefined>;
    [name: `toru_plugin_${string}`]: Partial<Registered> | undefined;
  }
}

/** Statuses a `Response` cannot be built with (the Fetch standard allows 200 to 599). */
const validStatus = (s: number) => s >= 200 && s <= 599;

/** The API given to plugin `id`'s UI: its own routes, its own KV, and the console. */
export function pluginApi(session: Session, id: string): PluginApi {
  const { plugins, kv } = session.client;
  return {
    async fetch(path, init = {}) {
      const request = new Request(new URL(relative(id, path), "http://plugin.invalid"), init);
      const body = init.body == null ? new Uint8Array() : new Uint8Array(await request.arrayBuffer());
      const headers: { name: string; value: string }[] = [];
      request.headers.forEach((value, name) => headers.push({ name, value }));
      const url = new URL(request.url);
      const r = await plugins.callPlugin(
        { pluginId: id, method: request.method, path: url.pathname + url.search, headers, body },
        { signal: init.signal ?? undefined },
      );
      const nullBody = r.status === 204 || r.status === 205 || r.status === 304;
      return new Response(nullBody ? null : (r.body as Uint8Array<ArrayBuffer>), {
        status: validStatus(r.status) ? r.status : 502,
        headers: r.headers.map((h) => [h.name, h.value] as [string, string]),
      });
    },
    kv: {
      async get(key) {
        const r = await kv.getValue({ pluginId: id, key });
        return r.found ? r.value : null;
      },
      async set(key, value) {
        await kv.setValue({ pluginId: id, key, value: String(value) });
      },
      async delete(key) {
        return (await kv.deleteValue({ pluginId: id, key })).existed;
      },
    },
    navigate,
    showToast: (message, type = "info") => toast(message, type),
  };
}

/**
 * A path relative to the plugin's routes. Toru bundles called its HTTP API at
 * `/api/plugins/<id>/...`; that prefix is taken off, so such bundles work unmodified.
 */
export function relative(id: string, path: string): string {
  const prefix = `/api/plugins/${id}`;
  const rest = path.startsWith(prefix) ? path.slice(prefix.length) : null;
  let p = rest !== null && (rest === "" || "/?#".includes(rest[0])) ? rest : path;
  if (!p.startsWith("/")) p = "/" + p;
  return p;
}

/** Whether a content type is JavaScript's (a plugin UI's bundle.js must say it is). */
function isJavaScript(contentType: string): boolean {
  return /^\s*(text|application)\/(x-)?(javascript|ecmascript)\b/i.test(contentType);
}

/**
 * The plugin's UI bundle: `GET /bundle.js` through the API, answered 200 with a JavaScript
 * content type; otherwise why there is none (a plugin page asks this to offer its UI).
 */
export async function fetchBundle(
  session: Session,
  id: string,
): Promise<{ source: Uint8Array } | { missing: string }> {
  const r = await session.client.plugins.callPlugin({ pluginId: id, method: "GET", path: "/bundle.js" });
  const type = r.headers.find((h) => h.name.toLowerCase() === "content-type")?.value ?? "";
  if (r.status !== 200 || !isJavaScript(type)) {
    return { missing: `The plugin has no UI: GET /bundle.js answered ${r.status} ${type || "(no content-type)"}` };
  }
  return { source: r.body };
}

type Phase = { loading: true } | { loading: false; error: string | null };

export function PluginUiView({ session, id }: { session: Session; id: string }) {
  useTitle(`${id} UI`);
  const container = useRef<HTMLDivElement>(null);
  const [phase, setPhase] = useState<Phase>({ loading: true });

  useEffect(() => {
    const el = container.current!;
    let cancelled = false;
    let script: HTMLScriptElement | null = null;
    let url = "";
    let mounted: Registered | null = null;
    let failed = false;
    // The first failure is the one shown (a bundle that throws also lacks `mount`).
    const fail = (message: string) => {
      if (cancelled || failed) return;
      failed = true;
      setPhase({ loading: false, error: message });
    };
    // A bundle that throws while it runs: its error is shown here instead of the
    // browser's console, and the page stays usable. Once the UI is mounted, an error of its
    // own (in a click handler, say) is shown as a message and the UI stays.
    const onError = (e: ErrorEvent) => {
      if (!url || e.filename !== url) return;
      if (mounted) {
        toast(`${id}'s UI: ${e.message}`, "error");
        return;
      }
      e.preventDefault();
      fail(`The plugin's bundle.js failed while loading: ${e.message}`);
    };
    window.addEventListener("error", onError);

    (async () => {
      let source: Uint8Array;
      try {
        const bundle = await fetchBundle(session, id);
        if ("missing" in bundle) return fail(bundle.missing);
        source = bundle.source;
      } catch (e) {
        return fail(`Could not fetch the plugin's bundle.js: ${describe(e)}`);
      }
      if (cancelled) return;
      // Only what this bundle registers counts, not a registration left by an earlier one.
      delete window.ToruPlugins?.[id];
      delete window[`toru_plugin_${id}`];
      url = URL.createObjectURL(new Blob([source as Uint8Array<ArrayBuffer>], { type: "text/javascript" }));
      script = document.createElement("script");
      script.src = url;
      script.dataset.plugin = id;
      script.onerror = () => fail("The plugin's bundle.js could not be run");
      script.onload = () => {
        if (cancelled || failed) return;
        const found = window.ToruPlugins?.[id] ?? window[`toru_plugin_${id}`];
        if (!found || typeof found.mount !== "function") {
          return fail(
            `The plugin's bundle.js did not register a mount function (window.ToruPlugins["${id}"].mount or window.toru_plugin_${id}.mount)`,
          );
        }
        try {
          found.mount(el, pluginApi(session, id));
          mounted = found as Registered;
          setPhase((p) => (p.loading ? { loading: false, error: null } : p));
        } catch (e) {
          fail(`The plugin's mount failed: ${e instanceof Error ? e.message : String(e)}`);
        }
      };
      document.head.appendChild(script);
    })();

    return () => {
      cancelled = true;
      window.removeEventListener("error", onError);
      // After this commit of the console's own React tree: a plugin that renders with
      // React unmounts its root, which React refuses to do in the middle of another's.
      const [leaving, leavingScript, leavingUrl] = [mounted, script, url];
      queueMicrotask(() => {
        if (leaving && typeof leaving.unmount === "function") {
          try {
            leaving.unmount(el);
          } catch (e) {
            console.warn(`unmounting ${id}'s UI failed:`, e);
          }
        }
        leavingScript?.remove();
        if (leavingUrl) URL.revokeObjectURL(leavingUrl);
      });
    };
  }, [session, id]);

  const error = !phase.loading && phase.error;
  return (
    <section aria-labelledby="ui-title" className="plugin-ui">
      <p>
        <a href={`#/plugins/${encodeURIComponent(id)}`}>← {id}</a>
      </p>
      <h1 id="ui-title" className="sr-only">
        {id}
      </h1>
      {phase.loading && <p className="muted">Loading the plugin's UI…</p>}
      {error && (
        <div className="card error-box" role="alert" data-testid="ui-error">
          <h2>This plugin's UI could not be shown</h2>
          <p>{error}</p>
        </div>
      )}
      <div ref={container} className="plugin-container" data-testid="plugin-container" hidden={!!error} />
    </section>
  );
}
