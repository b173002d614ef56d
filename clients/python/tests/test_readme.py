"""The README's Python example, run as written against the test daemon (only the address
and the data directory are swapped for the test's)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def readme_block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    after = text.split(f"<!-- readme-test: {name} -->", 1)[1]
    body = after.lstrip().split("\n", 1)[1]
    return body.split("\n```", 1)[0]


def test_readme_example(daemon, tmp_path):
    code = (readme_block("python")
            .replace("127.0.0.1:50051", daemon.address)
            .replace("target/example-data", str(daemon.data_dir)))
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["['hello', 'py-echo']", "v"]
