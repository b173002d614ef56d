// The console in a real headless Chromium against the real daemon and real plugins: sign-in,
// the live table, lifecycle actions, a crash seen live, a log that resumes after a dropped
// connection, a read-only console, and Toru plugin UIs (a working one and a broken one).
import * as assert from "node:assert/strict";
import * as http from "node:http";
import { after, before, test } from "node:test";
import { eventually, launchBrowser, scenario, signIn, startDaemon, startProxy } from "./harness.mjs";

const FIXTURES = ["broken-ui", "chatty", "hello", "toru-ui"];
let daemon;
let browser;

before(async () => {
  daemon = await startDaemon();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await daemon?.stop();
});

const row = (page, id) => page.locator(`tr[data-plugin="${id}"]`);
const stateOf = (page, id) => row(page, id).locator("[data-state]").getAttribute("data-state");

async function allRunning(page) {
  for (const id of FIXTURES) {
    await row(page, id).locator('[data-state="running"]').waitFor();
  }
}

test("sign in, and the table shows every plugin running, live", async (t) => {
  await scenario(t, browser, daemon, "plugins", async (page, errors, shot) => {
    await page.goto(daemon.url);
    assert.equal(await page.title(), "Sign in · torud");
    const favicon = await page.locator('link[rel="icon"]').getAttribute("href");
    assert.equal((await page.request.get(daemon.url + favicon)).status(), 200);
    // A wrong token is refused with the API's words, and nothing is stored.
    await page.getByLabel("Token").fill("not-the-token-at-all");
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("alert").filter({ hasText: "UNAUTHENTICATED" }).waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem("torud.token")), null);

    await page.getByLabel("Token").fill(daemon.token("admin"));
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("heading", { name: "Plugins" }).waitFor();
    assert.equal(await page.title(), "Plugins · torud");
    await allRunning(page);
    await shot("plugins");
    assert.equal(await page.locator('[data-testid="role"]').textContent(), "admin");
    // The token is in this tab's session storage only: not in the URL, not in a cookie.
    assert.equal(await page.evaluate(() => sessionStorage.getItem("torud.token")), daemon.token("admin"));
    assert.ok(!page.url().includes(daemon.token("admin")));
    assert.deepEqual(await page.context().cookies(), []);
    // Signing out forgets it.
    await page.getByRole("button", { name: "Sign out" }).click();
    await page.getByLabel("Token").waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem("torud.token")), null);
    assert.deepEqual(errors(), []);
  });
});

test("disable and enable a plugin from the table", async (t) => {
  await scenario(t, browser, daemon, "disable-enable", async (page, errors) => {
    await signIn(page, daemon.url, daemon.token("admin"));
    await allRunning(page);
    await row(page, "hello").getByRole("button", { name: "Disable" }).click();
    await row(page, "hello").locator('[data-state="stopped"]').waitFor();
    await row(page, "hello").getByRole("button", { name: "Enable" }).click();
    await row(page, "hello").locator('[data-state="running"]').waitFor();
    assert.ok(Number(await row(page, "hello").locator('[data-field="pid"]').textContent()) > 0);
    assert.deepEqual(errors(), []);
  });
});

test("kill -9 a plugin: the crash, the countdown and the recovery appear without a reload", async (t) => {
  await scenario(t, browser, daemon, "crash", async (page, errors, shot) => {
    await signIn(page, daemon.url, daemon.token("admin"));
    await allRunning(page);
    const pid = Number(await row(page, "hello").locator('[data-field="pid"]').textContent());
    assert.ok(pid > 0);
    await row(page, "hello").getByRole("link").click();
    await page.locator('[data-testid="pid"]', { hasText: String(pid) }).waitFor();
    assert.equal(await page.title(), "hello · torud");
    await page.evaluate(() => { window.__noReload = true; });

    process.kill(pid, "SIGKILL");
    await page.locator('[data-testid="countdown"]').filter({ hasText: /Next restart in \d+ s/ }).waitFor();
    await page.locator('[data-testid="exit"]').filter({ hasText: "signal 9 (SIGKILL)" }).waitFor();
    await page.locator('[data-testid="events"] li').filter({ hasText: "running → crashed" }).waitFor();
    await shot("crash");
    await page.locator('[data-testid="state"]', { hasText: "running" }).waitFor({ timeout: 30_000 });
    const after = Number(await page.locator('[data-testid="pid"]').textContent());
    assert.ok(after > 0 && after !== pid, `a new process: ${pid} then ${after}`);
    assert.equal(await page.evaluate(() => window.__noReload), true, "the page was not reloaded");
    assert.deepEqual(errors(), []);
  });
});

