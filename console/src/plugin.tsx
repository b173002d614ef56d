/** A plugin's page: metadata, why it is down, its events, its live log, KV and calls. */
import { useEffect, useState } from "react";
import type { Event } from "../../clients/web/src/gen/toru/v1/event_pb";
import { EventKind } from "../../clients/web/src/gen/toru/v1/event_pb";
import type { Plugin } from "../../clients/web/src/gen/toru/v1/plugin_pb";
import { PluginState } from "../../clients/web/src/gen/toru/v1/plugin_pb";
import type { EventGap } from "../../clients/web/src/gen/toru/v1/plugin_service_pb";
import { type Session, describe } from "./api";
import { useLivePlugin } from "./live";
import { LogView } from "./logs";
import { fetchBundle } from "./mount";
import { Actions, LinkState } from "./plugins";
import { HealthBadge, StateBadge, date, formatTime, stateName, until, useNow, useTitle } from "./ui";

export function PluginView({ session, id }: { session: Session; id: string }) {
  useTitle(id);
  const { plugin, events, link, error } = useLivePlugin(session, id);
  const hasUi = useHasUi(session, id, plugin?.state === PluginState.RUNNING);
  return (
    <section aria-labelledby="plugin-title" className="plugin">
      <p>
        <a href="#/">← Plugins</a>
      </p>
      <div className="heading">
        <h1 id="plugin-title">{plugin?.name || id}</h1>
        {plugin && <StateBadge state={plugin.state} />}
        <LinkState link={link} />
        {hasUi && (
          <a className="button" href={`#/plugins/${encodeURIComponent(id)}/ui`}>
            Open UI
          </a>
        )}
      </div>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      {plugin && (
        <>
          <Status plugin={plugin} session={session} />
          <Metadata plugin={plugin} />
        </>
      )}
      <details open className="card">
        <summary>
          <h2>Log</h2>
        </summary>
        <LogView session={session} id={id} />
      </details>
      <details open className="card">
        <summary>
          <h2>Events</h2>
        </summary>
        <Timeline events={events} />
      </details>
      <details className="card">
        <summary>
          <h2>Key-value store</h2>
        </summary>
        <KvForm session={session} id={id} />
      </details>
      {session.role === "admin" && (
        <details className="card">
          <summary>
            <h2>Call</h2>
          </summary>
          <CallForm session={session} id={id} />
        </details>
      )}
    </section>
  );
}

/** Whether the plugin serves `GET /bundle.js` (a Toru plugin UI); asked once it runs. */
function useHasUi(session: Session, id: string, running: boolean): boolean {
  const [has, setHas] = useState(false);
  useEffect(() => {
    if (!running || session.role !== "admin") return;
    let live = true;
    fetchBundle(session, id)
      .then((bundle) => live && setHas("source" in bundle))
      .catch(() => {});
    return () => {
      live = false;
    };
  }, [session, id, running]);
  return has;
}

