"""The generated Python client against the real daemon: lifecycle, KV, calls, log queries,
log streams resumed from a cursor, and lifecycle events."""

from __future__ import annotations

import json

import grpc
import pytest

from toru import connect
from toru.v1 import event_pb2, kv_service_pb2, log_service_pb2, plugin_pb2, plugin_service_pb2

RUNNING = plugin_pb2.PLUGIN_STATE_RUNNING
STOPPED = plugin_pb2.PLUGIN_STATE_STOPPED


def test_list_plugins(client):
    response = client.plugins.ListPlugins(plugin_service_pb2.ListPluginsRequest(), timeout=10)
    assert [p.id for p in response.plugins] == ["hello", "py-echo"]
    hello = response.plugins[0]
    assert hello.state == RUNNING and hello.healthy and hello.pid > 0
    assert hello.protocol_version == 2


def test_disable_and_enable(client):
    off = client.plugins.DisablePlugin(
        plugin_service_pb2.DisablePluginRequest(plugin_id="hello"), timeout=20)
    assert off.plugin.state == STOPPED and not off.plugin.enabled and off.plugin.pid == 0
    on = client.plugins.EnablePlugin(
        plugin_service_pb2.EnablePluginRequest(plugin_id="hello"), timeout=20)
    assert on.plugin.state == RUNNING and on.plugin.enabled and on.plugin.pid > 0


def test_unknown_plugin_is_not_found(client):
    with pytest.raises(grpc.RpcError) as err:
        client.plugins.GetPlugin(plugin_service_pb2.GetPluginRequest(plugin_id="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in err.value.details()


def test_kv_round_trip(client):
    kv = client.kv
    kv.SetValue(kv_service_pb2.SetValueRequest(plugin_id="hello", key="color", value="blue"),
                timeout=10)
    got = kv.GetValue(kv_service_pb2.GetValueRequest(plugin_id="hello", key="color"), timeout=10)
    assert got.found and got.value == "blue"
    kv.DeleteValue(kv_service_pb2.DeleteValueRequest(plugin_id="hello", key="color"), timeout=10)
    got = kv.GetValue(kv_service_pb2.GetValueRequest(plugin_id="hello", key="color"), timeout=10)
    assert not got.found and got.value == ""


def test_call(client):
    request = plugin_service_pb2.CallPluginRequest(
        plugin_id="py-echo", method="POST", path="/echo?x=1",
        headers=[plugin_service_pb2.Header(name="content-type", value="text/plain")],
        body=b"hello")
    answer = client.plugins.CallPlugin(request, timeout=10)
    assert answer.status == 200
    assert json.loads(answer.body) == {"method": "POST", "path": "/echo?x=1", "body": "hello"}


def test_query_logs(client):
    request = log_service_pb2.QueryLogsRequest(
        filter=log_service_pb2.LogFilter(plugin_ids=["py-echo"]), page_size=2)
    records, pages = [], 0
    while True:
        page = client.logs.QueryLogs(request, timeout=10)
        assert len(page.records) <= 2
        records.extend(page.records)
        pages += 1
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert pages > 1
    seqs = [r.seq for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert "running: ready" in [r.message for r in records]

    matching = client.logs.QueryLogs(log_service_pb2.QueryLogsRequest(
        filter=log_service_pb2.LogFilter(plugin_ids=["py-echo"], contains="ready",
                                         min_level=log_service_pb2.LOG_LEVEL_INFO)), timeout=10)
    assert matching.records
    assert all("ready" in r.message for r in matching.records)
    assert log_service_pb2.LOG_STREAM_SUPERVISOR in [r.stream for r in matching.records]


def _records_until(stream, text):
    """Records from a StreamLogs stream up to the first whose message contains ``text``."""
    seen = []
    for batch in stream:
        seen.extend(batch.records)
        if any(text in r.message for r in batch.records):
            return seen
    raise AssertionError(f"stream ended before {text!r}; saw {[r.message for r in seen]}")


def test_follow_logs_then_resume_from_a_cursor(client):
    follow = client.logs.StreamLogs(
        log_service_pb2.StreamLogsRequest(
            filter=log_service_pb2.LogFilter(plugin_ids=["hello"]), tail=1, follow=True),
        timeout=30)
    first = next(follow).records[0]
    client.plugins.RestartPlugin(plugin_service_pb2.RestartPluginRequest(plugin_id="hello"),
                                 timeout=20)
    followed = [first] + _records_until(follow, "running: ready")
    follow.cancel()
    seqs = [r.seq for r in followed]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    # Resuming after the first record gives exactly what the follower saw after it.
    resumed = client.logs.StreamLogs(
        log_service_pb2.StreamLogsRequest(
            filter=log_service_pb2.LogFilter(plugin_ids=["hello"]),
            after_cursors=log_service_pb2.Cursors(cursors=[first.cursor])),
        timeout=10)
    again = [r for batch in resumed for r in batch.records]
    assert [r.seq for r in again][: len(followed) - 1] == seqs[1:]
    assert [r.cursor for r in again][: len(followed) - 1] == [r.cursor for r in followed[1:]]


def test_watch_events(client):
    events = client.plugins.WatchEvents(
        plugin_service_pb2.WatchEventsRequest(after_seq=0, plugin_ids=["py-echo"]), timeout=30)
    last = None
    for response in events:
        e = response.event
        assert e.plugin_id == "py-echo"
        if e.to_state == RUNNING:
            last = e.seq
            break
    client.plugins.RestartPlugin(plugin_service_pb2.RestartPluginRequest(plugin_id="py-echo"),
                                 timeout=20)
    transitions = []
    for response in events:
        e = response.event
        if e.seq > last and e.kind == event_pb2.EVENT_KIND_STATE_CHANGED:
            transitions.append((e.from_state, e.to_state))
            if e.to_state == RUNNING:
                break
    events.cancel()
    assert transitions[0] == (RUNNING, plugin_pb2.PLUGIN_STATE_STOPPING)
    assert transitions[-1] == (plugin_pb2.PLUGIN_STATE_STARTING, RUNNING)


def test_connect_by_data_dir_uses_the_control_socket(daemon):
    """With only the data dir, the client talks over the daemon's control socket, which
    needs no token."""
    assert (daemon.data_dir / "torud.sock").exists()
    with connect(data_dir=daemon.data_dir) as c:
        plugins = c.plugins.ListPlugins(plugin_service_pb2.ListPluginsRequest(), timeout=10)
        assert [p.id for p in plugins.plugins] == ["hello", "py-echo"]


def test_tokens_over_tcp(daemon):
    request = plugin_service_pb2.ListPluginsRequest()
    with connect(daemon.address) as anonymous:
        with pytest.raises(grpc.RpcError) as err:
            anonymous.plugins.ListPlugins(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    read_token = (daemon.data_dir / "read.token").read_text().strip()
    with connect(daemon.address, token=read_token) as reader:
        assert len(reader.plugins.ListPlugins(request, timeout=10).plugins) == 2
        with pytest.raises(grpc.RpcError) as err:
            reader.kv.SetValue(kv_service_pb2.SetValueRequest(plugin_id="hello", key="k",
                                                              value="v"), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
