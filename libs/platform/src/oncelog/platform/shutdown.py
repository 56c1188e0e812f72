"""A shutdown Event wired to SIGINT and SIGTERM."""

from __future__ import annotations

import asyncio
import signal

__all__ = ["shutdown_event"]


def shutdown_event() -> asyncio.Event:
    """Return an Event that is set on the first SIGINT or SIGTERM of the running loop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
