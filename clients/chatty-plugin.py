#!/usr/bin/env python3
"""A plugin for the clients' resume tests: while it runs, it logs "tick N" (N counting up
from 1 in each run) every 20 ms, so a log follower always has records to read. It runs in
place from a checkout, on the Python SDK in plugin-sdk/python."""
import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "plugin-sdk", "python"))
import toru_plugin as tp  # noqa: E402


class Chatty(tp.Plugin):
    metadata = {
        "id": "chatty",
        "name": "Chatty (client tests)",
        "version": "1.0.0",
        "icon": "message",
        "route": "/chatty",
    }

    async def init(self, ctx):
        async def tick():
            n = 0
            while True:
                n += 1
                tp.log.info("tick %d", n)
                await asyncio.sleep(0.02)

        self.ticker = asyncio.get_running_loop().create_task(tick())


if __name__ == "__main__":
    raise SystemExit(tp.serve(Chatty()))
