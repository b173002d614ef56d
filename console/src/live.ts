/**
 * Live state from the daemon's streams, no polling: the plugins (listed once, then each
 * refreshed when `WatchEvents` says something happened to it) and a plugin's events. A
 * dropped stream is opened again after the last event seen (`after_seq`), so nothing is
 * missed across the drop, and the list is read again in case.
 */
import { useEffect, useRef, useState } from "react";
import type { Plugin } from "../../clients/web/src/gen/toru/v1/plugin_pb";
import type { Event } from "../../clients/web/src/gen/toru/v1/event_pb";
import { EventKind } from "../../clients/web/src/gen/toru/v1/event_pb";
import type { WatchEventsResponse } from "../../clients/web/src/gen/toru/v1/plugin_service_pb";
import { type Session, describe, isCancel } from "./api";

/** Connection state of a live view, shown beside it. */
export type Link = { ok: true } | { ok: false; error: string; retryAt: number };

/** Runs `open` (one stream) again and again until `signal` aborts, waiting longer after each failure. */
export async function keepOpen(
  signal: AbortSignal,
  open: () => Promise<void>,
  onLink: (link: Link) => void,
): Promise<void> {
  let delay = 500;
  while (!signal.aborted) {
    try {
      await open();
      delay = 500; // an orderly end (the daemon stopping a stream): reopen soon
    } catch (e) {
      if (signal.aborted || isCancel(e)) return;
      const retryAt = Date.now() + delay;
      onLink({ ok: false, error: describe(e), retryAt });
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 8000);
  }
}

/**
 * `promise`, marked as handled now: it is awaited only later (after the listing), and a
 * rejection before then (the stream failing or being cancelled) must not be reported as
 * unhandled. Awaiting it still throws.
 */
function observed<T>(promise: Promise<T>): Promise<T> {
  promise.catch(() => {});
  return promise;
}

/** Every plugin, kept current by `WatchEvents`. */
export function useLivePlugins(session: Session): { plugins: Plugin[] | null; link: Link; error: string | null } {
  const [plugins, setPlugins] = useState<Map<string, Plugin> | null>(null);
  const [link, setLink] = useState<Link>({ ok: true });
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    const abort = new AbortController();
    const { client } = session;
    let afterSeq: bigint | undefined;
    const listAll = async () => {
      const all = new Map<string, Plugin>();
      let pageToken = "";
      do {
        const page = await client.plugins.listPlugins({ pageSize: 500, pageToken }, { signal: abort.signal });
        page.plugins.forEach((p) => all.set(p.id, p));
        pageToken = page.nextPageToken;
      } while (pageToken);
      setPlugins(all);
      setError(null);
    };
    const refresh = async (id: string) => {
      try {
        const { plugin } = await client.plugins.getPlugin({ pluginId: id }, { signal: abort.signal });
        if (plugin) setPlugins((all) => new Map(all ?? []).set(id, plugin));
      } catch {
        // Gone (removed) or unreachable: the list is read again below or on reconnect.
        setPlugins((all) => {
          const next = new Map(all ?? []);
          next.delete(id);
          return next;
        });
      }
    };
    keepOpen(
      abort.signal,
      async () => {
        const stream = client.plugins.watchEvents({ afterSeq }, { signal: abort.signal });
        // The stream is asked for first, so nothing that happens while listing is missed.
        const iterator = stream[Symbol.asyncIterator]();
        const first = observed(iterator.next());
        await listAll();
        setLink({ ok: true });
        for (let next = await first; !next.done; next = await iterator.next()) {
          const event = next.value.event;
          if (!event) continue;
          afterSeq = event.seq;
          if (!event.pluginId) continue;
          await refresh(event.pluginId);
        }
      },
      setLink,
    ).catch((e) => setError(describe(e)));
    return () => abort.abort();
  }, [session]);
  const sorted = plugins ? [...plugins.values()].sort((a, b) => a.id.localeCompare(b.id)) : null;
  return { plugins: sorted, link, error };
}

/** One plugin and its event timeline (history replayed, then live). */
export function useLivePlugin(
  session: Session,
  id: string,
): { plugin: Plugin | null; events: (Event | WatchEventsResponse["gap"])[]; link: Link; error: string | null } {
  const [plugin, setPlugin] = useState<Plugin | null>(null);
  const [events, setEvents] = useState<(Event | WatchEventsResponse["gap"])[]>([]);
  const [link, setLink] = useState<Link>({ ok: true });
  const [error, setError] = useState<string | null>(null);
  const seen = useRef<bigint>(0n);
  useEffect(() => {
    const abort = new AbortController();
    const { client } = session;
    const read = async () => {
      try {
        const { plugin } = await client.plugins.getPlugin({ pluginId: id }, { signal: abort.signal });
        setPlugin(plugin ?? null);
        setError(null);
      } catch (e) {
        if (!isCancel(e)) setError(describe(e));
      }
    };
    keepOpen(
      abort.signal,
      async () => {
        const stream = client.plugins.watchEvents(
          { afterSeq: seen.current, pluginIds: [id] },
          { signal: abort.signal },
        );
        const iterator = stream[Symbol.asyncIterator]();
        const first = observed(iterator.next());
        await read();
        setLink({ ok: true });
        for (let next = await first; !next.done; next = await iterator.next()) {
          const { event, gap } = next.value;
          if (gap) {
            seen.current = gap.lastSeq;
            setEvents((all) => [...all.slice(-(MAX_EVENTS - 1)), gap]);
            continue;
          }
          if (!event || event.seq <= seen.current) continue;
          seen.current = event.seq;
          setEvents((all) => [...all.slice(-(MAX_EVENTS - 1)), event]);
          if (event.kind !== EventKind.PLUGIN_SKIPPED) await read();
        }
      },
      setLink,
    );
    return () => abort.abort();
  }, [session, id]);
  return { plugin, events, link, error };
}

/** Events kept on a plugin's page (the oldest go first). */
const MAX_EVENTS = 200;
