/**
 * Browser client for torud's control plane over gRPC-Web, on @connectrpc/connect-web.
 * The message types and service descriptors in `./gen` are generated from `proto/toru/v1`
 * by `clients/generate.sh` (protoc-gen-es); this file only builds the transport, which
 * adds the bearer token to every call, and one typed client per service.
 *
 * It uses nothing but `fetch`, so it runs in browsers and in Node 18 or later. The daemon
 * answers gRPC-Web on its TCP listener (not on the control socket); a page served from
 * another origin needs that origin given to the daemon with `--cors-origin`.
 */
import { type Client, Code, ConnectError, type Interceptor, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { ConfigService } from "./gen/toru/v1/config_service_pb";
import { KvService } from "./gen/toru/v1/kv_service_pb";
import {
  type LogGap, type LogRecord, LogService, type StreamLogsRequestSchema, type StreamLogsResponse,
} from "./gen/toru/v1/log_service_pb";
import { PluginService, type WatchEventsRequestSchema, type WatchEventsResponse } from "./gen/toru/v1/plugin_service_pb";

// The generated modules, one namespace per proto file.
export * as configServicePb from "./gen/toru/v1/config_service_pb";
export * as eventPb from "./gen/toru/v1/event_pb";
export * as kvServicePb from "./gen/toru/v1/kv_service_pb";
export * as logServicePb from "./gen/toru/v1/log_service_pb";
export * as pluginPb from "./gen/toru/v1/plugin_pb";
export * as pluginServicePb from "./gen/toru/v1/plugin_service_pb";

/** Where the daemon is and how to authenticate. */
export interface ToruClientOptions {
  /** The daemon's TCP listener as a URL: `http://127.0.0.1:50051`, or `https://...` with TLS. */
  baseUrl: string;
  /**
   * The admin or read token (`<data-dir>/admin.token`, `read.token`), sent as
   * `authorization: Bearer <token>` on every call, never in the URL. None: no header, and
   * every `toru.v1` call is UNAUTHENTICATED.
   */
  token?: string;
  /** The `fetch` to use; default the global one. */
  fetch?: typeof globalThis.fetch;
}

/** One typed client per service, sharing one transport. */
export interface ToruClient {
  plugins: Client<typeof PluginService>;
  kv: Client<typeof KvService>;
  logs: Client<typeof LogService>;
  config: Client<typeof ConfigService>;
}

/** Connects to the daemon at `baseUrl` over gRPC-Web (binary protobuf, as tonic-web speaks it). */
export function createToruClient(options: ToruClientOptions): ToruClient {
  const { token } = options;
  const bearer: Interceptor = (next) => (request) => {
    if (token) request.header.set("authorization", `Bearer ${token}`);
    return next(request);
  };
  const transport = createGrpcWebTransport({
    baseUrl: options.baseUrl,
    useBinaryFormat: true,
    interceptors: [bearer],
    fetch: options.fetch,
  });
  return {
    plugins: createClient(PluginService, transport),
    kv: createClient(KvService, transport),
    logs: createClient(LogService, transport),
    config: createClient(ConfigService, transport),
  };
}

/** How long {@link followEvents} and {@link followLogs} keep trying to reconnect: 30 s. */
export const DEFAULT_RECONNECT_WINDOW_MS = 30_000;

/** Options of {@link followEvents} and {@link followLogs}. */
export interface FollowOptions {
  /**
   * Give up, throwing the last error, once this long has passed since the stream failed
   * without the daemon answering a reconnect; default {@link DEFAULT_RECONNECT_WINDOW_MS}.
   */
  reconnectWindowMs?: number;
  /** Aborting it cancels the stream and ends the follower (it returns, without an error). */
  signal?: AbortSignal;
}

/**
 * Whether a follower may resume after `err`: UNAVAILABLE (an upgrade's handover, whatever
 * the message), or a failed connection. Through `fetch` the latter is a TypeError ("fetch
 * failed" in Node, "Failed to fetch" in browsers, "terminated" when a body is cut), which
 * connect-es wraps as UNKNOWN or INTERNAL; a body cut before the gRPC-Web trailer is
 * UNKNOWN "missing trailer"; an HTTP/2 GOAWAY is named in the message.
 */
function resumable(err: ConnectError): boolean {
  if (err.code === Code.Unavailable) return true;
  if (err.code !== Code.Unknown && err.code !== Code.Internal) return false;
  if (/GOAWAY|missing trailer/i.test(err.rawMessage)) return true;
  for (let cause: unknown = err.cause, depth = 0; cause !== undefined && depth < 8; depth++) {
    if (cause instanceof TypeError) return true;
    if (cause instanceof Error) {
      if (/GOAWAY/i.test(cause.message)) return true;
      if (/^E(CONNREFUSED|CONNRESET|PIPE|CONNABORTED|HOSTUNREACH|NETUNREACH)$|^UND_ERR_SOCKET$/.test(
        String((cause as { code?: unknown }).code))) return true;
      cause = cause.cause;
    } else {
      break;
    }
  }
  return false;
}

/**
 * The followers' reconnect policy: a resumable error (or a clean end) is retried with
 * backoff (50 ms doubling to 1 s) until the window passes without the daemon answering;
 * anything else is thrown at once.
 */
class Retry {
  private delay = 50;
  private failingSince: number | undefined;

  constructor(
    private readonly windowMs: number,
    readonly signal: AbortSignal | undefined,
  ) {}

  get aborted(): boolean {
    return this.signal?.aborted ?? false;
  }

  /** The daemon sent response headers (a trailers-only error sends none): the window restarts. */
  answered(): void {
    this.failingSince = undefined;
  }

  progress(): void {
    this.failingSince = undefined;
    this.delay = 50;
  }

  /** Resolves after the backoff when the stream may be resumed, else throws. */
  async failed(err: unknown): Promise<void> {
    if (err !== undefined && !(err instanceof ConnectError && resumable(err))) throw err;
    const now = Date.now();
    this.failingSince ??= now;
    const left = this.windowMs - (now - this.failingSince);
    if (left <= 0) {
      throw err ?? new ConnectError(`the stream ended and could not be resumed within ${this.windowMs} ms`,
        Code.Unavailable);
    }
    await new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.signal?.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, Math.min(this.delay, left));
      this.signal?.addEventListener("abort", done);
    });
    this.delay = Math.min(this.delay * 2, 1000);
  }
}

