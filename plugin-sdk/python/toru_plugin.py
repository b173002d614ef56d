"""Toru plugin SDK for Python: write a torud plugin as one Plugin subclass and serve().

Standard library only, asyncio-based, the same shape as the Rust SDK (toru-plugin-sdk):

    import toru_plugin as tp

    class Greeter(tp.Plugin):
        metadata = {"id": "greeter", "name": "Greeter", "version": "1.0.0",
                    "icon": "wave", "route": "/greet"}

        async def call(self, ctx, request):
            calls = int(await ctx.storage.get("calls") or 0) + 1
            await ctx.storage.set("calls", str(calls))
            tp.log.info("greeted", extra={"fields": {"calls": calls}})
            return tp.HttpResponse(200, {"content-type": "text/plain"}, f"hello #{calls}")

    if __name__ == "__main__":
        raise SystemExit(tp.serve(Greeter()))

serve() handles `--metadata`, the socket (TORU_PLUGIN_SOCKET), `init` and protocol version
negotiation (it declares protocol 2: one persistent multiplexed connection), `ready`,
`ping`/`pong`, `cancel` (the handler's task is cancelled), concurrent requests (one task
each), durable storage kept by the daemon (ctx.storage; the default kv handler uses it),
graceful shutdown on the `shutdown` message or SIGTERM, and structured logging (JSON lines on
stderr, which torud parses into levels and fields). Harness runs a plugin in-process for
unit tests, no daemon needed. The protocol is docs/PROTOCOL.md in the torud repository.
"""

import asyncio
import base64
import contextvars
import itertools
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
from datetime import datetime, timezone

__all__ = [
    "PROTOCOL_VERSION", "Plugin", "Context", "Storage", "StorageError", "PluginError",
    "HttpRequest", "HttpResponse", "KvOp", "serve", "serve_socket", "Harness", "log",
    "JsonFormatter", "setup_logging", "current_trace",
]

PROTOCOL_VERSION = 2
MAX_FRAME = 16 * 1024 * 1024
SHUTDOWN_GRACE = 3.0
STORAGE_TIMEOUT = 10.0

log = logging.getLogger("plugin")


def now():
    """The current time as RFC 3339 UTC."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------- tracing

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_trace = contextvars.ContextVar("toru_trace", default=None)


def parse_traceparent(text):
    """A W3C `traceparent` (version 00) as {"trace_id", "span_id", "flags"}, or None when it
    is not valid (all-zero ids included), as the W3C rules say to ignore it."""
    match = _TRACEPARENT.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or set(match[1]) == {"0"} or set(match[2]) == {"0"}:
        return None
    return {"trace_id": match[1], "span_id": match[2], "flags": int(match[3], 16)}


def current_trace():
    """The trace context of the request being handled (from the envelope's `traceparent`,
    protocol 2), as parse_traceparent gives it, or None. Log lines written through
    setup_logging's handler while it is set carry its trace_id and span_id."""
    return _trace.get()


# ---------------------------------------------------------------------------- logging

class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, message, logger, and the fields given
    as extra={"fields": {...}}."""

    LEVELS = {"CRITICAL": "error", "ERROR": "error", "WARNING": "warn", "INFO": "info",
              "DEBUG": "debug", "NOTSET": "trace"}

    def format(self, record):
        line = {"timestamp": now(), "level": self.LEVELS.get(record.levelname, "info"),
                "message": record.getMessage(), "target": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                line.setdefault(key, value)
        trace = _trace.get()
        if trace is not None:
            line.setdefault("trace_id", trace["trace_id"])
            line.setdefault("span_id", trace["span_id"])
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level=None):
    """Sends the root logger to stderr as JSON lines (level from TORU_LOG, default INFO)."""
    level = level or os.environ.get("TORU_LOG", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging._nameToLevel else "INFO")


# ---------------------------------------------------------------------------- types

class PluginError(Exception):
    """An error a handler answers with; torud maps `code` to a gRPC status
    (invalid_argument, not_found, resource_exhausted, unavailable, failed_precondition,
    permission_denied; anything else is UNKNOWN)."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class StorageError(PluginError):
    """The host refused a storage operation (for example `resource_exhausted`: quota)."""


