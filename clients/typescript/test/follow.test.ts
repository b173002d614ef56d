/**
 * The resuming followers (followEvents, followLogs): against fake servers, that UNAVAILABLE
 * resumes from the last seq or cursors yielded while other codes are thrown at once; and
 * against the real daemon, that they survive a cold restart (SIGTERM, then a new daemon on
 * the same port and data directory) with no duplicate and nothing lost. Waits use
 * deadlines, never sleeps.
 */
import { describe, test } from "node:test";
import * as assert from "node:assert/strict";
import { spawn, ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import * as readline from "node:readline";
import * as grpc from "@grpc/grpc-js";
import { connect, followEvents, followLogs } from "../src";
import { Event } from "../src/gen/toru/v1/event";
import {
  LogLevel, LogRecord, LogServiceService, StreamLogsRequest, StreamLogsResponse,
} from "../src/gen/toru/v1/log_service";
import { PluginState } from "../src/gen/toru/v1/plugin";
import {
  PluginServiceService, WatchEventsRequest, WatchEventsResponse,
} from "../src/gen/toru/v1/plugin_service";
import { ROOT, waitRunning } from "./daemon";

const UPGRADING = "the daemon is upgrading";

type Script<T> = [T[], grpc.status];

/** A server whose WatchEvents and StreamLogs play one script per call: messages, then a status. */
async function fakeServer(events: Script<WatchEventsResponse>[], logs: Script<StreamLogsResponse>[]) {
  const seen = { events: [] as WatchEventsRequest[], logs: [] as StreamLogsRequest[] };
  const play = <Req, Res>(scripts: Script<Res>[], requests: Req[]) =>
    (call: grpc.ServerWritableStream<Req, Res>) => {
      requests.push(call.request);
      const [messages, code] = scripts[Math.min(requests.length, scripts.length) - 1];
      for (const m of messages) call.write(m);
      call.emit("error", { code, details: code === grpc.status.UNAVAILABLE ? UPGRADING : "refused" });
    };
  const server = new grpc.Server();
  server.addService(PluginServiceService, { watchEvents: play(events, seen.events) } as never);
  server.addService(LogServiceService, { streamLogs: play(logs, seen.logs) } as never);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  const client = connect({ address: `127.0.0.1:${port}`, token: "t" });
  return {
    client,
    seen,
    close() {
      client.close();
      server.forceShutdown();
    },
  };
}

const event = (seq: number) => WatchEventsResponse.fromPartial({ event: Event.fromPartial({ seq, pluginId: "p" }) });
const record = (plugin: string, seq: number) => LogRecord.fromPartial({ pluginId: plugin, seq, cursor: `${plugin}:${seq}` });

async function collect<T>(follower: AsyncGenerator<T>): Promise<{ items: T[]; error: unknown }> {
  const items: T[] = [];
  try {
    for await (const item of follower) items.push(item);
  } catch (error) {
    return { items, error };
  }
  return { items, error: undefined };
}

describe("followers against a fake server", () => {
  test("a code other than UNAVAILABLE is thrown at once", async () => {
    const fake = await fakeServer([[[], grpc.status.PERMISSION_DENIED]], []);
    try {
      const started = Date.now();
      const { items, error } = await collect(followEvents(fake.client.plugins, { afterSeq: 0 }));
      assert.equal((error as grpc.ServiceError).code, grpc.status.PERMISSION_DENIED);
      assert.equal(items.length, 0);
      assert.equal(fake.seen.events.length, 1);
      assert.ok(Date.now() - started < 5000);
    } finally {
      fake.close();
    }
  });

  test("events resume after UNAVAILABLE from the last seq, with no duplicate, gaps passed on", async () => {
    const gap = WatchEventsResponse.fromPartial({ gap: { firstSeq: 3, lastSeq: 4, reason: "lost" } });
    const fake = await fakeServer([
      [[event(1), event(2)], grpc.status.UNAVAILABLE],
      [[event(2), gap, event(5)], grpc.status.INVALID_ARGUMENT],
    ], []);
    try {
      const { items, error } = await collect(followEvents(fake.client.plugins, { afterSeq: 0, pluginIds: ["p"] }));
      assert.equal((error as grpc.ServiceError).code, grpc.status.INVALID_ARGUMENT);
      assert.deepEqual(items.map((r) => r.event?.seq ?? `gap ${r.gap?.lastSeq}`), [1, 2, "gap 4", 5]);
      assert.deepEqual(fake.seen.events.map((r) => r.afterSeq), [0, 2]);
      assert.deepEqual(fake.seen.events.map((r) => r.pluginIds), [["p"], ["p"]]);
    } finally {
      fake.close();
    }
  });

  test("events give up after the reconnect window", async () => {
    const fake = await fakeServer([[[], grpc.status.UNAVAILABLE]], []);
    try {
      const started = Date.now();
      const { error } = await collect(followEvents(fake.client.plugins, {}, { reconnectWindowMs: 500 }));
      assert.equal((error as grpc.ServiceError).code, grpc.status.UNAVAILABLE);
      assert.ok((error as grpc.ServiceError).details.startsWith(UPGRADING));
      assert.ok(Date.now() - started >= 500 && fake.seen.events.length > 2);
      assert.equal(fake.seen.events[0].afterSeq, undefined);
    } finally {
      fake.close();
    }
  });

  test("logs resume with per-plugin cursors", async () => {
    const fake = await fakeServer([], [
      [[StreamLogsResponse.fromPartial({ records: [record("a", 1), record("a", 2), record("b", 7)] })],
        grpc.status.UNAVAILABLE],
      [[StreamLogsResponse.fromPartial({
        gap: { pluginId: "b", fromSeq: 8, toSeq: 9 },
        records: [record("a", 2), record("a", 3), record("b", 10)],
      })], grpc.status.UNAVAILABLE],
      [[], grpc.status.PERMISSION_DENIED],
    ]);
    try {
      const { items, error } = await collect(followLogs(fake.client.logs, {
        filter: { pluginIds: [], minLevel: LogLevel.LOG_LEVEL_INFO, contains: "" },
        afterCursors: { cursors: ["c:3"] },
      }));
      assert.equal((error as grpc.ServiceError).code, grpc.status.PERMISSION_DENIED);
      assert.deepEqual(items.map((b) => b.records.map((r) => r.cursor)), [["a:1", "a:2", "b:7"], ["a:3", "b:10"]]);
      assert.equal(items[1].gap?.toSeq, 9);
      assert.deepEqual(fake.seen.logs.map((r) => [...(r.afterCursors?.cursors ?? [])].sort()),
        [["c:3"], ["a:2", "b:7", "c:3"], ["a:3", "b:10", "c:3"]]);
      assert.ok(fake.seen.logs.every((r) => r.follow && r.filter?.minLevel === LogLevel.LOG_LEVEL_INFO));
    } finally {
      fake.close();
    }
  });
});

/** Runs a follower in the background, keeping what it yields; waits use deadlines. */
class Collector<T> {
  items: T[] = [];
  error: unknown;
  private wake: (() => void) | undefined;
  readonly done: Promise<void>;

  constructor(follower: AsyncGenerator<T>) {
    this.done = (async () => {
      try {
        for await (const item of follower) {
          this.items.push(item);
          this.wake?.();
        }
      } catch (e) {
        this.error = e;
        this.wake?.();
      }
    })();
  }

  async waitFor(ok: (items: T[]) => boolean, ms = 30_000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!ok(this.items)) {
      assert.equal(this.error, undefined, `the follower failed: ${this.error}`);
      const left = deadline - Date.now();
      assert.ok(left > 0, `timed out with ${this.items.length} items`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => { clearTimeout(timer); resolve(); };
      });
      this.wake = undefined;
    }
  }
}

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** torud with the chatty plugin (clients/chatty-plugin.py) on a fixed port and data directory. */
class Restartable {
  readonly dir = fs.mkdtempSync(path.join(os.tmpdir(), "torud-ts-follow-"));
  readonly plugins = path.join(this.dir, "plugins");
  readonly dataDir = path.join(this.dir, "data");
  child: ChildProcess | undefined;

