"""Connects to torud: by address and bearer token (plaintext, or TLS for ``https://``
addresses), by its Unix control socket, or by its data directory (the socket when it
exists, otherwise the address with ``admin.token``). Every call made through the returned
:class:`Client` carries the token."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import grpc

from toru.v1 import (
    config_service_pb2_grpc,
    kv_service_pb2_grpc,
    log_service_pb2,
    log_service_pb2_grpc,
    plugin_service_pb2,
    plugin_service_pb2_grpc,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"

#: How long the followers (:meth:`Client.follow_events`, :meth:`Client.follow_logs`) keep
#: trying to reconnect, in seconds, before they raise the last error.
DEFAULT_RECONNECT_WINDOW = 30.0


# The interceptor classes are generic only in grpc-stubs, not at run time.
class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds ``authorization: Bearer <token>`` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = list(details.metadata or []) + [self._header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, it: Any) -> Any:
        return continuation(self._with_token(details), it)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, it: Any) -> Any:
        return continuation(self._with_token(details), it)


class Client:
    """The stubs of every ``toru.v1`` service on one channel. Use as a context manager, or
    call :meth:`close`."""

    def __init__(self, channel: grpc.Channel, token: Optional[str] = None) -> None:
        self._raw = channel
        if token:
            channel = grpc.intercept_channel(channel, _BearerToken(token))
        self.channel = channel
        self.plugins = plugin_service_pb2_grpc.PluginServiceStub(channel)
        self.kv = kv_service_pb2_grpc.KvServiceStub(channel)
        self.logs = log_service_pb2_grpc.LogServiceStub(channel)
        self.config = config_service_pb2_grpc.ConfigServiceStub(channel)

    def close(self) -> None:
        self._raw.close()

    def follow_events(
        self,
        request: Optional[plugin_service_pb2.WatchEventsRequest] = None,
        *,
        reconnect_window: float = DEFAULT_RECONNECT_WINDOW,
    ) -> Iterator[plugin_service_pb2.WatchEventsResponse]:
        """Follows ``WatchEvents`` like the stub does, and resumes it when the daemon ends it
        (an upgrade ends it with UNAVAILABLE, a stop ends it cleanly) or the connection
        fails: it reconnects with ``after_seq`` = the seq of the last event (or gap end) it
        yielded, so every event is yielded once, in order, across reconnects. Gaps are
        yielded as the daemon sends them. Without ``after_seq`` and before any event, a
        resumed stream again starts at "now" (the API has no other way to say it).

        UNAVAILABLE is retried with backoff (50 ms doubling to 1 s) until
        ``reconnect_window`` seconds pass without the daemon answering a reconnect; then
        the last error is raised. Any other status is raised at once. Close the generator
        (or leave a ``for`` loop) to cancel the stream."""
        request = request if request is not None else plugin_service_pb2.WatchEventsRequest()
        last: Optional[int] = request.after_seq if request.HasField("after_seq") else None
        retry = _Retry(reconnect_window)
        while True:
            resumed = plugin_service_pb2.WatchEventsRequest(plugin_ids=request.plugin_ids)
            if last is not None:
                resumed.after_seq = last
            call: Any = self.plugins.WatchEvents(resumed)
            try:
                retry.answered(call)
                for response in call:
                    retry.progress()
                    if response.HasField("gap"):
                        end = response.gap.last_seq
                    elif response.HasField("event"):
                        end = response.event.seq
                    else:
                        continue
                    if last is not None and end <= last:
                        continue  # already yielded
                    last = end
                    yield response
                retry.failed(None)  # ended cleanly: the daemon stopped
            except grpc.RpcError as err:
                retry.failed(err)
            finally:
                call.cancel()

    def follow_logs(
        self,
        request: log_service_pb2.StreamLogsRequest,
        *,
        reconnect_window: float = DEFAULT_RECONNECT_WINDOW,
    ) -> Iterator[log_service_pb2.StreamLogsResponse]:
        """Follows ``StreamLogs`` (``follow`` is set for you) like the stub does, and resumes
        it when the daemon ends it or the connection fails, with ``after_cursors`` holding,
        per plugin, the last record (or gap end) yielded, so every record is yielded once,
        in order per plugin, across reconnects. Batches are yielded as received, less any
        record already yielded; gaps are yielded as the daemon sends them.

        Plugins not seen yet when it resumes: with an ``after_cursors`` start they keep
        their cursor; with ``tail``, ``since`` or "now" they start at the reconnect (the
        API cannot combine cursors with another start), so what such a plugin logged
        while the stream was down is not sent.

        Errors and the window are as for :meth:`follow_events`."""
        cursors: Dict[str, Tuple[int, str]] = {}  # plugin -> (seq, cursor)
        if request.WhichOneof("start") == "after_cursors":
            for cursor in request.after_cursors.cursors:
                plugin, _, seq = cursor.rpartition(":")
                cursors[plugin] = (int(seq) if seq.isdigit() else -1, cursor)
        start = log_service_pb2.StreamLogsRequest()
        start.CopyFrom(request)
        start.follow = True
        first: Optional[log_service_pb2.StreamLogsRequest] = start
        retry = _Retry(reconnect_window)
        while True:
            if first is not None:
                resumed, first = first, None
            else:
                resumed = log_service_pb2.StreamLogsRequest(
                    filter=request.filter, follow=True,
                    after_cursors=log_service_pb2.Cursors(
                        cursors=[cursor for _, cursor in cursors.values()]))
            call: Any = self.logs.StreamLogs(resumed)
            try:
                retry.answered(call)
                for response in call:
                    retry.progress()
                    out = log_service_pb2.StreamLogsResponse()
                    if response.HasField("gap"):
                        gap = response.gap
                        if gap.to_seq > cursors.get(gap.plugin_id, (-1, ""))[0]:
                            cursors[gap.plugin_id] = (gap.to_seq, f"{gap.plugin_id}:{gap.to_seq}")
                            out.gap.CopyFrom(gap)
                    for record in response.records:
                        if record.seq > cursors.get(record.plugin_id, (-1, ""))[0]:
                            cursors[record.plugin_id] = (record.seq, record.cursor)
                            out.records.append(record)
                    if out.records or out.HasField("gap"):
                        yield out
                retry.failed(None)  # ended cleanly: the daemon stopped
            except grpc.RpcError as err:
                retry.failed(err)
            finally:
                call.cancel()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Retry:
    """The followers' reconnect policy: UNAVAILABLE (or a clean end) is retried with backoff
    until ``window`` seconds pass without the daemon answering; anything else is raised."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.delay = 0.05
        self.failing_since: Optional[float] = None

    def answered(self, call: Any) -> None:
        """Waits for the daemon's response headers: once it answered, the window restarts."""
        call.initial_metadata()
        if not call.done():
            self.failing_since = None

    def progress(self) -> None:
        self.failing_since = None
        self.delay = 0.05

    def failed(self, err: Optional[grpc.RpcError]) -> None:
        """Returns after the backoff when the stream may be resumed, else raises."""
        if err is not None and err.code() != grpc.StatusCode.UNAVAILABLE:
            raise err
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        left = self.window - (now - self.failing_since)
        if left <= 0:
            if err is not None:
                raise err
            raise ConnectionError(f"the stream ended and could not be resumed within {self.window} s")
        time.sleep(min(self.delay, left))
        self.delay = min(self.delay * 2, 1.0)


