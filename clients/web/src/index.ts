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
import { type Client, type Interceptor, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ConfigService } from "./gen/toru/v1/config_service_pb";
import { KvService } from "./gen/toru/v1/kv_service_pb";
import { LogService } from "./gen/toru/v1/log_service_pb";
import { PluginService } from "./gen/toru/v1/plugin_service_pb";

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
