"""Unit tests of the Python SDK through its in-process Harness (the SDK's real connection
code over a socket pair, the harness playing the host), plus the logging format and
--metadata. Run: python3 -m unittest discover -s plugin-sdk/python/tests"""

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import toru_plugin as tp  # noqa: E402


class Probe(tp.Plugin):
    metadata = {"id": "probe", "name": "Probe", "version": "1", "icon": "x", "route": "/probe"}

    def __init__(self, fail_init=False):
        self.fail_init = fail_init
        self.meet = None
        self.cancelled = False
        self.shut_down = False

    async def init(self, ctx):
        if self.fail_init:
            raise tp.PluginError("internal", "no configuration")
        await ctx.storage.set("started", "yes")

    async def call(self, ctx, request):
        if request.path == "/meet":
            await self.meet.wait()
            return tp.HttpResponse(200, {}, "met")
        if request.path == "/release":
            self.meet.set()
            return tp.HttpResponse(200, {}, "released")
        if request.path == "/stall":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        if request.path == "/slow":
            await asyncio.sleep(0.2)
            await ctx.storage.set("slow", "done")
            return tp.HttpResponse(200, {}, "slow")
        if request.path == "/trace":
            tp.log.info("traced")
            return tp.HttpResponse(200, {}, json.dumps(tp.current_trace()))
        if request.path == "/binary":
            return tp.HttpResponse(200, {}, request.body)
        if request.path == "/teapot":
            raise tp.PluginError("failed_precondition", "no tea")
        if request.path == "/bug":
            raise RuntimeError("oops")
        if request.path == "/list":
            keys, more = await ctx.storage.list(prefix="k", limit=2)
            return tp.HttpResponse(200, {}, json.dumps([keys, more]))
        raise tp.PluginError("not_found", f"no route {request.path}")

    async def shutdown(self, ctx):
        # Storage still works in the shutdown hook.
        await ctx.storage.set("bye", "saved")
        self.shut_down = True


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