  constructor(readonly address: string) {
    // Run as root, torud runs each plugin under its own uid, which must reach its executable.
    fs.chmodSync(this.dir, 0o755);
    fs.mkdirSync(this.plugins);
    fs.writeFileSync(path.join(this.plugins, "chatty.binary"),
      `#!/bin/sh\nexec python3 "${path.join(ROOT, "clients/chatty-plugin.py")}" "$@"\n`, { mode: 0o755 });
  }

  async start(): Promise<void> {
    const torud = process.env.TORUD_BIN ?? path.join(ROOT, "target", "debug", "torud");
    const stderr = fs.openSync(path.join(this.dir, "daemon.stderr"), "a");
    const child = spawn(torud, ["serve", "--listen", this.address, "--plugins-dir", this.plugins,
      "--data-dir", this.dataDir, "--enable-new-plugins"], { stdio: ["ignore", "pipe", stderr] });
    fs.closeSync(stderr);
    this.child = child;
    const lines = readline.createInterface({ input: child.stdout! });
    const first = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("torud did not report listening within 20 s")), 20_000);
      lines.once("line", (line) => { clearTimeout(timer); resolve(line); });
      child.once("exit", (code) => reject(new Error(`torud exited with ${code} before listening`)));
    });
    assert.equal(first, `torud listening on ${this.address}`);
    child.stdout!.resume();
  }

  async stop(): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGTERM");
    await exited;
  }
}

