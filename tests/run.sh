#!/usr/bin/env bash
# The whole test suite: formatting, lints (Rust and proto), every Rust test (unit, SDK and
# integration tests against the real daemon and real plugin processes), the Python SDK's
# unit tests, the conformance checker on every example plugin, and a smoke run of the
# benchmark. Installs what it needs, idempotently. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=v1.75.0

step() { printf '\n==> %s\n' "$*"; }

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
command -v cc >/dev/null || need_apt+=(build-essential)
if ((${#need_apt[@]})); then
  step "installing ${need_apt[*]} (apt-get)"
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  step "installing rustfmt and clippy"
  rustup component add rustfmt clippy
fi
gobin="$(go env GOPATH)/bin"
if ! "$gobin/buf" --version 2>/dev/null | grep -qx "${BUF_VERSION#v}"; then
  step "installing buf $BUF_VERSION (go install)"
  go install "github.com/bufbuild/buf/cmd/buf@$BUF_VERSION"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "buf lint proto/"
(cd proto && "$gobin/buf" lint)

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc (broken links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "cargo test (unit, SDK, integration against the real daemon, doc tests)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"

step "Python SDK unit tests (plugin-sdk/python, standard library only)"
python3 -m unittest discover -s plugin-sdk/python/tests 2>&1 | tee -a "$log"

step "conformance checker on every example plugin"
target="${CARGO_TARGET_DIR:-target}"
cargo build --locked --bin torud --examples
"$target/debug/torud" plugin check "$target/debug/examples/hello-plugin"
"$target/debug/torud" plugin check examples/python/py-echo.binary

step "benchmark smoke run (figures from a debug build mean nothing; see README for real runs)"
cargo build --locked --bins --examples
"$target/debug/torud-bench" lifecycle --iterations 3 >/dev/null
"$target/debug/torud-bench" forward --calls 20 --seconds 0.2 >/dev/null
"$target/debug/torud-bench" logs --lines 2000 --rate 2000 --rounds 1 --history-mb 2 >/dev/null

step "summary"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^Ran [0-9]+ tests? in/ { py += $2 }
     END { printf "python sdk tests: %d ran, all passed\n", py; printf "rust tests: %d passed, %d failed\n", p, f }' "$log"