test("a followed log resumes after a dropped connection with no duplicate and no gap", async (t) => {
  const proxy = await startProxy(daemon.address);
  t.after(() => proxy.stop());
  await scenario(t, browser, daemon, "log-resume", async (page, errors, shot) => {
    await signIn(page, proxy.url, daemon.token("admin"));
    await page.goto(`${proxy.url}#/plugins/chatty`);
    const records = page.locator('[data-testid="log"] [data-seq]');
    await page.waitForFunction(() => document.querySelectorAll('[data-testid="log"] [data-seq]').length >= 30);
    const before = await records.count();
    assert.ok(proxy.cut() >= 1, "the log stream went through the proxy");
    await page.locator('[data-testid="log-resumed"]').first().waitFor();
    // chatty writes a line every 20 ms: wait for well over a second of lines after the drop.
    await page.waitForFunction(
      (n) => document.querySelectorAll('[data-testid="log"] [data-seq]').length >= n,
      before + 100,
    );
    await shot("log");
    const seqs = (await records.evaluateAll((els) => els.map((e) => e.dataset.seq))).map(BigInt);
    for (let i = 1; i < seqs.length; i++) {
      assert.equal(seqs[i], seqs[i - 1] + 1n, `record ${i}: seq ${seqs[i - 1]} then ${seqs[i]}`);
    }
    const messages = await page.locator('[data-testid="log"] [data-seq] .m').allTextContents();
    const numbers = messages.filter((m) => /^line \d+$/.test(m)).map((m) => Number(m.slice(5)));
    for (let i = 1; i < numbers.length; i++) {
      assert.equal(numbers[i], numbers[i - 1] + 1, `line ${numbers[i - 1]} then ${numbers[i]}`);
    }

    // Pause holds new records back (and counts them); resume shows them.
    await page.getByRole("button", { name: "Pause" }).click();
    const held = async () => Number((await page.getByRole("button", { name: /^Resume/ }).textContent()).match(/\d+/)?.[0] ?? 0);
    await page.getByRole("button", { name: /^Resume \([1-9]\d* new\)$/ }).waitFor();
    const paused = await records.count();
    const heldThen = await held();
    await page.waitForFunction(
      (n) => Number(document.querySelector('button[aria-pressed="true"]').textContent.match(/\d+/)?.[0]) >= n,
      heldThen + 10,
    );
    assert.equal(await records.count(), paused, "nothing added while paused");
    assert.ok((await held()) >= heldThen + 10);
    await page.getByRole("button", { name: /^Resume/ }).click();
    await page.waitForFunction((n) => document.querySelectorAll('[data-testid="log"] [data-seq]').length > n, paused);

    // The text filter is the API's: only matching records come back.
    await page.getByLabel("Contains").fill("line 1");
    await page.getByLabel("Contains").press("Enter");
    await page.waitForFunction(() => {
      const shown = [...document.querySelectorAll('[data-testid="log"] [data-seq] .m')];
      return shown.length >= 5 && shown.every((m) => m.textContent.includes("line 1"));
    });
    // So is the level filter: every tenth chatty line is a warning, and only those come back.
    await page.getByLabel("Contains").fill("");
    await page.getByLabel("Contains").press("Enter");
    await page.getByLabel("Level").selectOption({ label: "warn and above" });
    await page.waitForFunction(() => {
      const shown = [...document.querySelectorAll('[data-testid="log"] [data-seq]')];
      return shown.length >= 3 && shown.every((r) => r.querySelector(".l").textContent === "warn");
    });
    const warned = await page.locator('[data-testid="log"] [data-seq] .m').allTextContents();
    assert.ok(warned.every((m) => /^line \d*0$/.test(m)), `only the warnings: ${warned}`);

    // Cutting the connection makes the browser log the failed requests; nothing else.
    assert.deepEqual(errors().filter((e) => !/net::ERR_|Failed to fetch|network error/i.test(e)), []);
  });
});

test("a read token sees a read-only console", async (t) => {
  await scenario(t, browser, daemon, "read-only", async (page, errors) => {
    await signIn(page, daemon.url, daemon.token("read"));
    await allRunning(page);
    assert.equal(await page.locator('[data-testid="role"]').textContent(), "read-only");
    for (const name of ["Disable", "Enable", "Restart", "Rescan"]) {
      assert.equal(await page.getByRole("button", { name, includeHidden: true }).count(), 0, `no ${name} button`);
    }
    await row(page, "hello").getByRole("link").click();
    await page.locator('[data-testid="state"]', { hasText: "running" }).waitFor();
    // Get is there (in a closed section, so hidden ones count): the check can see buttons.
    const buttons = (name) => page.getByRole("button", { name, exact: true, includeHidden: true }).count();
    assert.equal(await buttons("Get"), 1);
    for (const name of ["Disable", "Restart", "Set", "Delete", "Send"]) {
      assert.equal(await buttons(name), 0, `no ${name} button`);
    }
    assert.deepEqual(errors(), []);
  });
});

