#!/usr/bin/env bash
# Generates the Python, TypeScript, browser (gRPC-Web) and Go clients from
# proto/toru/v1/*.proto, with one
# protoc (the one bundled in grpcio-tools) and pinned generators, so the output is the same
# on every machine.
#
#   bash clients/generate.sh           regenerate the checked-in code
#   bash clients/generate.sh --check   regenerate into a temporary directory and fail when
#                                      the checked-in code differs (CI runs this)
#
# The web console (console/) bundles the browser client, so its built files (console/dist,
# compiled into the daemon) are rebuilt here too, and checked against console/src.
#
# Generators are installed on first use, idempotently, into target/client-tools (or
# $TORU_CLIENT_TOOLS): a Python venv with grpcio-tools, protoc-gen-go and
# protoc-gen-go-grpc via `go install`, ts-proto from clients/typescript's lock file and
# protoc-gen-es from clients/web's.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

GRPCIO_TOOLS_VERSION=1.76.0 # bundles protoc 31.1 (libprotoc), protobuf 6.31 gencode
MYPY_PROTOBUF_VERSION=5.1.0 # .pyi stubs for the Python messages and service stubs
PROTOC_GEN_GO_VERSION=v1.36.11
PROTOC_GEN_GO_GRPC_VERSION=v1.6.1
# ts-proto's version is pinned in clients/typescript/package.json and package-lock.json,
# protoc-gen-es's in clients/web/package.json and package-lock.json.
GO_MODULE=github.com/toru-project/torud/clients/go

target="${CARGO_TARGET_DIR:-$root/target}"
tools="${TORU_CLIENT_TOOLS:-$target/client-tools}"
mkdir -p "$tools/bin"

# The generated code, relative to the repository root (everything else in clients/ is
# written by hand).
GENERATED=(clients/python/src/toru/v1 clients/typescript/src/gen clients/web/src/gen clients/go/torupb)

install_tools() {
  local py="$tools/venv/bin/python"
  if ! "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('grpcio-tools') != '$GRPCIO_TOOLS_VERSION' or m.version('mypy-protobuf') != '$MYPY_PROTOBUF_VERSION')" 2>/dev/null; then
    echo "installing grpcio-tools $GRPCIO_TOOLS_VERSION and mypy-protobuf $MYPY_PROTOBUF_VERSION into $tools/venv" >&2
    python3 -m venv "$tools/venv"
    "$py" -m pip install -q "grpcio-tools==$GRPCIO_TOOLS_VERSION" "mypy-protobuf==$MYPY_PROTOBUF_VERSION"
  fi
  if [[ "$("$tools/bin/protoc-gen-go" --version 2>/dev/null)" != "protoc-gen-go $PROTOC_GEN_GO_VERSION" ]]; then
    echo "installing protoc-gen-go $PROTOC_GEN_GO_VERSION" >&2
    GOBIN="$tools/bin" go install "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
  fi
  if [[ "$("$tools/bin/protoc-gen-go-grpc" --version 2>/dev/null)" != "protoc-gen-go-grpc ${PROTOC_GEN_GO_GRPC_VERSION#v}" ]]; then
    echo "installing protoc-gen-go-grpc $PROTOC_GEN_GO_GRPC_VERSION" >&2
    GOBIN="$tools/bin" go install "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$PROTOC_GEN_GO_GRPC_VERSION"
  fi
  # Each npm package is reinstalled whenever its lock file changed since the last install.
  local pkg
  for pkg in clients/typescript clients/web console; do
    pkg="$root/$pkg"
    if ! cmp -s "$pkg/package-lock.json" "$pkg/node_modules/.installed-lock.json"; then
      echo "installing the dependencies of ${pkg#"$root/"} (npm ci)" >&2
      (cd "$pkg" && npm ci --no-audit --no-fund --loglevel=error)
      cp "$pkg/package-lock.json" "$pkg/node_modules/.installed-lock.json"
    fi
  done
}

# Writes every generated file under $1 (a copy of the repository layout).
generate() {
  local out="$1"
  local protoc=("$tools/venv/bin/python" -m grpc_tools.protoc -I "$root/proto")
  # Sorted, repository-relative names: protoc records them in the output.
  local protos
  mapfile -t protos < <(cd "$root/proto" && ls toru/v1/*.proto | LC_ALL=C sort)
  for dir in "${GENERATED[@]}"; do
    rm -rf "${out:?}/$dir"
    mkdir -p "$out/$dir"
  done

  (cd "$root/proto" && "${protoc[@]}" \
    --plugin=protoc-gen-mypy="$tools/venv/bin/protoc-gen-mypy" \
    --plugin=protoc-gen-mypy_grpc="$tools/venv/bin/protoc-gen-mypy_grpc" \
    --python_out="$out/clients/python/src" \
    --mypy_out=quiet:"$out/clients/python/src" \
    --grpc_python_out="$out/clients/python/src" \
    --mypy_grpc_out=quiet:"$out/clients/python/src" \
    "${protos[@]}")
  printf '"""Generated from proto/toru/v1 by clients/generate.sh. Do not edit."""\n' \
    >"$out/clients/python/src/toru/v1/__init__.py"

  (cd "$root/proto" && "${protoc[@]}" \
    --plugin=protoc-gen-ts_proto="$root/clients/typescript/node_modules/.bin/protoc-gen-ts_proto" \
    --ts_proto_out="$out/clients/typescript/src/gen" \
    --ts_proto_opt=outputServices=grpc-js,esModuleInterop=true,env=node,forceLong=number \
    "${protos[@]}")

  (cd "$root/proto" && "${protoc[@]}" \
    --plugin=protoc-gen-es="$root/clients/web/node_modules/.bin/protoc-gen-es" \
    --es_out="$out/clients/web/src/gen" \
    --es_opt=target=ts \
    "${protos[@]}")

  (cd "$root/proto" && "${protoc[@]}" \
    --plugin=protoc-gen-go="$tools/bin/protoc-gen-go" \
    --plugin=protoc-gen-go-grpc="$tools/bin/protoc-gen-go-grpc" \
    --go_out="$out/clients/go" --go_opt=module="$GO_MODULE" \
    --go-grpc_out="$out/clients/go" --go-grpc_opt=module="$GO_MODULE" \
    "${protos[@]}")
}

install_tools
if [[ "${1:-}" == "--check" ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  generate "$tmp"
  drift=0
  for dir in "${GENERATED[@]}"; do
    if ! diff -r -x __pycache__ "$root/$dir" "$tmp/$dir" >"$tmp/diff.txt" 2>&1; then
      echo "generated code in $dir is out of date with proto/; run: bash clients/generate.sh" >&2
      head -n 40 "$tmp/diff.txt" >&2
      drift=1
    fi
  done
  # The console bundles the browser client: its built files must match its sources and the
  # generated code checked in beside them.
  (cd "$root/console" && npm run check --silent) || drift=1
  if ((drift)); then exit 1; fi
  echo "generated clients match proto/"
else
  generate "$root"
  echo "generated: ${GENERATED[*]}"
  (cd "$root/console" && npm run build --silent)
  echo "rebuilt: console/dist (it bundles clients/web)"
fi
