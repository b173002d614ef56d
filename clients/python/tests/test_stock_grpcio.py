"""Stock grpcio on the control socket, written the obvious way: no ``toru.connect`` and no
channel options. grpcio sends the socket's path, percent-encoded, as HTTP/2's
``:authority``; the daemon's patched h2 (``third_party/h2/TORUD-PATCH.md``) ignores that
value instead of resetting the stream with PROTOCOL_ERROR."""

from __future__ import annotations

import grpc

from toru.v1 import plugin_service_pb2, plugin_service_pb2_grpc


def test_insecure_channel_without_options_lists_plugins(daemon):
    socket = daemon.data_dir / "torud.sock"
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = plugin_service_pb2_grpc.PluginServiceStub(channel)
        response = stub.ListPlugins(plugin_service_pb2.ListPluginsRequest(), timeout=10)
    assert [p.id for p in response.plugins] == ["hello", "py-echo"]
