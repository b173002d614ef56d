"""Starts the real torud (built by cargo) with the Rust ``hello`` and Python ``py-echo``
example plugins in a temporary directory, and waits, with deadlines, until both run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from toru import Client, connect
from toru.v1 import plugin_pb2, plugin_service_pb2

ROOT = Path(__file__).resolve().parents[3]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


@dataclass
class Daemon:
    address: str
    data_dir: Path
    process: subprocess.Popen[str]


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    stdout = process.stdout
    assert stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        process.kill()
        raise RuntimeError(f"torud did not report listening within {timeout} s")
    # Keep draining stdout so the daemon never blocks writing to it.
    threading.Thread(target=stdout.read, daemon=True).start()
    return box[0].strip()


def plugin_root(prefix: str) -> Path:
    """A fresh directory under the system's temporary directory that the daemon's plugin
    users can traverse (run as root, torud runs each plugin under its own uid, which must
    reach its executable; pytest's own temporary directories are 0700)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


def wait_running(client: Client, ids: set[str], timeout: float = 20) -> None:
    """Replays and follows events until every plugin in ``ids`` is RUNNING."""
    missing = set(ids)
    request = plugin_service_pb2.WatchEventsRequest(after_seq=0)
    stream = client.plugins.WatchEvents(request, timeout=timeout)
    for response in stream:
        event = response.event
        if event.plugin_id in missing and event.to_state == plugin_pb2.PLUGIN_STATE_RUNNING:
            missing.discard(event.plugin_id)
            if not missing:
                stream.cancel()
                return


@pytest.fixture(scope="session")
def daemon():
    torud = Path(os.environ.get("TORUD_BIN", TARGET / "debug" / "torud"))
    hello = TARGET / "debug" / "examples" / "hello-plugin"
    for path in (torud, hello):
        if not path.exists():
            pytest.fail(f"{path} is missing: run `cargo build --bins --examples` first")
    root = plugin_root("torud-py-")
    plugins = root / "plugins"
    plugins.mkdir()
    shutil.copy(hello, plugins / "hello.binary")
    # A wrapper runs the example in place, where it finds whatever it imports.
    wrapper = plugins / "py-echo.binary"
    wrapper.write_text(f'#!/bin/sh\nexec python3 "{ROOT}/examples/python/py-echo.binary" "$@"\n')
    wrapper.chmod(0o755)
    data = root / "data"
    stderr = open(root / "daemon.stderr", "wb")
    process = subprocess.Popen(
        [torud, "serve", "--listen", "127.0.0.1:0", "--plugins-dir", plugins,
         "--data-dir", data, "--enable-new-plugins"],
        stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = _first_line(process, 20)
    assert line.startswith("torud listening on "), line
    d = Daemon(line.removeprefix("torud listening on "), data, process)
    with connect(d.address, data_dir=d.data_dir) as client:
        wait_running(client, {"hello", "py-echo"})
    yield d
    process.terminate()
    process.wait(30)
    stderr.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def client(daemon: Daemon):
    with connect(daemon.address, data_dir=daemon.data_dir) as c:
        yield c