test("a Toru plugin UI mounts, uses api.fetch and api.kv, cannot reach another origin, and unmounts", async (t) => {
  // Another origin the UI will try to reach: the console's policy must stop the request
  // before it leaves the browser.
  let hits = 0;
  const other = http.createServer((_, res) => { hits++; res.end("reached"); });
  await new Promise((resolve) => other.listen(0, "127.0.0.1", resolve));
  t.after(() => other.close());
  await scenario(t, browser, daemon, "toru-ui", async (page, errors, shot) => {
    await signIn(page, daemon.url, daemon.token("admin"));
    await allRunning(page);
    await row(page, "toru-ui").getByRole("link").click();
    // The KV form on the plugin's page: the UI reads this key with api.kv.get.
    await page.getByText("Key-value store").click();
    await page.getByLabel("Key").fill("probe-url");
    await page.getByLabel("Value", { exact: true }).fill(`http://127.0.0.1:${other.address().port}/`);
    await page.getByRole("button", { name: "Set", exact: true }).click();
    await page.locator('[data-testid="kv-result"]', { hasText: "probe-url set" }).waitFor();

    await page.getByRole("link", { name: "Open UI" }).click();
    await page.locator("#greeting", { hasText: "hello console (yes)" }).waitFor();
    assert.equal(await page.title(), "toru-ui UI · torud");
    await page.locator("#save").click();
    await page.locator("#stored", { hasText: "saved by the UI" }).waitFor();
    await page.locator('.toast[data-kind="success"]', { hasText: "note saved" }).waitFor();
    await shot("toru-ui");

    await page.locator("#probe").click();
    await page.locator("#probe-result", { hasText: "blocked" }).waitFor();
    assert.equal(hits, 0, "the other origin was never reached");

    await page.locator("#away").click();
    await page.getByRole("heading", { name: "Plugins" }).waitFor();
    assert.equal(await page.evaluate(() => window.__toruUiUnmounts), 1, "unmounted on leaving");
    // The only console error is the browser reporting the policy's refusal.
    const unexpected = errors().filter((e) => !/Content Security Policy/.test(e));
    assert.deepEqual(unexpected, []);
    assert.ok(errors().some((e) => /connect-src/.test(e)), `the policy refused it: ${errors()}`);
  });
  // What the UI stored is in the plugin's KV, as the API sees it.
  assert.equal(hits, 0);
});

test("a broken bundle shows its error in the page, and the console stays usable", async (t) => {
  await scenario(t, browser, daemon, "broken-ui", async (page, errors) => {
    await signIn(page, daemon.url, daemon.token("admin"));
    await allRunning(page);
    await page.goto(`${daemon.url}#/plugins/broken-ui/ui`);
    await page.locator('[data-testid="ui-error"]', { hasText: "broken on purpose" }).waitFor();
    await page.getByRole("link", { name: "← broken-ui" }).click();
    await page.locator('[data-testid="state"]', { hasText: "running" }).waitFor();
    // A plugin without a UI says so.
    await page.goto(`${daemon.url}#/plugins/hello/ui`);
    await page.locator('[data-testid="ui-error"]', { hasText: "has no UI" }).waitFor();
    assert.deepEqual(errors(), []);
  });
});

test("on a phone-sized screen the table and a plugin's page fit, and a call can be made", async (t) => {
  await scenario(
    t,
    browser,
    daemon,
    "phone",
    async (page, errors, shot) => {
      await signIn(page, daemon.url, daemon.token("admin"));
      await allRunning(page);
      await shot("phone");
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      assert.ok(overflow <= 0, `no sideways scrolling (${overflow} px too wide)`);
      await page.goto(`${daemon.url}#/plugins/hello`);
      await page.getByText("Call", { exact: true }).click();
      await page.getByLabel("Path").fill("/hello");
      // Keyboard only: the form is sent with Enter.
      await page.getByLabel("Path").press("Enter");
      await page.locator('[data-testid="call-status"]', { hasText: "200" }).waitFor();
      assert.match(await page.locator('[data-testid="call-body"]').textContent(), /hello/i);
      assert.deepEqual(errors(), []);
    },
    { viewport: { width: 390, height: 844 } },
  );
});
