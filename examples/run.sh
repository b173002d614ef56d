#!/usr/bin/env bash
# Runs torud on 127.0.0.1:50051 with the bundled example plugins (the Rust `hello` plugin and
# the Python `py-echo` plugin) installed and enabled. Extra arguments go to `torud serve`.
# Plugins live in target/example-plugins, state and logs in target/example-data. Also builds
# toructl (target/release/toructl).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
# Run as root, torud runs each plugin under its own unprivileged uid, which must be able to
# traverse the directories leading to the plugins (and to the files a script plugin reads).
# A checkout under a 0700 directory (a home directory, `mktemp -d`) would hide them: let
# those directories be traversed (o+x only: nothing becomes listable or readable).
traversable() {
  [ "$(id -u)" = 0 ] || return 0
  local dir
  dir="$(cd "$1" && pwd)"
  while [ "$dir" != / ]; do
    if [ -z "$(find "$dir" -maxdepth 0 -perm -o+x)" ]; then
      printf 'note: chmod o+x %s (plugin users must reach the plugins below it)\n' "$dir"
      chmod o+x "$dir"
    fi
    dir="$(dirname "$dir")"
  done
}
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
