"""Connects to torud: by address and bearer token (plaintext, or TLS for ``https://``
addresses), by its Unix control socket, or by its data directory (the socket when it
exists, otherwise the address with ``admin.token``). Every call made through the returned
:class:`Client` carries the token."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import grpc

from toru.v1 import (
    config_service_pb2_grpc,
    kv_service_pb2_grpc,
    log_service_pb2_grpc,
    plugin_service_pb2_grpc,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"


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

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
