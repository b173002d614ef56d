#!/usr/bin/env bash
# The whole test suite: formatting, lints (Rust and proto), the generated clients' drift
# check, every Rust test (unit, SDK, integration tests against the real daemon and real
# plugin processes, toructl, the README's grpcurl and toructl examples), the Python SDK's
# unit tests, the conformance checker on every example plugin, the Python, TypeScript,
# web (gRPC-Web) and Go clients' tests against the real daemon, the web console in headless
# Chromium, and a smoke run of the benchmark. Installs what it needs, idempotently. CI runs
# exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=v1.75.0
GRPCURL_VERSION=v1.9.3
# The last grpcurl whose `-unix PATH` dials (1.9.2 and 1.9.3 cannot: fullstorydev/grpcurl#496);
# tests/stock_clients.rs checks it works on the control socket as it sends the path as authority.
GRPCURL_1_8_VERSION=v1.8.9
KUBERNETES_VALIDATE_VERSION=1.37.0

step() { printf '\n==> %s\n' "$*"; }

# shellcheck source=examples/traversable.sh
source examples/traversable.sh

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
command -v cc >/dev/null || need_apt+=(build-essential)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v npm >/dev/null || need_apt+=(nodejs npm)
command -v openssl >/dev/null || need_apt+=(openssl)
if ((${#need_apt[@]})); then
  step "installing ${need_apt[*]} (apt-get)"
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi
# The real Prometheus server scrapes the daemon in tests/metrics.rs (the server alone: not
# the node exporter and collectors it recommends).
if ! command -v prometheus >/dev/null; then
  step "installing prometheus (apt-get)"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus
fi
# Debian's Chromium, driven headless by the console's browser tests (no browser is downloaded).
if ! command -v chromium >/dev/null; then
  step "installing chromium (apt-get)"
  apt-get update -qq && apt-get install -y -qq chromium
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

target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target/client-tools/bin"
tools="$(cd "$target/client-tools" && pwd)" # generators, grpcurl, the Python venv
traversable .
traversable "$target"
# `go install` leaves no version in `grpcurl -version`; the module version is in the binary.
if ! go version -m "$tools/bin/grpcurl" 2>/dev/null | grep -q "mod.*github.com/fullstorydev/grpcurl[[:space:]]*$GRPCURL_VERSION"; then
  step "installing grpcurl $GRPCURL_VERSION (go install)"
  GOBIN="$tools/bin" go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
fi
export GRPCURL="$tools/bin/grpcurl"
if ! go version -m "$tools/grpcurl-1.8/bin/grpcurl" 2>/dev/null | grep -q "mod.*github.com/fullstorydev/grpcurl[[:space:]]*$GRPCURL_1_8_VERSION"; then
  step "installing grpcurl $GRPCURL_1_8_VERSION (go install)"
  GOBIN="$tools/grpcurl-1.8/bin" go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_1_8_VERSION"
fi
export GRPCURL_1_8="$tools/grpcurl-1.8/bin/grpcurl"

step "cargo fmt --check"
cargo fmt --all -- --check

step "buf lint proto/"
(cd proto && "$gobin/buf" lint)

step "generated clients match proto/, the console's built files match its sources (clients/generate.sh --check)"
bash clients/generate.sh --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc (broken links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "cargo test (unit, SDK, integration against the real daemon, toructl, README, doc tests)"
log="$(mktemp -d)"
trap 'rm -rf "$log"' EXIT
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log/rust"
# The client tests below start target/debug/torud with the hello-plugin example.
cargo build --locked --bins --examples

step "Python client: mypy over the helper and the tests (against the installed stubs), pytest against the real daemon"
"$tools/venv/bin/python" -m pip install -q "./clients/python[test]"
(cd clients/python &&
  MYPYPATH=src "$tools/venv/bin/python" -m mypy --cache-dir "$tools/mypy-cache" --strict src/toru/client.py &&
  "$tools/venv/bin/python" -m mypy --cache-dir "$tools/mypy-cache" tests &&
  "$tools/venv/bin/python" -m pytest -q -p no:cacheprovider tests) 2>&1 | tee "$log/python"

step "TypeScript client tests (tsc, node --test, against the real daemon)"
(cd clients/typescript && npm test --silent) 2>&1 | tee "$log/typescript"

step "Web (gRPC-Web) client tests (tsc, node --test with Node's fetch, against the real daemon)"
(cd clients/web && npm test --silent) 2>&1 | tee "$log/web"

step "Web console in headless Chromium (playwright-core on Debian's chromium, against the real daemon)"
(cd console && npm test) 2>&1 | tee "$log/console"

step "Go client tests (go vet, go test, against the real daemon)"
(cd clients/go && go vet ./... && go test -count=1 -v ./...) 2>&1 | tee "$log/go"

step "Python SDK unit tests (plugin-sdk/python, standard library only)"
python3 -m unittest discover -s plugin-sdk/python/tests 2>&1 | tee "$log/python-sdk"

step "conformance checker on every example plugin"
"$target/debug/torud" plugin check "$target/debug/examples/hello-plugin"
"$target/debug/torud" plugin check examples/python/py-echo.binary

step "Kubernetes example against Kubernetes 1.30's schemas (kubernetes-validate, offline)"
"$tools/venv/bin/python" -m pip install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
"$tools/venv/bin/kubernetes-validate" --strict --quiet -k 1.30 packaging/kubernetes/*.yaml

step "benchmark smoke run (figures from a debug build mean nothing; see README for real runs)"
"$target/debug/torud-bench" lifecycle --iterations 3 >/dev/null
"$target/debug/torud-bench" forward --calls 20 --seconds 0.2 >/dev/null
"$target/debug/torud-bench" forward --calls 20 --seconds 0.2 --rounds 1 --via control-socket >/dev/null
"$target/debug/torud-bench" logs --lines 2000 --rate 2000 --rounds 1 --history-mb 2 >/dev/null
"$target/debug/torud-bench" scale --plugins 5 --idle-seconds 1 >/dev/null
"$target/debug/torud-bench" upgrade --plugins 2 --rounds 2 --restarts 1 >/dev/null

step "summary"
{
  awk '/^Ran [0-9]+ tests? in/ { p += $2 } /^FAILED \(/ { f++ } END { printf "python-sdk %d %d\n", p, f }' "$log/python-sdk"
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
       END { printf "rust %d %d\n", p, f }' "$log/rust"
  awk '/ passed| failed/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
       END { printf "python %d %d\n", p, f }' "$log/python"
  awk '/^# pass / { p += $3 } /^# fail / { f += $3 } END { printf "typescript %d %d\n", p, f }' "$log/typescript"
  awk '/^# pass / { p += $3 } /^# fail / { f += $3 } END { printf "web %d %d\n", p, f }' "$log/web"
  awk '/^# pass / { p += $3 } /^# fail / { f += $3 } END { printf "console %d %d\n", p, f }' "$log/console"
  awk '/^--- PASS/ { p++ } /^--- FAIL/ { f++ } END { printf "go %d %d\n", p, f }' "$log/go"
} | awk '{ printf "%s tests: %d passed, %d failed\n", $1, $2, $3; p += $2; f += $3 }
         END { printf "total: %d passed, %d failed\n", p, f }'