/**
 * One call's messages: `open` starts it with a signal of its own (aborted by the caller's
 * and when the caller leaves early) and a header callback. Ends on a clean end, throws the
 * call's error (as a ConnectError).
 */
async function* read<T>(
  open: (options: { signal: AbortSignal; onHeader: () => void }) => AsyncIterable<T>,
  retry: Retry,
): AsyncGenerator<T> {
  const call = new AbortController();
  const abort = () => call.abort();
  retry.signal?.addEventListener("abort", abort);
  try {
    for await (const message of open({ signal: call.signal, onHeader: () => retry.answered() })) {
      retry.progress();
      yield message;
    }
  } catch (e) {
    throw ConnectError.from(e);
  } finally {
    retry.signal?.removeEventListener("abort", abort);
    call.abort();
  }
}

/**
 * Follows `WatchEvents` and resumes it when the daemon ends it (an upgrade ends it with
 * UNAVAILABLE, a stop ends it cleanly) or the connection fails: it reconnects with
 * `afterSeq` = the seq of the last event (or gap end) it yielded, so every event is yielded
 * once, in order, across reconnects. Gaps are yielded as the daemon sends them. Without
 * `afterSeq` and before any event, a resumed stream again starts at "now".
 *
 * `for await (const r of followEvents(client.plugins, { afterSeq: 0n }))`; leave the loop
 * (or abort `options.signal`) to cancel the stream. UNAVAILABLE and failed connections
 * are retried as {@link FollowOptions} says; any other error is thrown at once, a
 * `ConnectError`.
 */
