"""The publisher's first connection to NATS: bounded, and one clear line when nothing answers."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client

from oncelog.platform import broker
from oncelog.platform.settings import BrokerSettings

__all__ = ["UnreachableError", "connect"]

# How `just up` is started; named in the message when no NATS server answers.
_HINT = (
    "start the stack with `uv run just up` (with the same NATS_PORT or NATS_URL), "
    "or set NATS_URL to a running NATS server"
)


class UnreachableError(Exception):
    """No NATS server accepted a connection in time."""


class _Held(logging.Filter):
    """Holds back the broker's per-attempt warnings, keeping the last one for the message."""

    def __init__(self) -> None:
        super().__init__()
        self.last = ""

    def filter(self, record: logging.LogRecord) -> bool:
        self.last = record.getMessage()
        return False


async def connect(settings: BrokerSettings, name: str, give_up_after: float) -> Client:
    """Connect like every service (reconnecting forever once connected), within `give_up_after` s.

    A one-shot tool that nobody answers should say so and end, not retry in silence; once
    connected, a broker that restarts mid-run is reconnected to as in every service.
    """
    held = _Held()
    broker_log = logging.getLogger("oncelog.broker")
    broker_log.addFilter(held)
    try:
        return await asyncio.wait_for(
            broker.connect(settings, name, connect_timeout=max(1, min(2, round(give_up_after)))),
            give_up_after,
        )
    except TimeoutError:
        last = held.last.removeprefix("nats error: ")
        why = f" (last error: {last})" if last else ""
        raise UnreachableError(
            f"no NATS server answered at {settings.nats_url} within {give_up_after:g} s{why}; {_HINT}"
        ) from None
    finally:
        broker_log.removeFilter(held)
