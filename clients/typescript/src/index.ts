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
import { LogServiceClient } from "./gen/toru/v1/log_service";
import { PluginServiceClient } from "./gen/toru/v1/plugin_service";

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
