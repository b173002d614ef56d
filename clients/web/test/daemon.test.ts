/**
 * The browser client against the real daemon over gRPC-Web, through Node's `fetch` (the
 * same transport a browser uses): the daemon starts with the Rust `hello` example plugin
 * not enabled; the read token lists it and watches events, the admin token enables it and
 * the events show it start; the read token cannot write, no token is UNAUTHENTICATED; logs
 * stream. Waits use deadlines, never sleeps.
 */
import { after, before, describe, test } from "node:test";
import * as assert from "node:assert/strict";
import { Code, ConnectError } from "@connectrpc/connect";
import { type ToruClient, createToruClient } from "../src";
import { EventKind } from "../src/gen/toru/v1/event_pb";
import { LogStream, type StreamLogsResponse } from "../src/gen/toru/v1/log_service_pb";
import { PluginState } from "../src/gen/toru/v1/plugin_pb";
import type { WatchEventsResponse } from "../src/gen/toru/v1/plugin_service_pb";
import { type Daemon, Reader, startDaemon } from "./daemon";

let daemon: Daemon;
let admin: ToruClient;
let reader: ToruClient;

before(async () => {
  daemon = await startDaemon();
  admin = createToruClient({ baseUrl: daemon.baseUrl, token: daemon.token("admin") });
  reader = createToruClient({ baseUrl: daemon.baseUrl, token: daemon.token("read") });
});

after(async () => {
  await daemon?.stop();
});

/** Whether `e` is a ConnectError with `code`. */
const connectCode = (code: Code) => (e: unknown) => {
  assert.ok(e instanceof ConnectError, `expected a ConnectError, got ${e}`);
  assert.equal(e.code, code, `expected ${Code[code]}, got ${Code[e.code]}: ${e.message}`);
  return true;
};

describe("torud through the gRPC-Web client", () => {
  test("ListPlugins with the read token lists the example plugin", async () => {
    const r = await reader.plugins.listPlugins({});
    assert.deepEqual(r.plugins.map((p) => p.id), ["hello"]);
    assert.equal(r.plugins[0].enabled, false);
    assert.notEqual(r.plugins[0].state, PluginState.RUNNING);
  });

  test("the token travels in the authorization header, never in the URL", async () => {
    const seen: { url: string; authorization: string | null }[] = [];
    const recording: typeof fetch = (input, init) => {
      seen.push({ url: String(input), authorization: new Headers(init?.headers).get("authorization") });
      return fetch(input, init);
    };
    const token = daemon.token("read");
    const client = createToruClient({ baseUrl: daemon.baseUrl, token, fetch: recording });
    await client.plugins.getPlugin({ pluginId: "hello" });
    assert.deepEqual(seen, [{
      url: `${daemon.baseUrl}/toru.v1.PluginService/GetPlugin`,
      authorization: `Bearer ${token}`,
    }]);
  });

  test("no token is UNAUTHENTICATED", async () => {
    const anonymous = createToruClient({ baseUrl: daemon.baseUrl });
    await assert.rejects(anonymous.plugins.listPlugins({}), connectCode(Code.Unauthenticated));
    const wrong = createToruClient({ baseUrl: daemon.baseUrl, token: "not-the-token" });
    await assert.rejects(wrong.plugins.listPlugins({}), connectCode(Code.Unauthenticated));
  });

  test("the read token cannot EnablePlugin", async () => {
    await assert.rejects(reader.plugins.enablePlugin({ pluginId: "hello" }), connectCode(Code.PermissionDenied));
    const r = await reader.plugins.getPlugin({ pluginId: "hello" });
    assert.equal(r.plugin?.enabled, false);
  });

  test("WatchEvents streams the state changes an enable causes", async () => {
    // From seq 0: the replay and the live events in one stream, so nothing is missed
    // whenever the enable lands. hello has never run, so a RUNNING event is the enable's.
    const events = new Reader((signal) =>
      reader.plugins.watchEvents({ afterSeq: 0n, pluginIds: ["hello"] }, { signal }));
    try {
      const on = await admin.plugins.enablePlugin({ pluginId: "hello" });
      assert.equal(on.plugin?.enabled, true);
      const seen = await events.until((r: WatchEventsResponse) => r.event?.toState === PluginState.RUNNING);
      const changes = seen.map((r) => r.event!).filter((e) => e.kind === EventKind.STATE_CHANGED);
      assert.ok(changes.every((e) => e.pluginId === "hello"));
      assert.deepEqual(changes.slice(-2).map((e) => [e.fromState, e.toState]),
        [[PluginState.STOPPED, PluginState.STARTING], [PluginState.STARTING, PluginState.RUNNING]]);
      const seqs = seen.map((r) => r.event!.seq);
      assert.deepEqual(seqs, [...seqs].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)));
    } finally {
      events.cancel();
    }
  });

  test("StreamLogs streams a plugin's log lines", async () => {
    await admin.plugins.enablePlugin({ pluginId: "hello" });
    const logs = new Reader((signal) => reader.logs.streamLogs(
      { filter: { pluginIds: ["hello"] }, start: { case: "tail", value: 1 }, follow: true }, { signal }));
    try {
      // The tail's record first: the stream is open before the restart.
      const [tail] = await logs.until((b: StreamLogsResponse) => b.records.length > 0);
      const first = tail.records[tail.records.length - 1];
      await admin.plugins.restartPlugin({ pluginId: "hello" });
      const batches = await logs.until((b: StreamLogsResponse) =>
        b.records.some((r) => r.message === "running: ready"));
      const followed = batches.flatMap((b) => b.records);
      assert.ok(followed.every((r) => r.pluginId === "hello"));
      assert.deepEqual(followed.map((r) => r.seq), followed.map((_, i) => first.seq + 1n + BigInt(i)));
      const ready = followed.find((r) => r.message === "running: ready");
      assert.equal(ready?.stream, LogStream.SUPERVISOR);
    } finally {
      logs.cancel();
    }
  });

  test("KV and config through the admin token", async () => {
    await admin.kv.setValue({ pluginId: "hello", key: "color", value: "blue" });
    const got = await reader.kv.getValue({ pluginId: "hello", key: "color" });
    assert.deepEqual([got.found, got.value], [true, "blue"]);
    await admin.kv.deleteValue({ pluginId: "hello", key: "color" });
    assert.equal((await reader.kv.getValue({ pluginId: "hello", key: "color" })).found, false);
    const config = await admin.config.getConfig({});
    assert.match(config.toml, /plugins/, "GetConfig answers the configuration in force, as TOML");
  });
});