def _read_token(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _read_pem(path: Union[str, os.PathLike[str], None]) -> Optional[bytes]:
    return Path(path).read_bytes() if path is not None else None


def connect(
    address: Optional[str] = None,
    token: Optional[str] = None,
    *,
    unix_socket: Union[str, os.PathLike[str], None] = None,
    data_dir: Union[str, os.PathLike[str], None] = None,
    tls_ca: Union[str, os.PathLike[str], None] = None,
    tls_cert: Union[str, os.PathLike[str], None] = None,
    tls_key: Union[str, os.PathLike[str], None] = None,
) -> Client:
    """Opens a client.

    - ``connect("127.0.0.1:50051", token="...")``: TCP with a bearer token.
    - ``connect(unix_socket="data/torud.sock")``: the Unix control socket (no token).
    - ``connect(data_dir="data")``: ``data/torud.sock`` when it exists, otherwise
      ``address`` (default 127.0.0.1:50051) with the token in ``data/admin.token``.
    - ``connect("https://host:50051", token="...", tls_ca="ca.pem")``: TLS, trusting the
      CA that signed the daemon's certificate (the system's roots without ``tls_ca``);
      ``tls_cert`` and ``tls_key`` give a client certificate to daemons that require one.

    Without arguments, ``TORUD_ADDR``, ``TORUD_TOKEN`` and ``TORUD_DATA_DIR`` are used.
    """
    address = address or os.environ.get("TORUD_ADDR")
    token = token or os.environ.get("TORUD_TOKEN")
    if data_dir is None and os.environ.get("TORUD_DATA_DIR"):
        data_dir = os.environ["TORUD_DATA_DIR"]
    if unix_socket is None and address is None and data_dir is not None:
        sock = Path(data_dir) / "torud.sock"
        if sock.exists():
            unix_socket = sock
    if unix_socket is not None:
        # grpcio would send the socket path, percent-encoded, as :authority. torud's patched
        # HTTP/2 server ignores that (third_party/h2/TORUD-PATCH.md), so this option is not
        # needed there; "localhost" is kept because it is what grpc-go and tonic send, and
        # HTTP/2 servers without the patch refuse the path (RST_STREAM, PROTOCOL_ERROR).
        options = [("grpc.default_authority", "localhost")]
        channel = grpc.insecure_channel(f"unix:{os.fspath(unix_socket)}", options=options)
        return Client(channel, token)
    if token is None and data_dir is not None:
        token = _read_token(Path(data_dir) / "admin.token")
    address = address or DEFAULT_ADDRESS
    if address.startswith("https://"):
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_pem(tls_ca), private_key=_read_pem(tls_key),
            certificate_chain=_read_pem(tls_cert))
        return Client(grpc.secure_channel(address.removeprefix("https://"), credentials), token)
    return Client(grpc.insecure_channel(address.removeprefix("http://")), token)
