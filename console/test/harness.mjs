// The browser tests' harness: the real torud (built by cargo) with real plugins, a TCP proxy
// in front of it whose connections the tests can cut, and Debian's Chromium driven headless
// by playwright-core (no browser is downloaded). Every wait has a deadline; none is a sleep.
import * as assert from "node:assert/strict";
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import * as readline from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const TARGET = process.env.CARGO_TARGET_DIR ? path.resolve(process.env.CARGO_TARGET_DIR) : path.join(ROOT, "target");
/** Screenshots of failures (and of every scenario, for the README) go here. */
export const OUTPUT = path.join(TARGET, "console-tests");
const SDK = path.join(ROOT, "plugin-sdk/python");
const FIXTURES = path.join(ROOT, "console/test/fixtures/plugins.py");

/**
 * Starts the daemon with `hello` (the Rust example) and the fixture plugins, all enabled,
 * with a 3 s first restart delay so that a crash's countdown is there to see.
 */
export async function startDaemon() {
  const torud = process.env.TORUD_BIN ?? path.join(TARGET, "debug", "torud");
  const hello = path.join(TARGET, "debug", "examples", "hello-plugin");
  for (const file of [torud, hello]) {
    assert.ok(fs.existsSync(file), `${file} is missing: run \`cargo build --bins --examples\``);
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "torud-console-"));
  // Run as root, torud runs each plugin under its own uid, which must reach its executable.
  fs.chmodSync(dir, 0o755);
  const plugins = path.join(dir, "plugins");
  const dataDir = path.join(dir, "data");
  fs.mkdirSync(plugins);
  fs.copyFileSync(hello, path.join(plugins, "hello.binary"));
  for (const fixture of ["toru-ui", "broken-ui", "chatty"]) {
    const wrapper = path.join(plugins, `${fixture}.binary`);
    fs.writeFileSync(wrapper, `#!/bin/sh\nFIXTURE=${fixture} PYTHONPATH=${SDK} exec python3 ${FIXTURES} "$@"\n`);
    fs.chmodSync(wrapper, 0o755);
  }
  const stderrPath = path.join(dir, "daemon.stderr");
  const stderr = fs.openSync(stderrPath, "w");
  const child = spawn(
    torud,
    ["serve", "--listen", "127.0.0.1:0", "--plugins-dir", plugins, "--data-dir", dataDir,
      "--enable-new-plugins", "--backoff-base", "3s"],
    { stdio: ["ignore", "pipe", stderr] },
  );
  const lines = readline.createInterface({ input: child.stdout });
  const first = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("torud did not report listening within 20 s")), 20_000);
    lines.once("line", (line) => { clearTimeout(timer); resolve(line); });
    child.once("exit", (code) => reject(new Error(`torud exited with ${code} before listening`)));
  });
  assert.match(first, /^torud listening on /);
  const address = first.replace("torud listening on ", "").trim();
  return {
    address,
    url: `http://${address}/`,
    dataDir,
    token: (role) => fs.readFileSync(path.join(dataDir, `${role}.token`), "utf8").trim(),
    stderr: () => fs.readFileSync(stderrPath, "utf8"),
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((resolve) => child.once("exit", resolve));
        child.kill("SIGTERM");
        await exited;
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A TCP proxy to `address` whose open connections `cut()` closes at once. */
export async function startProxy(address) {
  const [host, port] = [address.slice(0, address.lastIndexOf(":")), Number(address.slice(address.lastIndexOf(":") + 1))];
  const open = new Set();
  let cuts = 0;
  const server = net.createServer((client) => {
    const upstream = net.connect(port, host);
    const pair = { client, upstream };
    open.add(pair);
    client.pipe(upstream).pipe(client);
    const close = () => {
      open.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", close).on("close", close);
    upstream.on("error", close).on("close", close);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}/`,
    /** Closes every connection open now; returns how many. */
    cut() {
      const n = open.size;
      for (const { client, upstream } of [...open]) {
        client.resetAndDestroy?.() ?? client.destroy();
        upstream.destroy();
      }
      cuts += n;
      return n;
    },
    get cuts() { return cuts; },
    async stop() {
      for (const { client, upstream } of open) { client.destroy(); upstream.destroy(); }
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Chromium from Debian (`/usr/bin/chromium`, or CHROMIUM), headless, with a fresh profile. */
export async function launchBrowser() {
  const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
  assert.ok(fs.existsSync(executablePath), `${executablePath} is missing: apt-get install chromium`);
  return chromium.launch({
    executablePath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

/**
 * A new page that records what the console writes to the browser's console and any
 * uncaught error; `errors()` is what a test expects to be empty.
 */
export async function openPage(browser, options = {}) {
  const context = await browser.newContext({ viewport: options.viewport ?? { width: 1280, height: 800 } });
  const page = await context.newPage();
  const errors = [];
  page.on("console", (msg) => {
    if (msg.type() === "error") errors.push(`console: ${msg.text()}`);
  });
  page.on("pageerror", (err) => errors.push(`page error: ${err.message}`));
  page.setDefaultTimeout(20_000);
  return { page, context, errors: () => errors };
}

/** Signs in with `token` on the console at `url` and waits for the plugins table. */
export async function signIn(page, url, token) {
  await page.goto(url);
  await page.getByLabel("Token").fill(token);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { name: "Plugins" }).waitFor();
}

/**
 * Runs `body` with a fresh page; on failure saves a screenshot under OUTPUT named after the
 * scenario (and the daemon's stderr beside it), then fails. `body` gets `shot(name)`, which
 * saves a screenshot of the page as it is into TORUD_SCREENSHOTS when that names a
 * directory (`docs/screenshots`, for the README) and does nothing otherwise.
 */
export async function scenario(t, browser, daemon, name, body, options) {
  const { page, context, errors } = await openPage(browser, options);
  fs.mkdirSync(OUTPUT, { recursive: true });
  const shot = async (file) => {
    const dir = process.env.TORUD_SCREENSHOTS;
    if (!dir) return;
    fs.mkdirSync(dir, { recursive: true });
    await page.screenshot({ path: path.join(dir, `${file}.png`) });
  };
  try {
    await body(page, errors, shot);
  } catch (e) {
    await page.screenshot({ path: path.join(OUTPUT, `${name}.png`), fullPage: true }).catch(() => {});
    fs.writeFileSync(path.join(OUTPUT, `${name}.daemon.stderr`), daemon.stderr());
    t.diagnostic(`screenshot: ${path.join(OUTPUT, `${name}.png`)}`);
    throw e;
  } finally {
    await context.close();
  }
}

/** Waits until `check()` holds (polling the page's state, at most `ms`), or fails with `what`. */
export async function eventually(what, check, ms = 20_000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      if (await check()) return;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${last.message}` : ""}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
