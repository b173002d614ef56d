// Builds the console into dist/ (index.html, console.js, console.css, favicon.svg), the files
// the daemon embeds with include_bytes! (src/api/console.rs). `--check` builds into a
// temporary directory instead and fails if anything differs from the checked-in dist/, so a
// change to src/ without a rebuild (or a hand-edited bundle) is caught, as
// clients/generate.sh --check does for the generated clients.
import * as esbuild from "esbuild";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const check = process.argv.includes("--check");
const out = check ? fs.mkdtempSync(path.join(os.tmpdir(), "torud-console-")) : path.join(here, "dist");

// The browser client's sources live in clients/web; their packages must come from this
// package's node_modules, whether or not clients/web has its own, so that the bundle is the
// same on every machine and holds one copy of each.
const ownPackages = {
  name: "own-packages",
  setup(build) {
    build.onResolve({ filter: /^@(bufbuild|connectrpc)\// }, (args) => {
      if (args.pluginData === "own") return undefined;
      return build.resolve(args.path, { kind: args.kind, resolveDir: here, pluginData: "own" });
    });
  },
};

fs.mkdirSync(out, { recursive: true });
await esbuild.build({
  entryPoints: { console: path.join(here, "src/main.tsx") },
  bundle: true,
  minify: true,
  format: "iife",
  target: ["chrome110", "firefox110", "safari16"],
  jsx: "automatic",
  legalComments: "none",
  charset: "utf8",
  outdir: out,
  plugins: [ownPackages],
  logLevel: "warning",
  define: { "process.env.NODE_ENV": '"production"' },
});
for (const file of ["index.html", "favicon.svg"]) {
  fs.copyFileSync(path.join(here, "static", file), path.join(out, file));
}

if (check) {
  const dist = path.join(here, "dist");
  const names = (dir) => fs.readdirSync(dir).sort();
  const differ = [];
  for (const name of new Set([...names(out), ...names(dist)])) {
    const a = path.join(out, name);
    const b = path.join(dist, name);
    if (!fs.existsSync(a) || !fs.existsSync(b) || !fs.readFileSync(a).equals(fs.readFileSync(b))) {
      differ.push(name);
    }
  }
  fs.rmSync(out, { recursive: true, force: true });
  if (differ.length) {
    console.error(`console/dist is out of date (${differ.join(", ")}): run \`npm run build\` in console/ and commit dist/`);
    process.exit(1);
  }
  console.log("console/dist matches console/src");
}