export async function* followEvents(
  plugins: Client<typeof PluginService>,
  request: { afterSeq?: bigint; pluginIds?: string[] } = {},
  options: FollowOptions = {},
): AsyncGenerator<WatchEventsResponse> {
  let last = request.afterSeq;
  const pluginIds = [...(request.pluginIds ?? [])];
  const retry = new Retry(options.reconnectWindowMs ?? DEFAULT_RECONNECT_WINDOW_MS, options.signal);
  while (!retry.aborted) {
    const req: MessageInitShape<typeof WatchEventsRequestSchema> = { pluginIds, afterSeq: last };
    try {
      for await (const response of read((o) => plugins.watchEvents(req, o), retry)) {
        const end = response.gap?.lastSeq ?? response.event?.seq;
        if (end === undefined || (last !== undefined && end <= last)) continue; // yielded already
        last = end;
        yield response;
      }
      if (retry.aborted) return;
      await retry.failed(undefined); // ended cleanly: the daemon stopped
    } catch (e) {
      if (retry.aborted) return;
      await retry.failed(e);
    }
  }
}

/** What {@link followLogs} takes: a `StreamLogsRequest` (`follow` is set for you). */
export type FollowLogsRequest = Omit<MessageInitShape<typeof StreamLogsRequestSchema>, "$typeName" | "follow">;

/**
 * Follows `StreamLogs` (`follow` is set for you) and resumes it when the daemon ends it or
 * the connection fails, with `afterCursors` holding, per plugin, the last record (or gap
 * end) yielded as `"<plugin>:<seq>"`, so every record is yielded once, in order per
 * plugin, across reconnects. Batches are yielded as received, less any record already
 * yielded; gaps are yielded as the daemon sends them.
 *
 * Plugins not seen yet when it resumes: with an `afterCursors` start they keep their cursor;
 * with `tail`, `since` or "now" they start at the reconnect (the API cannot combine cursors
 * with another start), so what such a plugin logged while the stream was down is not sent.
 * Errors and the window are as for {@link followEvents}.
 */
export async function* followLogs(
  logs: Client<typeof LogService>,
  request: FollowLogsRequest,
  options: FollowOptions = {},
): AsyncGenerator<StreamLogsResponse> {
  const cursors = new Map<string, { seq: bigint; cursor: string }>();
  if (request.start?.case === "afterCursors") {
    for (const cursor of request.start.value.cursors ?? []) {
      const at = cursor.lastIndexOf(":");
      const tail = cursor.slice(at + 1);
      cursors.set(cursor.slice(0, at), { seq: at >= 0 && /^\d+$/.test(tail) ? BigInt(tail) : -1n, cursor });
    }
  }
  const seen = (plugin: string) => cursors.get(plugin)?.seq ?? -1n;
  const retry = new Retry(options.reconnectWindowMs ?? DEFAULT_RECONNECT_WINDOW_MS, options.signal);
  let next: MessageInitShape<typeof StreamLogsRequestSchema> = { filter: request.filter, start: request.start, follow: true };
  while (!retry.aborted) {
    const req = next;
    try {
      for await (const response of read((o) => logs.streamLogs(req, o), retry)) {
        const records: LogRecord[] = [];
        let gap: LogGap | undefined;
        if (response.gap && response.gap.toSeq > seen(response.gap.pluginId)) {
          gap = response.gap;
          cursors.set(gap.pluginId, { seq: gap.toSeq, cursor: `${gap.pluginId}:${gap.toSeq}` });
        }
        for (const record of response.records) {
          if (record.seq <= seen(record.pluginId)) continue; // yielded already
          cursors.set(record.pluginId, { seq: record.seq, cursor: record.cursor || `${record.pluginId}:${record.seq}` });
          records.push(record);
        }
        if (records.length || gap) yield { ...response, records, gap };
      }
      if (retry.aborted) return;
      await retry.failed(undefined); // ended cleanly: the daemon stopped
    } catch (e) {
      if (retry.aborted) return;
      await retry.failed(e);
    }
    next = {
      filter: request.filter,
      follow: true,
      start: { case: "afterCursors", value: { cursors: [...cursors.values()].map((c) => c.cursor) } },
    };
  }
}