function Status({ plugin: p, session }: { plugin: Plugin; session: Session }) {
  const now = useNow();
  const next = date(p.nextRestartAt);
  const exit = p.lastExit;
  const down = p.state !== PluginState.RUNNING && p.state !== PluginState.STARTING;
  return (
    <div className="card status" data-testid="status">
      <dl className="facts">
        <dt>State</dt>
        <dd data-testid="state">{stateName(p.state)}</dd>
        <dt>Health</dt>
        <dd>
          <HealthBadge healthy={p.healthy} state={p.state} />
        </dd>
        <dt>PID</dt>
        <dd data-testid="pid">{p.pid || "–"}</dd>
        <dt>Enabled</dt>
        <dd>{p.enabled ? "yes" : "no"}</dd>
        <dt>Restarts</dt>
        <dd>{p.restartCount}</dd>
        <dt>Failures in a row</dt>
        <dd>{p.consecutiveFailures}</dd>
        <dt>Started</dt>
        <dd>{formatTime(p.startedAt)}</dd>
      </dl>
      {next && p.state === PluginState.BACKOFF && (
        <p className="countdown" data-testid="countdown">
          Next restart {until(next, now)} ({next.toLocaleTimeString()})
        </p>
      )}
      {p.lastError && (
        <p className="error" data-testid="last-error">
          {p.lastError}
        </p>
      )}
      {exit && (down || p.restartCount > 0) && (
        <div className="exit" data-testid="exit">
          <p>
            Last exit:{" "}
            <strong>
              {exit.status.case === "code"
                ? `exit code ${exit.status.value}`
                : exit.status.case === "signal"
                  ? `signal ${exit.status.value}${exit.status.value === 9 ? " (SIGKILL)" : ""}`
                  : "unknown"}
            </strong>{" "}
            at {formatTime(exit.time)}
          </p>
          {exit.stderrTail.length > 0 && (
            <>
              <p className="muted">Last stderr lines:</p>
              <pre className="stderr">{exit.stderrTail.join("\n")}</pre>
            </>
          )}
        </div>
      )}
      {session.role === "admin" && <Actions plugin={p} session={session} />}
    </div>
  );
}

function Metadata({ plugin: p }: { plugin: Plugin }) {
  return (
    <details className="card">
      <summary>
        <h2>Metadata</h2>
      </summary>
      <dl className="facts">
        <dt>Id</dt>
        <dd>{p.id}</dd>
        <dt>Name</dt>
        <dd>{p.name}</dd>
        <dt>Version</dt>
        <dd>{p.version}</dd>
        <dt>Author</dt>
        <dd>{p.author || "–"}</dd>
        <dt>Description</dt>
        <dd>{p.description || "–"}</dd>
        <dt>Route</dt>
        <dd>{p.route || "–"}</dd>
        <dt>Icon</dt>
        <dd>{p.icon || "–"}</dd>
        <dt>Protocol</dt>
        <dd>{p.protocolVersion}</dd>
        <dt>Executable</dt>
        <dd>
          <code>{p.binaryPath}</code>
        </dd>
      </dl>
    </details>
  );
}

function Timeline({ events }: { events: (Event | EventGap | undefined)[] }) {
  if (events.length === 0) return <p className="muted">No events yet.</p>;
  return (
    <ol className="timeline" data-testid="events" reversed>
      {[...events].reverse().map((e, i) =>
        !e ? null : e.$typeName === "toru.v1.EventGap" ? (
          <li key={`gap-${e.firstSeq}`} className="gap">
            Events {String(e.firstSeq)}–{String(e.lastSeq)} are not in the event log: {e.reason}
          </li>
        ) : (
          <li key={String(e.seq) || i} data-kind={EventKind[e.kind]}>
            <time>{formatTime(e.time)}</time> <strong>{describeEvent(e)}</strong>
            {e.reason && <span className="muted"> — {e.reason}</span>}
          </li>
        ),
      )}
    </ol>
  );
}

function describeEvent(e: Event): string {
  if (e.kind === EventKind.STATE_CHANGED) return `${stateName(e.fromState)} → ${stateName(e.toState)}`;
  if (e.kind === EventKind.HEALTH_CHANGED) return e.healthy ? "healthy" : "unhealthy";
  return (EventKind[e.kind] ?? "event").toLowerCase().replace(/_/g, " ");
}

