#!/usr/bin/env bash
# Runs torud on 127.0.0.1:50051 with the bundled example plugins (the Rust `hello` plugin and
# the Python `py-echo` plugin) installed and enabled. Extra arguments go to `torud serve`.
# Plugins live in target/example-plugins, state and logs in target/example-data. Also builds
# toructl (target/release/toructl).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
# shellcheck source=examples/traversable.sh
source examples/traversable.sh
mkdir -p "$target"
traversable .
traversable "$target"
cargo build --release --bin torud --bin toructl --example hello-plugin
plugins="$target/example-plugins"
mkdir -p "$plugins"
cp "$target/release/examples/hello-plugin" "$plugins/hello.binary"
# The Python example needs its SDK on PYTHONPATH (or `pip install plugin-sdk/python`).
printf '#!/bin/sh\nPYTHONPATH=%s exec python3 %s "$@"\n' \
  "$PWD/plugin-sdk/python" "$PWD/examples/python/py-echo.binary" >"$plugins/py-echo.binary"
chmod +x "$plugins/py-echo.binary"
exec "$target/release/torud" serve \
  --plugins-dir "$plugins" \
  --data-dir "$target/example-data" \
  --enable-new-plugins \
  "$@"