class HarnessTests(unittest.TestCase):
    def test_default_kv_keeps_values_in_the_hosts_storage(self):
        async def go():
            async with tp.Harness(Probe()) as host:
                self.assertIsNone(await host.kv("get", "color"))
                self.assertEqual(await host.kv("set", "color", "blue"), "blue")
                self.assertEqual(host.store, {"started": "yes", "color": "blue"})
                self.assertEqual(await host.kv("delete", "color"), "blue")
                self.assertNotIn("color", host.store)
                with self.assertRaises(tp.PluginError) as err:
                    await host.kv("get", "")
                self.assertEqual(err.exception.code, "invalid_argument")
        run(go())

    def test_what_was_stored_before_a_restart_is_read_back(self):
        async def go():
            async with tp.Harness(Probe(), storage={"color": "green"}) as host:
                self.assertEqual(await host.kv("get", "color"), "green")
        run(go())

    def test_requests_are_handled_concurrently(self):
        async def go():
            plugin = Probe()
            plugin.meet = asyncio.Event()
            async with tp.Harness(plugin) as host:
                waiting = asyncio.ensure_future(host.call(tp.HttpRequest("GET", "/meet")))
                released = await host.call(tp.HttpRequest("GET", "/release"))
                self.assertEqual(released.text, "released")
                self.assertEqual((await waiting).text, "met")
        run(go())

    def test_a_cancelled_request_is_dropped_and_the_plugin_keeps_serving(self):
        async def go():
            plugin = Probe()
            async with tp.Harness(plugin) as host:
                fields = {"method": "GET", "path": "/stall", "headers": {}, "body": None}
                stalled = asyncio.ensure_future(
                    host.request(tp.envelope("http", "stuck-1", {"payload": fields}), timeout=1))
                self.assertTrue(await host.ping())
                host.cancel("stuck-1")
                self.assertTrue(await host.ping())
                self.assertTrue(plugin.cancelled)
                with self.assertRaises(asyncio.TimeoutError):
                    await stalled
                self.assertEqual(await host.kv("get", "started"), "yes")
        run(go())

    def test_errors_bugs_and_binary_bodies_reach_the_caller(self):
        async def go():
            async with tp.Harness(Probe()) as host:
                with self.assertRaises(tp.PluginError) as err:
                    await host.call(tp.HttpRequest("GET", "/teapot"))
                self.assertEqual((err.exception.code, err.exception.message),
                                 ("failed_precondition", "no tea"))
                with self.assertRaises(tp.PluginError) as err:
                    await host.call(tp.HttpRequest("GET", "/bug"))
                self.assertEqual(err.exception.code, "internal")
                data = bytes([0, 255, 10, 159])
                echoed = await host.call(tp.HttpRequest("POST", "/binary", {}, data))
                self.assertEqual(echoed.body, data)
                self.assertTrue(await host.ping())
        run(go())

    def test_storage_lists_keys_in_pages(self):
        async def go():
            async with tp.Harness(Probe(), storage={"k1": "", "k2": "", "k3": "", "x": ""}) as host:
                answer = await host.call(tp.HttpRequest("GET", "/list"))
                self.assertEqual(json.loads(answer.text), [["k1", "k2"], True])
        run(go())

    def test_shutdown_lets_requests_in_flight_finish_then_runs_the_hook(self):
        async def go():
            plugin = Probe()
            host = tp.Harness(plugin)
            await host.start()
            slow = asyncio.ensure_future(host.call(tp.HttpRequest("GET", "/slow")))
            self.assertTrue(await host.ping())
            self.assertIsNone(await host.shutdown())
            self.assertEqual((await slow).text, "slow")
            self.assertEqual(host.store["slow"], "done")
            self.assertTrue(plugin.shut_down)
            self.assertEqual(host.store["bye"], "saved")
        run(go())

    def test_a_failing_init_stops_the_plugin_with_its_reason(self):
        async def go():
            with self.assertRaises(tp.PluginError) as err:
                await tp.Harness(Probe(fail_init=True)).start()
            self.assertIn("no configuration", err.exception.message)
        run(go())


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class TraceTests(unittest.TestCase):
    def test_a_requests_traceparent_is_current_in_its_handler_and_in_its_log_lines(self):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(tp.JsonFormatter())
        tp.log.addHandler(handler)
        tp.log.setLevel(logging.INFO)

        async def go():
            async with tp.Harness(Probe()) as h:
                traced = await h.call(tp.HttpRequest("GET", "/trace"), traceparent=TRACEPARENT)
                plain = await h.call(tp.HttpRequest("GET", "/trace"))
                bad = await h.call(tp.HttpRequest("GET", "/trace"), traceparent="00-zz")
                return traced, plain, bad
        try:
            traced, plain, bad = run(go())
        finally:
            tp.log.removeHandler(handler)
        self.assertEqual(json.loads(traced.text),
                         {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                          "span_id": "00f067aa0ba902b7", "flags": 1})
        self.assertIsNone(json.loads(plain.text))
        self.assertIsNone(json.loads(bad.text))
        lines = [json.loads(l) for l in stream.getvalue().splitlines() if '"traced"' in l]
        self.assertEqual([l.get("trace_id") for l in lines],
                         ["4bf92f3577b34da6a3ce929d0e0e4736", None, None])

    def test_invalid_traceparents_are_ignored(self):
        for bad in ["", "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None, 7]:
            self.assertIsNone(tp.parse_traceparent(bad), bad)


class WireTests(unittest.TestCase):
    def test_log_records_are_json_lines_with_level_and_fields(self):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(tp.JsonFormatter())
        logger = logging.getLogger("wire-test")
        logger.addHandler(handler)
        logger.warning("disk %s", "full", extra={"fields": {"free": 0}})
        record = json.loads(stream.getvalue().strip())
        self.assertEqual((record["level"], record["message"], record["free"]),
                         ("warn", "disk full", 0))
        self.assertTrue(record["timestamp"].endswith("Z"))

    def test_metadata_declares_protocol_2(self):
        example = os.path.join(HERE, "..", "..", "..", "examples", "python", "py-echo.binary")
        out = subprocess.run([sys.executable, example, "--metadata"], capture_output=True,
                             check=True, timeout=10, text=True).stdout
        meta = json.loads(out)
        self.assertEqual((meta["id"], meta["protocol_version"]), ("py-echo", 2))

    def test_an_oversized_frame_is_refused(self):
        async def go():
            reader = asyncio.StreamReader()
            reader.feed_data(b"\xff\xff\xff\xff")
            with self.assertRaises(ConnectionError):
                await tp.read_frame(reader)
        run(go())


if __name__ == "__main__":
    unittest.main()
