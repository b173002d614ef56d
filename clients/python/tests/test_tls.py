"""TLS: the helper against a daemon serving TLS and requiring client certificates (a
throw-away PKI from clients/test-pki.sh)."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from conftest import ROOT, TARGET, _first_line, plugin_root, wait_running
from toru import connect
from toru.v1 import plugin_service_pb2


@pytest.fixture(scope="module")
def tls_daemon():
    root = plugin_root("torud-py-tls-")
    pki = root / "pki"
    subprocess.run(["bash", ROOT / "clients" / "test-pki.sh", pki], check=True)
    plugins = root / "plugins"
    plugins.mkdir()
    shutil.copy(TARGET / "debug" / "examples" / "hello-plugin", plugins / "hello.binary")
    process = subprocess.Popen(
        [TARGET / "debug" / "torud", "serve", "--listen", "127.0.0.1:0",
         "--plugins-dir", plugins, "--data-dir", root / "data",
         "--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key",
         "--tls-client-ca", pki / "ca.pem", "--enable-new-plugins"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = _first_line(process, 20)
    port = line.rsplit(":", 1)[1]
    yield f"https://localhost:{port}", pki, root / "data"
    process.terminate()
    process.wait(30)
    shutil.rmtree(root, ignore_errors=True)


def test_tls_with_a_client_certificate(tls_daemon):
    address, pki, data = tls_daemon
    request = plugin_service_pb2.ListPluginsRequest()
    with connect(address, data_dir=data, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                 tls_key=pki / "client.key") as client:
        wait_running(client, {"hello"})
        assert [p.id for p in client.plugins.ListPlugins(request, timeout=10).plugins] == ["hello"]
    # Without a client certificate the daemon refuses the connection.
    with connect(address, data_dir=data, tls_ca=pki / "ca.pem") as client:
        with pytest.raises(grpc.RpcError) as err:
            client.plugins.ListPlugins(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
