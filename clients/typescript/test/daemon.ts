/**
 * Test harness: the real torud (built by cargo) with the Rust `hello` and Python `py-echo`
 * example plugins in a temporary directory; start waits for the "listening" line with a
 * deadline, stop sends SIGTERM and waits for the exit.
 */
import * as assert from "node:assert/strict";
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as readline from "node:readline";
import * as grpc from "@grpc/grpc-js";
import { Client } from "../src";
import { PluginState } from "../src/gen/toru/v1/plugin";
import { WatchEventsResponse } from "../src/gen/toru/v1/plugin_service";

/** The repository root (this file runs from clients/typescript/dist/test). */
export const ROOT = path.resolve(__dirname, "../../../..");
const TARGET = process.env.CARGO_TARGET_DIR ?? path.join(ROOT, "target");

export interface Daemon {
  address: string;
  dataDir: string;
  stop(): Promise<void>;
}

/** Starts the daemon; `extraArgs` may add flags (it gets the temporary directory). */
export async function startDaemon(extraArgs: (dir: string) => string[] = () => []): Promise<Daemon> {
  const torud = process.env.TORUD_BIN ?? path.join(TARGET, "debug", "torud");
  const hello = path.join(TARGET, "debug", "examples", "hello-plugin");
  for (const file of [torud, hello]) {
    assert.ok(fs.existsSync(file), `${file} is missing: run \`cargo build --bins --examples\``);
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "torud-ts-"));
  // Run as root, torud runs each plugin under its own uid, which must reach its executable.
  fs.chmodSync(dir, 0o755);
  const plugins = path.join(dir, "plugins");
  const dataDir = path.join(dir, "data");
  fs.mkdirSync(plugins);
  fs.copyFileSync(hello, path.join(plugins, "hello.binary"));
  // A wrapper runs the example in place, where it finds whatever it imports.
  const pyEcho = path.join(ROOT, "examples/python/py-echo.binary");
  fs.writeFileSync(path.join(plugins, "py-echo.binary"), `#!/bin/sh\nexec python3 "${pyEcho}" "$@"\n`, { mode: 0o755 });
  const stderr = fs.openSync(path.join(dir, "daemon.stderr"), "w");
  const child = spawn(torud, ["serve", "--listen", "127.0.0.1:0", "--plugins-dir", plugins,
    "--data-dir", dataDir, "--enable-new-plugins", ...extraArgs(dir)], { stdio: ["ignore", "pipe", stderr] });
  const lines = readline.createInterface({ input: child.stdout! });
  const first = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("torud did not report listening within 20 s")), 20_000);
    lines.once("line", (line) => { clearTimeout(timer); resolve(line); });
    child.once("exit", (code) => reject(new Error(`torud exited with ${code} before listening`)));
  });
  assert.match(first, /^torud listening on /);
  return {
    address: first.replace("torud listening on ", ""),
    dataDir,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGTERM");
      await exited;
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Buffers a server stream's messages so that several waits can read it in turn. */
export class Reader<T> {
  private queue: T[] = [];
  private ended: Error | null = null;
  private wake: (() => void) | null = null;

  constructor(readonly stream: grpc.ClientReadableStream<T>) {
    stream.on("data", (msg: T) => { this.queue.push(msg); this.wake?.(); });
    stream.on("error", (e: Error) => { this.ended = e; this.wake?.(); });
    stream.on("end", () => { this.ended ??= new Error("stream ended"); this.wake?.(); });
  }

  /** Messages up to the first for which `done` holds; fails after `ms`. */
  async until(done: (msg: T) => boolean, ms = 20_000): Promise<T[]> {
    const seen: T[] = [];
    const deadline = Date.now() + ms;
    for (;;) {
      while (this.queue.length) {
        const msg = this.queue.shift()!;
        seen.push(msg);
        if (done(msg)) return seen;
      }
      if (this.ended) throw new Error(`${this.ended.message} before the condition held; saw ${JSON.stringify(seen)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${ms} ms; saw ${JSON.stringify(seen)}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => { clearTimeout(timer); resolve(); };
      });
      this.wake = null;
    }
  }

  cancel(): void {
    this.stream.cancel();
  }
}

/** Replays and follows events until every plugin in `ids` is RUNNING. */
export async function waitRunning(client: Client, ids: string[]): Promise<void> {
  const missing = new Set(ids);
  const events = new Reader(client.plugins.watchEvents({ afterSeq: 0, pluginIds: [] }));
  await events.until((r: WatchEventsResponse) => {
    if (r.event?.toState === PluginState.PLUGIN_STATE_RUNNING) missing.delete(r.event.pluginId);
    return missing.size === 0;
  });
  events.cancel();
}
