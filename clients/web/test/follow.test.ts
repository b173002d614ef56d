/**
 * The resuming followers (followEvents, followLogs) over gRPC-Web against the real daemon:
 * they survive a cold restart (SIGTERM, then a new daemon on the same port and data
 * directory) while following `clients/chatty-plugin.py`, with no duplicate and nothing
 * lost, and events after the restart arrive; an error other than UNAVAILABLE (an invalid
 * plugin id: INVALID_ARGUMENT) is raised at once, after one request. Waits use deadlines,
 * never sleeps.
 */
import { describe, test } from "node:test";
import * as assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import * as readline from "node:readline";
import { Code, ConnectError } from "@connectrpc/connect";
import { type ToruClient, createToruClient, followEvents, followLogs } from "../src";
import type { LogRecord, StreamLogsResponse } from "../src/gen/toru/v1/log_service_pb";
import { PluginState } from "../src/gen/toru/v1/plugin_pb";
import type { WatchEventsResponse } from "../src/gen/toru/v1/plugin_service_pb";
import { ROOT } from "./daemon";

const TARGET = process.env.CARGO_TARGET_DIR ?? path.join(ROOT, "target");

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
  readonly dir = fs.mkdtempSync(path.join(os.tmpdir(), "torud-web-follow-"));
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

  get baseUrl(): string {
    return `http://${this.address}`;
  }

  token(role: "admin" | "read"): string {
    return fs.readFileSync(path.join(this.dataDir, `${role}.token`), "utf8").trim();
  }

  async start(): Promise<void> {
    const torud = process.env.TORUD_BIN ?? path.join(TARGET, "debug", "torud");
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

/** Replays and follows events until `id` is RUNNING. */
async function waitRunning(client: ToruClient, id: string): Promise<void> {
  const abort = new AbortController();
  const events = new Collector(followEvents(client.plugins, { afterSeq: 0n }, { signal: abort.signal }));
  try {
    await events.waitFor((items) => items.some((r) =>
      r.event?.pluginId === id && r.event.toState === PluginState.RUNNING));
  } finally {
    abort.abort();
    await events.done;
  }
}

const count = (batches: StreamLogsResponse[], ok: (r: LogRecord) => boolean = () => true) =>
  batches.reduce((n, b) => n + b.records.filter(ok).length, 0);

describe("followers against the real daemon, over gRPC-Web", () => {
  test("resume across a daemon restart with no duplicate and nothing lost", async () => {
    const daemon = new Restartable(`127.0.0.1:${await freePort()}`);
    await daemon.start();
    // Which methods were called, to see the followers resume (a refused connection included).
    const calls: string[] = [];
    const recording: typeof fetch = (input, init) => {
      calls.push(String(input).replace(/.*\//, ""));
      return fetch(input, init);
    };
    const client = createToruClient({ baseUrl: daemon.baseUrl, token: daemon.token("read"), fetch: recording });
    const abort = new AbortController();
    const options = { signal: abort.signal };
    let events: Collector<WatchEventsResponse> | undefined;
    let logs: Collector<StreamLogsResponse> | undefined;
    try {
      await waitRunning(client, "chatty");
      events = new Collector(followEvents(client.plugins, { afterSeq: 0n }, options));
      logs = new Collector(followLogs(client.logs, {
        filter: { pluginIds: ["chatty"] }, start: { case: "tail", value: 5 },
      }, options));
      await logs.waitFor((b) => count(b) >= 20);
      await events.waitFor((items) => items.some((r) => r.event?.toState === PluginState.RUNNING));
      const opened = calls.length;
      await daemon.stop();
      const before = events.items.reduce((max, r) => (r.event && r.event.seq > max ? r.event.seq : max), 0n);
      const oldPids = new Set(logs.items.flatMap((b) => b.records.map((r) => r.pid)));
      await daemon.start();
      // Events after the restart arrive: chatty runs again.
      await events.waitFor((items) => items.some((r) => (r.event?.seq ?? 0n) > before
        && r.event?.pluginId === "chatty" && r.event.toState === PluginState.RUNNING));
      // And its new run's lines arrive, after everything the old one wrote.
      await logs.waitFor((b) => count(b, (r) => !oldPids.has(r.pid) && r.message.startsWith("tick")) >= 5);

      // Each follower opened its stream again on the new daemon.
      const resumed = calls.slice(opened);
      assert.ok(resumed.includes("WatchEvents") && resumed.includes("StreamLogs"), `calls after the stop: ${resumed}`);
      assert.ok(events.items.every((r) => r.gap === undefined));
      const eventSeqs = events.items.map((r) => r.event!.seq);
      assert.ok(eventSeqs.every((s, i) => i === 0 || s > eventSeqs[i - 1]), `event seqs: ${eventSeqs}`);
      assert.ok(logs.items.every((b) => b.gap === undefined));
      const seqs = logs.items.flatMap((b) => b.records.map((r) => r.seq));
      // Strictly increasing and contiguous: no duplicate, nothing lost across the restart.
      assert.deepEqual(seqs, seqs.map((_, i) => seqs[0] + BigInt(i)));
    } finally {
      abort.abort();
      await events?.done;
      await logs?.done;
      await daemon.stop();
      fs.rmSync(daemon.dir, { recursive: true, force: true });
    }
  });

  test("INVALID_ARGUMENT is raised at once, after one request", async () => {
    const daemon = new Restartable(`127.0.0.1:${await freePort()}`);
    await daemon.start();
    try {
      let requests = 0;
      const counting: typeof fetch = (input, init) => {
        requests++;
        return fetch(input, init);
      };
      const client = createToruClient({ baseUrl: daemon.baseUrl, token: daemon.token("read"), fetch: counting });
      const invalid = (e: unknown) => {
        assert.ok(e instanceof ConnectError, `expected a ConnectError, got ${e}`);
        assert.equal(e.code, Code.InvalidArgument, `got ${Code[e.code]}: ${e.message}`);
        return true;
      };
      const drain = async <T>(follower: AsyncGenerator<T>) => {
        for await (const _ of follower) assert.fail("yielded something");
      };
      const started = Date.now();
      await assert.rejects(drain(followLogs(client.logs, { filter: { pluginIds: ["Not A Plugin!"] } })), invalid);
      assert.equal(requests, 1);
      await assert.rejects(drain(followEvents(client.plugins, { pluginIds: ["Not A Plugin!"] })), invalid);
      assert.equal(requests, 2);
      assert.ok(Date.now() - started < 5000, "raised without retrying");
    } finally {
      await daemon.stop();
      fs.rmSync(daemon.dir, { recursive: true, force: true });
    }
  });
});
