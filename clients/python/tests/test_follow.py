"""The resuming followers (Client.follow_events, Client.follow_logs): against fake servers,
that UNAVAILABLE resumes from the last seq or cursors yielded while other codes are raised at
once, and against the real daemon, that they survive a cold restart (SIGTERM, then a new
daemon on the same port and data directory) with no duplicate and nothing lost."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator, Optional

import grpc
import pytest

from conftest import ROOT, _first_line, plugin_root, wait_running
from toru import connect
from toru.v1 import (
    event_pb2,
    log_service_pb2,
    plugin_pb2,
    plugin_service_pb2,
)

UPGRADING = "the daemon is upgrading"


def _event(seq: int) -> plugin_service_pb2.WatchEventsResponse:
    return plugin_service_pb2.WatchEventsResponse(event=event_pb2.Event(seq=seq, plugin_id="p"))


def _record(plugin: str, seq: int) -> log_service_pb2.LogRecord:
    return log_service_pb2.LogRecord(plugin_id=plugin, seq=seq, cursor=f"{plugin}:{seq}")


class _FakeEvents:
    """Answers each WatchEvents call with the next script: messages, then a status."""

    def __init__(self, scripts: list[tuple[list[plugin_service_pb2.WatchEventsResponse], grpc.StatusCode]]):
        self.scripts = scripts
        self.requests: list[plugin_service_pb2.WatchEventsRequest] = []

    def WatchEvents(self, request: Any, context: Any) -> Iterator[plugin_service_pb2.WatchEventsResponse]:
        self.requests.append(request)
        messages, code = self.scripts[min(len(self.requests), len(self.scripts)) - 1]
        yield from messages
        context.abort(code, UPGRADING if code == grpc.StatusCode.UNAVAILABLE else "refused")


class _FakeLogs:
    def __init__(self, scripts: list[tuple[list[log_service_pb2.StreamLogsResponse], grpc.StatusCode]]):
        self.scripts = scripts
        self.requests: list[log_service_pb2.StreamLogsRequest] = []

    def StreamLogs(self, request: Any, context: Any) -> Iterator[log_service_pb2.StreamLogsResponse]:
        self.requests.append(request)
        messages, code = self.scripts[min(len(self.requests), len(self.scripts)) - 1]
        yield from messages
        context.abort(code, UPGRADING if code == grpc.StatusCode.UNAVAILABLE else "refused")


def _serve(plugins: Any = None, logs: Any = None) -> tuple[grpc.Server, str]:
    """A server with only the streaming method of the fakes given."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    if plugins is not None:
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("toru.v1.PluginService", {
            "WatchEvents": grpc.unary_stream_rpc_method_handler(
                plugins.WatchEvents,
                request_deserializer=plugin_service_pb2.WatchEventsRequest.FromString,
                response_serializer=plugin_service_pb2.WatchEventsResponse.SerializeToString)})])
    if logs is not None:
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("toru.v1.LogService", {
            "StreamLogs": grpc.unary_stream_rpc_method_handler(
                logs.StreamLogs,
                request_deserializer=log_service_pb2.StreamLogsRequest.FromString,
                response_serializer=log_service_pb2.StreamLogsResponse.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_follow_events_raises_other_codes_at_once() -> None:
    fake = _FakeEvents([([], grpc.StatusCode.PERMISSION_DENIED)])
    server, address = _serve(plugins=fake)
    try:
        with connect(address, token="t") as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                next(client.follow_events(plugin_service_pb2.WatchEventsRequest(after_seq=0)))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert len(fake.requests) == 1 and time.monotonic() - started < 5
    finally:
        server.stop(None)


def test_follow_events_resumes_after_unavailable_without_duplicates() -> None:
    gap = plugin_service_pb2.WatchEventsResponse(gap=plugin_service_pb2.EventGap(first_seq=3, last_seq=4))
    fake = _FakeEvents([
        ([_event(1), _event(2)], grpc.StatusCode.UNAVAILABLE),
        ([_event(2), gap, _event(5)], grpc.StatusCode.INVALID_ARGUMENT),
    ])
    server, address = _serve(plugins=fake)
    try:
        with connect(address, token="t") as client:
            seen: list[Any] = []
            with pytest.raises(grpc.RpcError) as err:
                for response in client.follow_events(
                        plugin_service_pb2.WatchEventsRequest(after_seq=0, plugin_ids=["p"])):
                    seen.append(response)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [r.event.seq if r.HasField("event") else ("gap", r.gap.last_seq) for r in seen] \
                == [1, 2, ("gap", 4), 5]
            assert [r.after_seq for r in fake.requests] == [0, 2]
            assert [list(r.plugin_ids) for r in fake.requests] == [["p"], ["p"]]
    finally:
        server.stop(None)


def test_follow_events_gives_up_after_the_window() -> None:
    fake = _FakeEvents([([], grpc.StatusCode.UNAVAILABLE)])
    server, address = _serve(plugins=fake)
    try:
        with connect(address, token="t") as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                next(client.follow_events(reconnect_window=0.5))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert UPGRADING in (err.value.details() or "")
            assert 0.5 <= time.monotonic() - started < 5 and len(fake.requests) > 2
            assert not fake.requests[0].HasField("after_seq")
    finally:
        server.stop(None)


def test_follow_logs_resumes_with_per_plugin_cursors() -> None:
    fake = _FakeLogs([
        ([log_service_pb2.StreamLogsResponse(records=[_record("a", 1), _record("a", 2), _record("b", 7)])],
         grpc.StatusCode.UNAVAILABLE),
        ([log_service_pb2.StreamLogsResponse(
            gap=log_service_pb2.LogGap(plugin_id="b", from_seq=8, to_seq=9),
            records=[_record("a", 2), _record("a", 3), _record("b", 10)])],
         grpc.StatusCode.UNAVAILABLE),
        ([], grpc.StatusCode.PERMISSION_DENIED),
    ])
    server, address = _serve(logs=fake)
    try:
        with connect(address, token="t") as client:
            request = log_service_pb2.StreamLogsRequest(
                filter=log_service_pb2.LogFilter(min_level=log_service_pb2.LOG_LEVEL_INFO),
                after_cursors=log_service_pb2.Cursors(cursors=["c:3"]))
            seen: list[Any] = []
            with pytest.raises(grpc.RpcError) as err:
                for response in client.follow_logs(request):
                    seen.append(response)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert [[r.cursor for r in b.records] for b in seen] == [["a:1", "a:2", "b:7"], ["a:3", "b:10"]]
            assert seen[1].gap.to_seq == 9
            assert [sorted(r.after_cursors.cursors) for r in fake.requests] == [
                ["c:3"], ["a:2", "b:7", "c:3"], ["a:3", "b:10", "c:3"]]
            assert all(r.follow and r.filter.min_level == log_service_pb2.LOG_LEVEL_INFO
                       for r in fake.requests)
    finally:
        server.stop(None)


# --------------------------------------------------------------------- the real daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Restartable:
    """torud with the chatty plugin on a fixed port and data directory."""

    def __init__(self) -> None:
        self.root = plugin_root("torud-py-follow-")
        self.plugins = self.root / "plugins"
        self.plugins.mkdir()
        wrapper = self.plugins / "chatty.binary"
        wrapper.write_text(f'#!/bin/sh\nexec python3 "{ROOT}/clients/chatty-plugin.py" "$@"\n')
        wrapper.chmod(0o755)
        self.data = self.root / "data"
        self.address = f"127.0.0.1:{_free_port()}"
        self.process: Optional[subprocess.Popen[str]] = None

    def start(self) -> None:
        torud = Path(os.environ.get("TORUD_BIN", ROOT / "target" / "debug" / "torud"))
        stderr = open(self.root / "daemon.stderr", "ab")
        self.process = subprocess.Popen(
            [torud, "serve", "--listen", self.address, "--plugins-dir", self.plugins,
             "--data-dir", self.data, "--enable-new-plugins"],
            stdout=subprocess.PIPE, stderr=stderr, text=True)
        stderr.close()
        line = _first_line(self.process, 20)
        assert line == f"torud listening on {self.address}", line

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


class _Collector:
    """Reads a follower on a thread, keeping what it yields and how it ended."""

    def __init__(self, follower: Iterator[Any]) -> None:
        self.items: list[Any] = []
        self.error: Optional[BaseException] = None
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(follower,), daemon=True)
        self.thread.start()

    def _run(self, follower: Iterator[Any]) -> None:
        try:
            for item in follower:
                with self.lock:
                    self.items.append(item)
                    self.lock.notify_all()
        except BaseException as e:  # kept for the test to report
            with self.lock:
                self.error = e
                self.lock.notify_all()

    def wait_for(self, done: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not done(self.items):
                assert self.error is None, f"the follower failed: {self.error!r}"
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; {len(self.items)} items"
                self.lock.wait(left)


def test_followers_survive_a_daemon_restart() -> None:
    daemon = _Restartable()
    daemon.start()
    try:
        with connect(daemon.address, data_dir=daemon.data) as client:
            wait_running(client, {"chatty"})
            events = _Collector(client.follow_events(plugin_service_pb2.WatchEventsRequest(after_seq=0)))
            logs = _Collector(client.follow_logs(log_service_pb2.StreamLogsRequest(
                filter=log_service_pb2.LogFilter(plugin_ids=["chatty"]), tail=5)))
            logs.wait_for(lambda batches: sum(len(b.records) for b in batches) >= 20)
            events.wait_for(lambda items: any(r.event.to_state == plugin_pb2.PLUGIN_STATE_RUNNING
                                              for r in items))
            daemon.stop()
            with events.lock:
                before = max(r.event.seq for r in events.items)
            with logs.lock:
                old_pids = {r.pid for b in logs.items for r in b.records}
            daemon.start()
            # Events after the restart arrive: chatty runs again.
            events.wait_for(lambda items: any(
                r.event.seq > before and r.event.plugin_id == "chatty"
                and r.event.to_state == plugin_pb2.PLUGIN_STATE_RUNNING for r in items))
            # And its new run's lines arrive, after everything the old one wrote.
            logs.wait_for(lambda batches: sum(
                1 for b in batches for r in b.records
                if r.pid not in old_pids and r.message.startswith("tick")) >= 5)
            with events.lock:
                assert not any(r.HasField("gap") for r in events.items)
                seqs = [r.event.seq for r in events.items]
            assert seqs == sorted(set(seqs)), seqs
            with logs.lock:
                assert not any(b.HasField("gap") for b in logs.items)
                records = [r for b in logs.items for r in b.records]
            seqs = [r.seq for r in records]
            # Strictly increasing and contiguous: no duplicate, nothing lost across the restart.
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    finally:
        daemon.stop()
