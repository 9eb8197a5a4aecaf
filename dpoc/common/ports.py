"""A free TCP port on this machine, for a master address nobody typed (the one implementation)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the OS reports free on every interface now (another process may still take it before it is
    bound): good for a loopback master and for a node's master that other hosts dial."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
