/**
 * The README's browser example, run as written against a daemon started here (only the
 * URL, the token and the package name, which points at this build, are swapped):
 * type-checked and transpiled with the TypeScript compiler, then run by node, whose
 * `fetch` stands in for the browser's.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as ts from "typescript";
import { type Daemon, ROOT, startDaemon } from "./daemon";

let daemon: Daemon;

before(async () => {
  daemon = await startDaemon();
});

after(async () => {
  await daemon?.stop();
});

function readmeBlock(name: string): string {
  const text = fs.readFileSync(path.join(ROOT, "README.md"), "utf8");
  const after = text.split(`<!-- readme-test: ${name} -->`)[1];
  assert.ok(after, `README.md has no readme-test: ${name} block`);
  const body = after.trimStart().split("\n").slice(1).join("\n");
  return body.split("\n```")[0];
}

test("the README example type-checks and runs as written", () => {
  const block = readmeBlock("web");
  assert.ok(block.includes("http://127.0.0.1:50051") && block.includes("THE_TOKEN"));
  const source = block
    .replaceAll("http://127.0.0.1:50051", daemon.baseUrl)
    .replaceAll("THE_TOKEN", daemon.token("read"));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "toru-web-readme-"));
  try {
    const file = path.join(dir, "example.ts");
    fs.writeFileSync(file, source);
    // Type-check against this package's sources, as "@toru/web-client", with the browser's
    // library (DOM) and not Node's.
    const pkg = path.resolve(__dirname, "../..");
    const program = ts.createProgram([file], {
      module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, strict: true, noEmit: true,
      skipLibCheck: true, lib: ["lib.es2022.d.ts", "lib.dom.d.ts"], types: [],
      baseUrl: pkg, paths: { "@toru/web-client": ["src/index.ts"], "*": ["node_modules/*"] },
    });
    const problems = ts.getPreEmitDiagnostics(program)
      .map((d) => ts.flattenDiagnosticMessageText(d.messageText, "\n"));
    assert.deepEqual(problems, []);
    // Run it against this build.
    const js = ts.transpileModule(
      source.replace('"@toru/web-client"', JSON.stringify(path.resolve(__dirname, "../src/index.js"))),
      { compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022 } });
    const out = path.join(dir, "example.js");
    fs.writeFileSync(out, js.outputText);
    const printed = execFileSync(process.execPath, [out], { encoding: "utf8", timeout: 60_000 });
    assert.deepEqual(printed.trim().split("\n"), ["[ 'hello' ]"]);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
