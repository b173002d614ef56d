/**
 * Test harness, the same approach as clients/typescript/test/daemon.ts: the real torud
 * (built by cargo) with the Rust `hello` example plugin in a temporary directory; start
 * waits for the "listening" line with a deadline, stop sends SIGTERM and waits for the
 * exit. `Reader` waits on a server stream's messages with a deadline, never a sleep.
 */
import * as assert from "node:assert/strict";
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as readline from "node:readline";

/** The repository root (this file runs from clients/web/dist/test). */
export const ROOT = path.resolve(__dirname, "../../../..");
const TARGET = process.env.CARGO_TARGET_DIR ?? path.join(ROOT, "target");

export interface Daemon {
  /** The TCP listener as a URL, for `createToruClient`. */
  baseUrl: string;
  dataDir: string;
  /** A token the daemon generated into its data directory (`admin` or `read`). */
  token(role: "admin" | "read"): string;
  stop(): Promise<void>;
}

/** Starts the daemon with `hello` in its plugins directory, not enabled (no `--enable-new-plugins`). */
export async function startDaemon(): Promise<Daemon> {
  const torud = process.env.TORUD_BIN ?? path.join(TARGET, "debug", "torud");
  const hello = path.join(TARGET, "debug", "examples", "hello-plugin");
  for (const file of [torud, hello]) {
    assert.ok(fs.existsSync(file), `${file} is missing: run \`cargo build --bins --examples\``);
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "torud-web-"));
  // Run as root, torud runs each plugin under its own uid, which must reach its executable.
  fs.chmodSync(dir, 0o755);
  const plugins = path.join(dir, "plugins");
  const dataDir = path.join(dir, "data");
  fs.mkdirSync(plugins);
  fs.copyFileSync(hello, path.join(plugins, "hello.binary"));
  const stderr = fs.openSync(path.join(dir, "daemon.stderr"), "w");
  const child = spawn(torud, ["serve", "--listen", "127.0.0.1:0", "--plugins-dir", plugins,
    "--data-dir", dataDir], { stdio: ["ignore", "pipe", stderr] });
  const lines = readline.createInterface({ input: child.stdout! });
  const first = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("torud did not report listening within 20 s")), 20_000);
    lines.once("line", (line) => { clearTimeout(timer); resolve(line); });
    child.once("exit", (code) => reject(new Error(`torud exited with ${code} before listening`)));
  });
  assert.match(first, /^torud listening on /);
  return {
    baseUrl: `http://${first.replace("torud listening on ", "")}`,
    dataDir,
    token: (role) => fs.readFileSync(path.join(dataDir, `${role}.token`), "utf8").trim(),
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGTERM");
      await exited;
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Reads a server stream opened with `abort.signal`, so that several waits can read it in turn. */
export class Reader<T> {
  private readonly messages: AsyncIterator<T>;
  private pending: Promise<IteratorResult<T>> | null = null;

  constructor(open: (signal: AbortSignal) => AsyncIterable<T>, private readonly abort = new AbortController()) {
    this.messages = open(abort.signal)[Symbol.asyncIterator]();
  }

  /** Messages up to the first for which `done` holds; fails after `ms` or when the stream ends. */
  async until(done: (msg: T) => boolean, ms = 20_000): Promise<T[]> {
    const seen: T[] = [];
    const deadline = Date.now() + ms;
    const show = () => JSON.stringify(seen, (_, v) => (typeof v === "bigint" ? v.toString() : v));
    for (;;) {
      // A read cut short by the deadline is still pending; the next wait takes it over.
      this.pending ??= this.messages.next();
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<"timeout">((resolve) => {
        timer = setTimeout(() => resolve("timeout"), Math.max(0, deadline - Date.now()));
      });
      const next = await Promise.race([this.pending, timeout]).finally(() => clearTimeout(timer));
      if (next === "timeout") throw new Error(`timed out after ${ms} ms; saw ${show()}`);
      this.pending = null;
      if (next.done) throw new Error(`the stream ended before the condition held; saw ${show()}`);
      seen.push(next.value);
      if (done(next.value)) return seen;
    }
  }

  /** Cancels the stream (the daemon sees the request end). */
  cancel(): void {
    this.abort.abort();
    // The read left pending, if any, now fails with CANCELED; nobody waits for it.
    this.pending?.catch(() => {});
  }
}
