/**
 * The generated TypeScript client against the real daemon (started here, with the Rust
 * `hello` and Python `py-echo` example plugins): lifecycle, KV, calls, log queries, log
 * streams resumed from a cursor, and lifecycle events. Waits use deadlines, never sleeps.
 */
import { after, before, describe, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import { Client, connect, unary } from "../src";
import { EventKind } from "../src/gen/toru/v1/event";
import { LogRecord, LogStream, QueryLogsRequest, StreamLogsResponse } from "../src/gen/toru/v1/log_service";
import { PluginState } from "../src/gen/toru/v1/plugin";
import { WatchEventsResponse } from "../src/gen/toru/v1/plugin_service";
import { Daemon, Reader, startDaemon, waitRunning } from "./daemon";

let daemon: Daemon;
let client: Client;

before(async () => {
  daemon = await startDaemon();
  client = connect({ address: daemon.address, dataDir: daemon.dataDir });
  await waitRunning(client, ["hello", "py-echo"]);
});

after(async () => {
  client?.close();
  await daemon?.stop();
});

describe("torud through the generated TypeScript client", () => {
  test("lists plugins", async () => {
    const r = await unary(client.plugins, client.plugins.listPlugins, { pageSize: 0, pageToken: "" });
    assert.deepEqual(r.plugins.map((p) => p.id), ["hello", "py-echo"]);
    assert.equal(r.plugins[0].state, PluginState.PLUGIN_STATE_RUNNING);
    assert.ok(r.plugins[0].pid > 0 && r.plugins[0].healthy);
  });

  test("disables and enables a plugin", async () => {
    const off = await unary(client.plugins, client.plugins.disablePlugin, { pluginId: "hello" });
    assert.equal(off.plugin?.state, PluginState.PLUGIN_STATE_STOPPED);
    assert.equal(off.plugin?.enabled, false);
    const on = await unary(client.plugins, client.plugins.enablePlugin, { pluginId: "hello" });
    assert.equal(on.plugin?.state, PluginState.PLUGIN_STATE_RUNNING);
    assert.ok((on.plugin?.pid ?? 0) > 0);
  });

  test("an unknown plugin is NOT_FOUND", async () => {
    await assert.rejects(unary(client.plugins, client.plugins.getPlugin, { pluginId: "nope" }),
      (e: grpc.ServiceError) => e.code === grpc.status.NOT_FOUND && e.details.includes("nope"));
  });

  test("KV round trip", async () => {
    const kv = client.kv;
    await unary(kv, kv.setValue, { pluginId: "hello", key: "color", value: "blue" });
    assert.deepEqual(await unary(kv, kv.getValue, { pluginId: "hello", key: "color" }),
      { found: true, value: "blue" });
    await unary(kv, kv.deleteValue, { pluginId: "hello", key: "color" });
    assert.deepEqual(await unary(kv, kv.getValue, { pluginId: "hello", key: "color" }),
      { found: false, value: "" });
  });

  test("calls a plugin", async () => {
    const r = await unary(client.plugins, client.plugins.callPlugin, {
      pluginId: "py-echo", method: "POST", path: "/echo?x=1",
      headers: [{ name: "content-type", value: "text/plain" }], body: Buffer.from("hello"),
    });
    assert.equal(r.status, 200);
    assert.deepEqual(JSON.parse(Buffer.from(r.body).toString()),
      { method: "POST", path: "/echo?x=1", body: "hello" });
  });

  test("queries logs a page at a time", async () => {
    const request = QueryLogsRequest.fromPartial({ filter: { pluginIds: ["py-echo"] }, pageSize: 2 });
    const records: LogRecord[] = [];
    let pages = 0;
    for (;;) {
      const page = await unary(client.logs, client.logs.queryLogs, request);
      assert.ok(page.records.length <= 2);
      records.push(...page.records);
      pages++;
      if (!page.nextPageToken) break;
      request.pageToken = page.nextPageToken;
    }
    assert.ok(pages > 1);
    const seqs = records.map((r) => r.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
    const ready = records.find((r) => r.message === "running: ready");
    assert.equal(ready?.stream, LogStream.LOG_STREAM_SUPERVISOR);
  });

  test("follows logs, then resumes after a cursor", async () => {
    const filter = { pluginIds: ["hello"], minLevel: 0, contains: "" };
    const follow = new Reader(client.logs.streamLogs({ filter, tail: 1, follow: true }));
    const [firstBatch] = await follow.until(() => true);
    const first = firstBatch.records[0];
    await unary(client.plugins, client.plugins.restartPlugin, { pluginId: "hello" });
    const batches = await follow.until((b: StreamLogsResponse) =>
      b.records.some((r) => r.message === "running: ready"));
    follow.cancel();
    const followed = batches.flatMap((b) => b.records);
    assert.deepEqual(followed.map((r) => r.seq), followed.map((_, i) => first.seq + 1 + i));

    const resumed = client.logs.streamLogs({ filter, afterCursors: { cursors: [first.cursor] }, follow: false });
    const again: LogRecord[] = [];
    for await (const b of resumed as AsyncIterable<StreamLogsResponse>) again.push(...b.records);
    assert.deepEqual(again.slice(0, followed.length).map((r) => r.cursor), followed.map((r) => r.cursor));
  });

  test("watches lifecycle events", async () => {
    const events = new Reader(client.plugins.watchEvents({ afterSeq: 0, pluginIds: ["py-echo"] }));
    const replayed = await events.until((r: WatchEventsResponse) =>
      r.event?.toState === PluginState.PLUGIN_STATE_RUNNING);
    const last = replayed[replayed.length - 1].event!.seq;
    await unary(client.plugins, client.plugins.restartPlugin, { pluginId: "py-echo" });
    const live = await events.until((r: WatchEventsResponse) =>
      r.event!.seq > last && r.event!.toState === PluginState.PLUGIN_STATE_RUNNING);
    events.cancel();
    const changes = live.map((r) => r.event!).filter((e) => e.seq > last && e.kind === EventKind.EVENT_KIND_STATE_CHANGED);
    assert.deepEqual([changes[0].fromState, changes[0].toState],
      [PluginState.PLUGIN_STATE_RUNNING, PluginState.PLUGIN_STATE_STOPPING]);
    assert.ok(changes.every((e) => e.pluginId === "py-echo"));
  });

  test("connects by the data dir over the control socket, without a token", async () => {
    const local = connect({ dataDir: daemon.dataDir });
    try {
      const r = await unary(local.plugins, local.plugins.listPlugins, { pageSize: 0, pageToken: "" });
      assert.equal(r.plugins.length, 2);
    } finally {
      local.close();
    }
  });

  test("over TCP, no token is UNAUTHENTICATED and the read token cannot write", async () => {
    const anonymous = connect({ address: daemon.address, token: "" });
    const reader = connect({
      address: daemon.address,
      token: fs.readFileSync(path.join(daemon.dataDir, "read.token"), "utf8").trim(),
    });
    try {
      await assert.rejects(unary(anonymous.plugins, anonymous.plugins.listPlugins, { pageSize: 0, pageToken: "" }),
        (e: grpc.ServiceError) => e.code === grpc.status.UNAUTHENTICATED);
      const r = await unary(reader.plugins, reader.plugins.listPlugins, { pageSize: 0, pageToken: "" });
      assert.equal(r.plugins.length, 2);
      await assert.rejects(unary(reader.kv, reader.kv.setValue, { pluginId: "hello", key: "k", value: "v" }),
        (e: grpc.ServiceError) => e.code === grpc.status.PERMISSION_DENIED);
    } finally {
      anonymous.close();
      reader.close();
    }
  });
});
