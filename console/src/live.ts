/**
 * Live state from the daemon's streams, no polling: the plugins (listed once the event
 * stream is registered, then each read again when `WatchEvents` says something happened to
 * it) and a plugin's events. A dropped stream is opened again after the last event seen
 * (`after_seq`), so nothing is missed across the drop, and the list is read again in case.
 */
import { useEffect, useRef, useState } from "react";
import type { Plugin } from "../../clients/web/src/gen/toru/v1/plugin_pb";
import type { Event } from "../../clients/web/src/gen/toru/v1/event_pb";
import { EventKind } from "../../clients/web/src/gen/toru/v1/event_pb";
import type { WatchEventsResponse } from "../../clients/web/src/gen/toru/v1/plugin_service_pb";
import { Code, ConnectError } from "@connectrpc/connect";
import { type Session, describe, isCancel } from "./api";

/** Connection state of a live view, shown beside it. */
export type Link = { ok: true } | { ok: false; error: string; retryAt: number };

/**
 * Runs `open` (one stream) again and again until `signal` aborts, waiting longer after each
 * failure. Each attempt gets its own signal, aborted when the attempt ends, so a stream an
 * attempt leaves open (it failed while doing something else) is closed with it.
 */
export async function keepOpen(
  signal: AbortSignal,
  open: (attempt: AbortSignal) => Promise<void>,
  onLink: (link: Link) => void,
): Promise<void> {
  let delay = 500;
  while (!signal.aborted) {
    const attempt = new AbortController();
    const stop = () => attempt.abort();
    signal.addEventListener("abort", stop);
    try {
      await open(attempt.signal);
      delay = 500; // an orderly end (the daemon ended the stream): reopen soon
    } catch (e) {
      if (signal.aborted) return;
      onLink({ ok: false, error: describe(e), retryAt: Date.now() + delay });
    } finally {
      attempt.abort();
      signal.removeEventListener("abort", stop);
    }
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, delay);
      signal.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
    });
    delay = Math.min(delay * 2, 8000);
  }
}

/**
 * `promise`, marked as handled now: it is awaited only later, and a rejection before then
 * (the stream failing or being cancelled) must not be reported as unhandled. Awaiting it
 * still throws.
 */
function observed<T>(promise: Promise<T>): Promise<T> {
  promise.catch(() => {});
  return promise;
}

/**
 * Starts a server stream and waits until the daemon has sent its response headers (it has
 * then registered the stream, so nothing that happens from here on is missed) or the
 * stream failed. `call` starts it, with the header callback to pass in its call options.
 */
export async function started<T>(
  call: (onHeader: () => void) => AsyncIterable<T>,
): Promise<{ iterator: AsyncIterator<T>; first: Promise<IteratorResult<T>> }> {
  let answered!: () => void;
  const headers = new Promise<void>((resolve) => (answered = resolve));
  const iterator = call(() => answered())[Symbol.asyncIterator]();
  // The request is sent when the first message is asked for.
  const first = observed(iterator.next());
  await Promise.race([headers, first]);
  return { iterator, first };
}

/**
 * `run(key)` at most once at a time per key: calls made while one runs are folded into one
 * more run after it, so a burst of events costs two reads, not one per event, and the last
 * read starts after the last event.
 */
function coalesced(run: (key: string) => Promise<void>): (key: string) => void {
  const pending = new Map<string, boolean>(); // key → another run is wanted
  const go = (key: string) => {
    pending.set(key, false);
    run(key).finally(() => {
      if (pending.get(key)) go(key);
      else pending.delete(key);
    });
  };
  return (key) => {
    if (pending.has(key)) pending.set(key, true);
    else go(key);
  };
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
    const listAll = async (signal: AbortSignal) => {
      const all = new Map<string, Plugin>();
      let pageToken = "";
      do {
        const page = await client.plugins.listPlugins({ pageSize: 500, pageToken }, { signal });
        page.plugins.forEach((p) => all.set(p.id, p));
        pageToken = page.nextPageToken;
      } while (pageToken);
      setPlugins(all);
      setError(null);
    };
    const refresh = coalesced(async (id: string) => {
      try {
        const { plugin } = await client.plugins.getPlugin({ pluginId: id }, { signal: abort.signal });
        if (plugin) setPlugins((all) => new Map(all ?? []).set(id, plugin));
      } catch (e) {
        // Removed: its row goes. Anything else (a dropped connection): the row stays, and
        // the list is read again when the stream is back.
        if (ConnectError.from(e).code === Code.NotFound) {
          setPlugins((all) => {
            const next = new Map(all ?? []);
            next.delete(id);
            return next;
          });
        }
      }
    });
    keepOpen(
      abort.signal,
      async (signal) => {
        const { iterator, first } = await started((onHeader) =>
          client.plugins.watchEvents({ afterSeq }, { signal, onHeader }),
        );
        await listAll(signal);
        setLink({ ok: true });
        for (let next = await first; !next.done; next = await iterator.next()) {
          const { event, gap } = next.value;
          if (gap) {
            // Events in the gap are not delivered: read everything again.
            afterSeq = gap.lastSeq;
            await listAll(signal);
            continue;
          }
          if (!event) continue;
          afterSeq = event.seq;
          if (event.pluginId) refresh(event.pluginId);
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
    const read = coalesced(async () => {
      try {
        const { plugin } = await client.plugins.getPlugin({ pluginId: id }, { signal: abort.signal });
        setPlugin(plugin ?? null);
        setError(null);
      } catch (e) {
        if (!isCancel(e)) setError(describe(e));
      }
    });
    keepOpen(
      abort.signal,
      async (signal) => {
        const { iterator, first } = await started((onHeader) =>
          client.plugins.watchEvents({ afterSeq: seen.current, pluginIds: [id] }, { signal, onHeader }),
        );
        read(id);
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
          if (event.kind !== EventKind.PLUGIN_SKIPPED) read(id);
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
