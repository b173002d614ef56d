/**
 * Client for torud's gRPC control plane, on @grpc/grpc-js. The types and service clients
 * in `./gen` are generated from `proto/toru/v1` by `clients/generate.sh` (ts-proto);
 * this file connects them by address and bearer token, by the Unix control socket, or by
 * the daemon's data directory, and turns unary callbacks into promises.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import { ConfigServiceClient } from "./gen/toru/v1/config_service";
import { KvServiceClient } from "./gen/toru/v1/kv_service";
import { LogServiceClient, StreamLogsRequest, StreamLogsResponse } from "./gen/toru/v1/log_service";
import { PluginServiceClient, WatchEventsRequest, WatchEventsResponse } from "./gen/toru/v1/plugin_service";

// The generated modules, one namespace per proto file (they share helper type names).
export * as configServicePb from "./gen/toru/v1/config_service";
export * as eventPb from "./gen/toru/v1/event";
export * as kvServicePb from "./gen/toru/v1/kv_service";
export * as logServicePb from "./gen/toru/v1/log_service";
export * as pluginPb from "./gen/toru/v1/plugin";
export * as pluginServicePb from "./gen/toru/v1/plugin_service";

export const DEFAULT_ADDRESS = "127.0.0.1:50051";

/** Where the daemon is and how to authenticate. */
export interface ConnectOptions {
  /** `host:port`, or `https://host:port` for TLS; default `TORUD_ADDR`, else 127.0.0.1:50051. */
  address?: string;
  /** Bearer token; default `TORUD_TOKEN`, else `<dataDir>/admin.token` over TCP. */
  token?: string;
  /** The daemon's Unix control socket (no token needed). */
  unixSocket?: string;
  /** The daemon's data directory: its `torud.sock` when it exists, else its `admin.token`. */
  dataDir?: string;
  /** For `https://`: the CA (PEM file) that signed the daemon's certificate; default the system's roots. */
  tlsCa?: string;
  /** For `https://`: a client certificate (PEM file), for daemons that require one, with `tlsKey`. */
  tlsCert?: string;
  /** For `https://`: the client certificate's private key (PEM file). */
  tlsKey?: string;
}

/** The service clients, sharing one connection, every call carrying the token. */
export interface Client {
  plugins: PluginServiceClient;
  kv: KvServiceClient;
  logs: LogServiceClient;
  config: ConfigServiceClient;
  /** Closes the connection. */
  close(): void;
}

function readToken(file: string): string | undefined {
  try {
    return fs.readFileSync(file, "utf8").trim();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw e;
  }
}

/** Adds `authorization: Bearer <token>` to every call's metadata. */
function bearer(token: string): grpc.Interceptor {
  return (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set("authorization", `Bearer ${token}`);
        next(metadata, listener);
      },
    });
}

/** Opens a client; see {@link ConnectOptions} for how the daemon is found. */
export function connect(options: ConnectOptions = {}): Client {
  let address = options.address ?? process.env.TORUD_ADDR;
  let token = options.token ?? process.env.TORUD_TOKEN;
  const dataDir = options.dataDir ?? process.env.TORUD_DATA_DIR;
  let target: string;
  let credentials = grpc.credentials.createInsecure();
  const sock = dataDir ? path.join(dataDir, "torud.sock") : undefined;
  if (options.unixSocket) {
    target = `unix:${options.unixSocket}`;
  } else if (!address && sock && fs.existsSync(sock)) {
    target = `unix:${sock}`;
  } else {
    target = address ?? DEFAULT_ADDRESS;
    if (token === undefined && dataDir) token = readToken(path.join(dataDir, "admin.token"));
    if (target.startsWith("https://")) {
      target = target.slice("https://".length);
      if (!options.tlsCert !== !options.tlsKey) throw new Error("tlsCert and tlsKey go together");
      const read = (file?: string) => (file ? fs.readFileSync(file) : null);
      credentials = grpc.credentials.createSsl(read(options.tlsCa), read(options.tlsKey), read(options.tlsCert));
    } else {
      target = target.replace(/^http:\/\//, "");
    }
  }
  const clientOptions: grpc.ClientOptions = token ? { interceptors: [bearer(token)] } : {};
  const plugins = new PluginServiceClient(target, credentials, clientOptions);
  // The other clients reuse the first one's channel.
  const shared = { ...clientOptions, channelOverride: plugins.getChannel() as grpc.Channel };
  const kv = new KvServiceClient(target, credentials, shared);
  const logs = new LogServiceClient(target, credentials, shared);
  const config = new ConfigServiceClient(target, credentials, shared);
  return {
    plugins,
    kv,
    logs,
    config,
    close() {
      plugins.close();
    },
  };
}

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: grpc.Metadata,
  options: Partial<grpc.CallOptions>,
  callback: (error: grpc.ServiceError | null, response: Res) => void,
) => grpc.ClientUnaryCall;

/**
 * Calls a unary method and returns a promise of its answer:
 * `await unary(client.plugins, client.plugins.listPlugins, {})`.
 * `timeoutMs` sets the call's deadline.
 */