describe("followers against the real daemon", () => {
  test("resume across a daemon restart with no duplicate and nothing lost", async () => {
    const daemon = new Restartable(`127.0.0.1:${await freePort()}`);
    await daemon.start();
    const client = connect({ address: daemon.address, dataDir: daemon.dataDir });
    const abort = new AbortController();
    try {
      await waitRunning(client, ["chatty"]);
      const options = { signal: abort.signal };
      const events = new Collector(followEvents(client.plugins, { afterSeq: 0 }, options));
      const logs = new Collector(followLogs(client.logs, {
        filter: { pluginIds: ["chatty"], minLevel: LogLevel.LOG_LEVEL_UNSPECIFIED, contains: "" }, tail: 5,
      }, options));
      const count = (batches: StreamLogsResponse[], ok: (r: LogRecord) => boolean = () => true) =>
        batches.reduce((n, b) => n + b.records.filter(ok).length, 0);
      await logs.waitFor((b) => count(b) >= 20);
      await events.waitFor((items) => items.some((r) => r.event?.toState === PluginState.PLUGIN_STATE_RUNNING));
      await daemon.stop();
      const before = Math.max(...events.items.map((r) => r.event?.seq ?? 0));
      const oldPids = new Set(logs.items.flatMap((b) => b.records.map((r) => r.pid)));
      await daemon.start();
      // Events after the restart arrive: chatty runs again.
      await events.waitFor((items) => items.some((r) => (r.event?.seq ?? 0) > before
        && r.event?.pluginId === "chatty" && r.event.toState === PluginState.PLUGIN_STATE_RUNNING));
      // And its new run's lines arrive, after everything the old one wrote.
      await logs.waitFor((b) => count(b, (r) => !oldPids.has(r.pid) && r.message.startsWith("tick")) >= 5);

      assert.ok(events.items.every((r) => r.gap === undefined));
      const eventSeqs = events.items.map((r) => r.event!.seq);
      assert.deepEqual(eventSeqs, [...new Set(eventSeqs)].sort((a, b) => a - b));
      assert.ok(logs.items.every((b) => b.gap === undefined));
      const seqs = logs.items.flatMap((b) => b.records.map((r) => r.seq));
      // Strictly increasing and contiguous: no duplicate, nothing lost across the restart.
      assert.deepEqual(seqs, seqs.map((_, i) => seqs[0] + i));
    } finally {
      abort.abort();
      client.close();
      await daemon.stop();
      fs.rmSync(daemon.dir, { recursive: true, force: true });
    }
  });
});