class HttpRequest:
    """An HTTP-style call: method, path (with query), headers (dict), body (bytes or None)."""

    def __init__(self, method="GET", path="/", headers=None, body=None):
        self.method = method
        self.path = path
        self.headers = dict(headers or {})
        self.body = body

    @property
    def text(self):
        """The body as text (None when absent; undecodable bytes replaced)."""
        return None if self.body is None else self.body.decode("utf-8", "replace")

    def __repr__(self):
        return f"HttpRequest({self.method!r}, {self.path!r})"


class HttpResponse:
    """A plugin's answer: status, headers (dict), body (str, bytes or None)."""

    def __init__(self, status=200, headers=None, body=None):
        self.status = status
        self.headers = dict(headers or {})
        self.body = body.encode() if isinstance(body, str) else body

    @property
    def text(self):
        return None if self.body is None else self.body.decode("utf-8", "replace")


class KvOp:
    """A key-value operation forwarded by the host: action is get, set or delete."""

    def __init__(self, action, key, value=None):
        self.action, self.key, self.value = action, key, value

    def __repr__(self):
        return f"KvOp({self.action!r}, {self.key!r})"


# ---------------------------------------------------------------------------- framing

async def read_frame(reader):
    """One frame's JSON, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError as err:
        if err.partial:
            raise ConnectionError("the stream ended inside a frame header") from None
        return None
    (length,) = struct.unpack(">I", header)
    if length > MAX_FRAME:
        raise ConnectionError(f"a frame of {length} bytes is over the {MAX_FRAME}-byte limit")
    body = await reader.readexactly(length)
    return json.loads(body)


def encode_frame(message):
    data = json.dumps(message).encode()
    return struct.pack(">I", len(data)) + data


def envelope(kind, request_id, payload):
    payload = dict(payload, type=kind, request_id=request_id)
    return {"type": kind, "timestamp": now(), "request_id": request_id, "payload": payload}


def encode_body(fields, body):
    if body is None:
        fields["body"] = None
        return fields
    try:
        fields["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        fields["body"] = base64.b64encode(body).decode()
        fields["body_encoding"] = "base64"
    return fields


def decode_body(fields):
    body = fields.get("body")
    if body is None:
        return None
    if not isinstance(body, str):
        raise PluginError("invalid_argument", "body must be a string or null")
    if fields.get("body_encoding") == "base64":
        return base64.b64decode(body)
    return body.encode()


# ---------------------------------------------------------------------------- storage

class Storage:
    """The plugin's durable key-value storage, kept by the daemon. Each call is one round
    trip on the plugin's connection; a write is durable when it returns."""

    def __init__(self, send=None):
        self._send = send
        self._waiters = {}
        self._ids = itertools.count(1)

    async def _apply(self, payload):
        if self._send is None:
            raise StorageError("unavailable", "no host connection to keep storage on")
        rid = f"storage-{next(self._ids)}"
        future = asyncio.get_running_loop().create_future()
        self._waiters[rid] = future
        try:
            await self._send(envelope("storage", rid, payload))
            answer = await asyncio.wait_for(future, STORAGE_TIMEOUT)
        except asyncio.TimeoutError:
            raise StorageError("unavailable", "the host did not answer a storage request") from None
        finally:
            self._waiters.pop(rid, None)
        error = answer.get("error")
        if isinstance(error, dict):
            raise StorageError(error.get("code", "internal"), error.get("message", ""))
        return answer

    def _deliver(self, message):
        future = self._waiters.pop(message.get("request_id"), None)
        if future is not None and not future.done():
            future.set_result(message.get("payload") or {})
            return True
        return False

    def _close(self):
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(StorageError("unavailable", "the host connection closed"))
        self._waiters.clear()

    async def get(self, key):
        """The value of `key` (a str), or None."""
        return (await self._apply({"action": "get", "key": key})).get("value")

    async def set(self, key, value):
        """Sets `key` to `value` (a str), durably; returns the previous value."""
        return (await self._apply({"action": "set", "key": key, "value": value})).get("value")

    async def delete(self, key):
        """Removes `key`, durably; returns the previous value."""
        return (await self._apply({"action": "delete", "key": key})).get("value")

    async def list(self, prefix="", after="", limit=100):
        """Up to `limit` keys starting with `prefix`, after `after`; returns (keys, more)."""
        answer = await self._apply({"action": "list", "prefix": prefix, "after": after,
                                    "limit": limit})
        return answer.get("keys", []), bool(answer.get("more"))


