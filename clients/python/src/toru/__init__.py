"""Client for torud's gRPC control plane.

``toru.v1`` holds the code generated from ``proto/toru/v1`` (messages with type stubs, and
service stubs); ``toru.client`` connects by address and token, by Unix socket, or by the
daemon's data directory.
"""

from toru.client import Client, connect

__all__ = ["Client", "connect"]