export function unary<C extends grpc.Client, Req, Res>(
  client: C,
  method: UnaryMethod<Req, Res>,
  request: Req,
  timeoutMs = 30_000,
): Promise<Res> {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutMs);
    method.call(client, request, new grpc.Metadata(), { deadline }, (err, res) =>
      err ? reject(err) : resolve(res),
    );
  });
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
 * The followers' reconnect policy: UNAVAILABLE (or a clean end) is retried with backoff
 * (50 ms doubling to 1 s) until the window passes without the daemon answering; anything
 * else is thrown at once.
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
  async failed(err: grpc.ServiceError | undefined): Promise<void> {
    if (err !== undefined && err.code !== grpc.status.UNAVAILABLE) throw err;
    const now = Date.now();
    this.failingSince ??= now;
    const left = this.windowMs - (now - this.failingSince);
    if (left <= 0) {
      throw err ?? new Error(`the stream ended and could not be resumed within ${this.windowMs} ms`);
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

function isServiceError(e: unknown): e is grpc.ServiceError {
  return e instanceof Error && typeof (e as grpc.ServiceError).code === "number";
}

/** One call's messages; ends on a clean end, throws the call's error, cancels it when left early. */
async function* read<T>(call: grpc.ClientReadableStream<T>, retry: Retry): AsyncGenerator<T> {
  call.on("metadata", () => retry.answered());
  // Cancelling (when the caller stops early) emits an error nobody else may be listening to.
  call.on("error", () => {});
  const abort = () => call.cancel();
  retry.signal?.addEventListener("abort", abort);
  try {
    for await (const message of call as AsyncIterable<T>) {
      retry.progress();
      yield message;
    }
  } finally {
    retry.signal?.removeEventListener("abort", abort);
    call.cancel();
  }
}

/**
 * Follows `WatchEvents` and resumes it when the daemon ends it (an upgrade ends it with
 * UNAVAILABLE, a stop ends it cleanly) or the connection fails: it reconnects with
 * `afterSeq` = the seq of the last event (or gap end) it yielded, so every event is yielded
 * once, in order, across reconnects. Gaps are yielded as the daemon sends them. Without
 * `afterSeq` and before any event, a resumed stream again starts at "now".
 *
 * `for await (const r of followEvents(client.plugins, { afterSeq: 0 }))`; leave the loop to
 * cancel the stream. UNAVAILABLE is retried as {@link FollowOptions} says; any other error
 * is thrown at once.
 */
export async function* followEvents(
  plugins: PluginServiceClient,
  request: Partial<WatchEventsRequest> = {},
  options: FollowOptions = {},
): AsyncGenerator<WatchEventsResponse> {
  let last = request.afterSeq;
  const retry = new Retry(options.reconnectWindowMs ?? DEFAULT_RECONNECT_WINDOW_MS, options.signal);
  while (!retry.aborted) {
    const call = plugins.watchEvents({ pluginIds: request.pluginIds ?? [], afterSeq: last });
    try {
      for await (const response of read(call, retry)) {
        const end = response.gap?.lastSeq ?? response.event?.seq;
        if (end === undefined || (last !== undefined && end <= last)) continue; // yielded already
        last = end;
        yield response;
      }
      if (retry.aborted) return;
      await retry.failed(undefined); // ended cleanly: the daemon stopped
    } catch (e) {
      if (retry.aborted) return;
      if (!isServiceError(e)) throw e;
      await retry.failed(e);
    }
  }
}

/**
 * Follows `StreamLogs` (`follow` is set for you) and resumes it when the daemon ends it or
 * the connection fails, with `afterCursors` holding, per plugin, the last record (or gap
 * end) yielded, so every record is yielded once, in order per plugin, across reconnects.
 * Batches are yielded as received, less any record already yielded; gaps are yielded as the
 * daemon sends them.
 *
 * Plugins not seen yet when it resumes: with an `afterCursors` start they keep their cursor;
 * with `tail`, `since` or "now" they start at the reconnect (the API cannot combine cursors
 * with another start), so what such a plugin logged while the stream was down is not sent.
 * Errors and the window are as for {@link followEvents}.
 */
export async function* followLogs(
  logs: LogServiceClient,
  request: Partial<StreamLogsRequest> = {},
  options: FollowOptions = {},
): AsyncGenerator<StreamLogsResponse> {
  const cursors = new Map<string, { seq: number; cursor: string }>();
  for (const cursor of request.afterCursors?.cursors ?? []) {
    const at = cursor.lastIndexOf(":");
    const seq = Number(cursor.slice(at + 1));
    cursors.set(cursor.slice(0, at), { seq: Number.isInteger(seq) ? seq : -1, cursor });
  }
  const seen = (plugin: string) => cursors.get(plugin)?.seq ?? -1;
  const retry = new Retry(options.reconnectWindowMs ?? DEFAULT_RECONNECT_WINDOW_MS, options.signal);
  let next: StreamLogsRequest = { filter: undefined, ...request, follow: true };
  while (!retry.aborted) {
    const call = logs.streamLogs(next);
    try {
      for await (const response of read(call, retry)) {
        const out: StreamLogsResponse = { records: [], gap: undefined };
        const gap = response.gap;
        if (gap && gap.toSeq > seen(gap.pluginId)) {
          cursors.set(gap.pluginId, { seq: gap.toSeq, cursor: `${gap.pluginId}:${gap.toSeq}` });
          out.gap = gap;
        }
        for (const record of response.records) {
          if (record.seq <= seen(record.pluginId)) continue; // yielded already
          cursors.set(record.pluginId, { seq: record.seq, cursor: record.cursor });
          out.records.push(record);
        }
        if (out.records.length || out.gap) yield out;
      }
      if (retry.aborted) return;
      await retry.failed(undefined); // ended cleanly: the daemon stopped
    } catch (e) {
      if (retry.aborted) return;
      if (!isServiceError(e)) throw e;
      await retry.failed(e);
    }
    next = {
      filter: request.filter,
      follow: true,
      afterCursors: { cursors: [...cursors.values()].map((c) => c.cursor) },
    };
  }
}