class Context:
    """What every handler gets: who the plugin is in this run, and its storage."""

    def __init__(self, plugin_id, storage):
        self.plugin_id = os.environ.get("TORU_PLUGIN_ID") or plugin_id
        self.instance_id = os.environ.get("TORU_INSTANCE_ID", "")
        self.data_dir = os.environ.get("TORU_DATA_DIR")
        self.host_protocol_version = 0
        self.storage = storage


# ---------------------------------------------------------------------------- the plugin

class Plugin:
    """Subclass it: set `metadata` (a dict with id, name, version, icon, route; optional
    author, description) and implement `call`. `kv` defaults to the daemon's durable
    storage; `init` and `shutdown` default to doing nothing. Handlers are coroutines and
    run concurrently."""

    metadata = None

    def get_metadata(self):
        meta = dict(self.metadata or {})
        meta["protocol_version"] = PROTOCOL_VERSION
        return meta

    async def init(self, ctx):
        """Runs once after the host's init, before ready; raising stops the plugin."""

    async def call(self, ctx, request):
        """Answers one HttpRequest with an HttpResponse."""
        raise PluginError("not_found", f"no handler for {request.method} {request.path}")

    async def kv(self, ctx, op):
        """Answers one KvOp: the value (get), the value written (set), the old value
        (delete). The default keeps values in the daemon's durable storage."""
        if op.action == "get":
            return await ctx.storage.get(op.key)
        if op.action == "set":
            await ctx.storage.set(op.key, op.value)
            return op.value
        if op.action == "delete":
            return await ctx.storage.delete(op.key)
        raise PluginError("invalid_argument", f"unknown kv action {op.action!r}")

    async def shutdown(self, ctx):
        """Runs once when the plugin stops, after requests in flight finished."""