function KvForm({ session, id }: { session: Session; id: string }) {
  const [key, setKey] = useState("");
  const [value, setValue] = useState("");
  const [result, setResult] = useState<{ ok: boolean; text: string } | null>(null);
  const admin = session.role === "admin";
  const run = async (call: () => Promise<string>) => {
    try {
      setResult({ ok: true, text: await call() });
    } catch (e) {
      setResult({ ok: false, text: describe(e) });
    }
  };
  const kv = session.client.kv;
  return (
    <form className="kv" onSubmit={(e) => e.preventDefault()}>
      <label>
        Key <input name="key" value={key} onChange={(e) => setKey(e.target.value)} required />
      </label>
      {admin && (
        <label>
          Value <input name="value" value={value} onChange={(e) => setValue(e.target.value)} />
        </label>
      )}
      <div className="actions">
        <button
          type="button"
          onClick={() =>
            run(async () => {
              const r = await kv.getValue({ pluginId: id, key });
              if (r.found) setValue(r.value);
              return r.found ? `${key} = ${r.value}` : `${key} is not set`;
            })
          }
        >
          Get
        </button>
        {admin && (
          <>
            <button
              type="button"
              onClick={() => run(async () => (await kv.setValue({ pluginId: id, key, value }), `${key} set`))}
            >
              Set
            </button>
            <button
              type="button"
              onClick={() =>
                run(async () =>
                  (await kv.deleteValue({ pluginId: id, key })).existed ? `${key} deleted` : `${key} was not set`,
                )
              }
            >
              Delete
            </button>
          </>
        )}
      </div>
      {result && (
        <output className={result.ok ? "" : "error"} data-testid="kv-result">
          {result.text}
        </output>
      )}
    </form>
  );
}

function CallForm({ session, id }: { session: Session; id: string }) {
  const [method, setMethod] = useState("GET");
  const [path, setPath] = useState("/");
  const [headers, setHeaders] = useState("");
  const [body, setBody] = useState("");
  const [busy, setBusy] = useState(false);
  const [answer, setAnswer] = useState<
    { status: number; headers: [string, string][]; body: string } | { error: string } | null
  >(null);
  async function send(e: React.FormEvent) {
    e.preventDefault();
    setBusy(true);
    try {
      const r = await session.client.plugins.callPlugin({
        pluginId: id,
        method,
        path,
        headers: headers
          .split("\n")
          .map((line) => line.trim())
          .filter(Boolean)
          .map((line) => {
            const at = line.indexOf(":");
            return at < 0
              ? { name: line, value: "" }
              : { name: line.slice(0, at).trim(), value: line.slice(at + 1).trim() };
          }),
        body: new TextEncoder().encode(body),
      });
      setAnswer({
        status: r.status,
        headers: r.headers.map((h) => [h.name, h.value]),
        body: new TextDecoder().decode(r.body),
      });
    } catch (err) {
      setAnswer({ error: describe(err) });
    } finally {
      setBusy(false);
    }
  }
  return (
    <form className="call" onSubmit={send}>
      <div className="row">
        <label>
          Method{" "}
          <select value={method} onChange={(e) => setMethod(e.target.value)}>
            {["GET", "POST", "PUT", "PATCH", "DELETE"].map((m) => (
              <option key={m}>{m}</option>
            ))}
          </select>
        </label>
        <label className="grow">
          Path <input name="path" value={path} onChange={(e) => setPath(e.target.value)} required />
        </label>
      </div>
      <label>
        Headers (one <code>Name: value</code> a line)
        <textarea rows={2} value={headers} onChange={(e) => setHeaders(e.target.value)} />
      </label>
      <label>
        Body
        <textarea rows={3} value={body} onChange={(e) => setBody(e.target.value)} />
      </label>
      <button type="submit" disabled={busy}>
        Send
      </button>
      {answer && "error" in answer && (
        <p className="error" role="alert" data-testid="call-error">
          {answer.error}
        </p>
      )}
      {answer && "status" in answer && (
        <div className="answer" data-testid="call-answer">
          <p>
            Status <strong data-testid="call-status">{answer.status}</strong>
          </p>
          {answer.headers.length > 0 && (
            <pre>{answer.headers.map(([n, v]) => `${n}: ${v}`).join("\n")}</pre>
          )}
          <pre data-testid="call-body">{answer.body}</pre>
        </div>
      )}
    </form>
  );
}