class _Runtime:
    """State shared by the connections of one plugin process."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.stop = asyncio.Event()
        # Set once shutdown is complete (the hook has run): connections then close.
        self.finished = asyncio.Event()
        self.connections = set()
        self.tasks = set()
        self.init_ctx = None
        self.failure = None

    async def finish(self):
        """Lets requests in flight finish (within the grace), then runs the shutdown hook;
        connections stay open until then, so both can still use storage."""
        try:
            return await self._finish()
        finally:
            self.finished.set()

    async def _finish(self):
        self.stop.set()
        if self.tasks:
            done, pending = await asyncio.wait(set(self.tasks), timeout=SHUTDOWN_GRACE)
            for task in pending:
                task.cancel()
        if self.failure is not None:
            return self.failure
        if self.init_ctx is not None:
            await self.plugin.shutdown(self.init_ctx)
        return None

    async def serve_connection(self, reader, writer):
        write_lock = asyncio.Lock()

        async def send(message):
            async with write_lock:
                writer.write(encode_frame(message))
                await writer.drain()

        storage = Storage(send)
        ctx = Context((self.plugin.metadata or {}).get("id", ""), storage)
        running = {}

        async def read_loop():
            while True:
                try:
                    msg = await read_frame(reader)
                except (ConnectionError, ValueError, asyncio.IncompleteReadError) as err:
                    log.warning("connection dropped: %s", err)
                    return
                if msg is None:
                    return
                if not isinstance(msg, dict):
                    log.warning("ignoring a message that is not a JSON object")
                    continue
                self.dispatch(msg, ctx, send, running)

        async def stopped_and_drained():
            # After shutdown is asked the connection stays open while requests in flight
            # and the shutdown hook finish (they may still need storage answers), at most
            # for twice the grace.
            await self.stop.wait()
            try:
                await asyncio.wait_for(self.finished.wait(), 2 * SHUTDOWN_GRACE)
            except asyncio.TimeoutError:
                pass

        self.connections.add(asyncio.current_task())
        reading = asyncio.ensure_future(read_loop())
        stopping = asyncio.ensure_future(stopped_and_drained())
        try:
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reading.cancel()
            stopping.cancel()
            storage._close()
            writer.close()
            self.connections.discard(asyncio.current_task())

    def dispatch(self, msg, ctx, send, running):
        kind, rid = msg.get("type"), msg.get("request_id")
        payload = msg.get("payload") if isinstance(msg.get("payload"), dict) else {}
        if kind == "lifecycle":
            action = payload.get("action")
            if action == "init":
                ctx.instance_id = payload.get("instance_id") or ctx.instance_id
                ctx.host_protocol_version = int(payload.get("protocol_version") or 1)
                self.init_ctx = ctx
                self.spawn(self.run_init(ctx, send, rid))
            elif action == "shutdown":
                log.info("shutdown requested by the host")
                self.stop.set()
            else:
                log.warning("ignoring unknown lifecycle action %r", action)
        elif kind == "ping":
            self.spawn(send(envelope("pong", rid, {})))
        elif kind == "cancel":
            task = running.pop(rid, None)
            if task is not None:
                task.cancel()
                log.debug("request %s cancelled by the host", rid)
        elif kind == "storage":
            if not ctx.storage._deliver(msg):
                log.warning("dropped a storage answer nobody waits for")
        elif kind in ("http", "kv"):
            if self.stop.is_set():
                error = {"error": {"code": "unavailable", "message": "the plugin is shutting down"}}
                self.spawn(send(envelope(kind, rid, error)))
                return
            task = self.spawn(self.answer(msg, ctx, send, running))
            running[rid] = task
        else:
            log.warning("ignoring a message of type %r", kind)

    def spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def run_init(self, ctx, send, rid):
        try:
            await self.plugin.init(ctx)
        except Exception as err:  # noqa: BLE001 - any failure stops the plugin
            log.error("init failed: %s", err)
            self.failure = err
            self.stop.set()
            return
        log.info("initialised by the host; ready", extra={"fields": {"instance_id": ctx.instance_id}})
        await send(envelope("ready", rid, {}))

    async def answer(self, msg, ctx, send, running):
        kind, rid = msg["type"], msg.get("request_id")
        # This task's own context: the request's trace is current for its handler only.
        _trace.set(parse_traceparent(msg.get("traceparent")))
        payload = msg.get("payload") if isinstance(msg.get("payload"), dict) else {}
        op = payload.get("payload") if isinstance(payload.get("payload"), dict) else payload
        try:
            if kind == "kv":
                if not isinstance(op.get("key"), str):
                    raise PluginError("invalid_argument", "key must be a string")
                value = await self.plugin.kv(ctx, KvOp(op.get("action"), op["key"], op.get("value")))
                fields = {"value": value}
            else:
                request = HttpRequest(op.get("method", ""), op.get("path", ""),
                                      op.get("headers") or {}, decode_body(op))
                response = await self.plugin.call(ctx, request)
                fields = encode_body({"status": int(response.status),
                                      "headers": response.headers}, response.body)
        except asyncio.CancelledError:
            raise
        except PluginError as err:
            fields = {"error": {"code": err.code, "message": err.message}}
        except Exception as err:  # noqa: BLE001 - a handler bug answers, never kills
            log.exception("handler failed")
            fields = {"error": {"code": "internal", "message": f"the plugin failed: {err}"}}
        if running.pop(rid, None) is not None:
            await send(envelope(kind, rid, fields))


async def serve_socket(plugin, path):
    """Serves `plugin` on the Unix socket `path` until shutdown; returns the exit code."""
    runtime = _Runtime(plugin)
    loop = asyncio.get_running_loop()

    def on_term():
        log.info("SIGTERM received; stopping")
        runtime.stop.set()
    # Before binding: once the socket exists, a SIGTERM must stop the plugin gracefully.
    loop.add_signal_handler(signal.SIGTERM, on_term)
    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.start_unix_server(runtime.serve_connection, path=path,
                                             limit=MAX_FRAME + 4)
    await runtime.stop.wait()
    server.close()
    failure = await runtime.finish()
    # Connections close once their last answers are written.
    if runtime.connections:
        await asyncio.wait(set(runtime.connections), timeout=1)
    await asyncio.sleep(0)
    if os.path.exists(path):
        os.unlink(path)
    return 1 if failure is not None else 0


def serve(plugin, argv=None):
    """Runs a plugin executable: prints metadata on --metadata, else serves on
    TORU_PLUGIN_SOCKET until shutdown. Returns the exit code: raise SystemExit(serve(...))."""
    argv = sys.argv[1:] if argv is None else argv
    if "--metadata" in argv:
        print(json.dumps(plugin.get_metadata()))
        return 0
    path = os.environ.get("TORU_PLUGIN_SOCKET")
    if not path:
        print("TORU_PLUGIN_SOCKET is not set: run this plugin under torud (or `torud plugin "
              "check`), or run it with --metadata", file=sys.stderr)
        return 2
    setup_logging()
    return asyncio.run(serve_socket(plugin, path))


# ---------------------------------------------------------------------------- testing

class Harness:
    """Runs a plugin in-process through the SDK's real connection code over a socket pair,
    playing the host: init, requests, ping, cancel, shutdown, and storage kept in a dict.

        async with Harness(MyPlugin()) as host:
            response = await host.call(HttpRequest("GET", "/"))
    """

    def __init__(self, plugin, storage=None):
        self.plugin = plugin
        self.store = dict(storage or {})
        self._ids = itertools.count(1)
        self._waiters = {}

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        if not self._served.done():
            await self.shutdown()

    async def start(self):
        host_sock, plugin_sock = socket.socketpair()
        self._runtime = _Runtime(self.plugin)
        p_reader, p_writer = await asyncio.open_connection(sock=plugin_sock, limit=MAX_FRAME + 4)

        async def served():
            connection = asyncio.ensure_future(
                self._runtime.serve_connection(p_reader, p_writer))
            await self._runtime.stop.wait()
            failure = await self._runtime.finish()
            await connection
            return failure
        self._served = asyncio.ensure_future(served())
        self._reader, self._writer = await asyncio.open_connection(sock=host_sock,
                                                                   limit=MAX_FRAME + 4)
        self._reading = asyncio.ensure_future(self._read_loop())
        init = envelope("lifecycle", self.fresh_id(),
                        {"action": "init", "instance_id": "harness", "plugin_socket": "",
                         "log_path": "", "protocol_version": PROTOCOL_VERSION})
        try:
            answer = await self.request(init)
        except (ConnectionError, asyncio.TimeoutError):
            try:
                failure = await asyncio.wait_for(asyncio.shield(self._served), 5)
            except asyncio.TimeoutError:
                failure = None
            if failure is not None:
                raise PluginError("unavailable", f"init failed: {failure}") from None
            raise
        if answer.get("type") != "ready":
            raise PluginError("internal", f"{answer.get('type')} instead of ready")

    def fresh_id(self):
        return f"h{next(self._ids)}"

    async def _read_loop(self):
        while True:
            try:
                msg = await read_frame(self._reader)
            except (ConnectionError, ValueError):
                msg = None
            if msg is None:
                for future in self._waiters.values():
                    if not future.done():
                        future.set_exception(ConnectionError("the plugin closed its connection"))
                return
            if msg.get("type") == "storage":
                self.send(envelope("storage", msg.get("request_id"),
                                   self._storage(msg.get("payload") or {})))
                continue
            future = self._waiters.pop(msg.get("request_id"), None)
            if future is not None and not future.done():
                future.set_result(msg)

    def _storage(self, op):
        action, key = op.get("action"), op.get("key")
        if action in ("get", "set", "delete") and (not isinstance(key, str) or not key
                                                   or len(key.encode()) > 512):
            return {"error": {"code": "invalid_argument", "message": "keys are 1 to 512 bytes"}}
        if action == "get":
            return {"value": self.store.get(key)}
        if action == "set":
            if not isinstance(op.get("value"), str):
                return {"error": {"code": "invalid_argument", "message": "value must be a string"}}
            old = self.store.get(key)
            self.store[key] = op["value"]
            return {"value": old}
        if action == "delete":
            return {"value": self.store.pop(key, None)}
        if action == "list":
            prefix, after = op.get("prefix") or "", op.get("after") or ""
            limit = max(1, min(int(op.get("limit") or 100), 1000))
            keys = sorted(k for k in self.store if k.startswith(prefix) and k > after)
            return {"keys": keys[:limit], "more": len(keys) > limit}
        return {"error": {"code": "invalid_argument", "message": f"unknown action {action!r}"}}

    def send(self, message):
        self._writer.write(encode_frame(message))

    async def request(self, message, timeout=10.0):
        """Sends `message` and waits for the message with its request_id."""
        future = asyncio.get_running_loop().create_future()
        self._waiters[message["request_id"]] = future
        self.send(message)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.pop(message["request_id"], None)

    @staticmethod
    def _raise_refusal(answer):
        error = (answer.get("payload") or {}).get("error")
        if isinstance(error, dict):
            raise PluginError(error.get("code", ""), error.get("message", ""))

    async def call(self, request, traceparent=None):
        """Sends `request` as the host does (with `traceparent` in the envelope if given)."""
        fields = encode_body({"method": request.method, "path": request.path,
                              "headers": request.headers,
                              "header_list": [[k, v] for k, v in request.headers.items()]},
                             request.body)
        message = envelope("http", self.fresh_id(), {"payload": fields})
        if traceparent is not None:
            message["traceparent"] = traceparent
        answer = await self.request(message)
        self._raise_refusal(answer)
        payload = answer.get("payload") or {}
        return HttpResponse(payload.get("status"), payload.get("headers"), decode_body(payload))

    async def kv(self, action, key, value=None, request_id=None):
        op = {"action": action, "key": key}
        if value is not None:
            op["value"] = value
        message = envelope("kv", request_id or self.fresh_id(), dict(op, payload=op))
        answer = await self.request(message)
        self._raise_refusal(answer)
        return (answer.get("payload") or {}).get("value")

    async def ping(self):
        answer = await self.request(envelope("ping", self.fresh_id(), {}))
        return answer.get("type") == "pong"

    def cancel(self, request_id):
        self.send(envelope("cancel", request_id, {}))

    async def shutdown(self):
        """Sends shutdown and waits until the plugin stopped; returns its init failure or None."""
        self.send(envelope("lifecycle", self.fresh_id(), {"action": "shutdown"}))
        result = await asyncio.wait_for(self._served, SHUTDOWN_GRACE + 5)
        self._reading.cancel()
        self._writer.close()
        return result
