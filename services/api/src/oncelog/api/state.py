"""The API's application state: every dependency a handler may use, with its type."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from litestar.datastructures import State
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from oncelog.api.errors import StoreUnreachableError
from oncelog.api.metrics import ApiMetrics
from oncelog.api.protect import Protection
from oncelog.api.settings import ApiSettings
from oncelog.api.tail import Follower, TailMetrics
from oncelog.store.stats import shard_for

if TYPE_CHECKING:
    from litestar import Litestar

__all__ = ["AppState", "app_state"]


class AppState(State):
    """What handlers, guards and middleware use; a handler asks for it as `state: AppState`."""

    # Litestar wraps the app's state dict in this class for every handler call; with no
    # __dict__ of its own, that costs what a plain State costs.
    __slots__ = ()

    settings: ApiSettings
    metrics: ApiMetrics
    protection: Protection
    # When the app was built (time.monotonic()), for /stats' uptime.
    started: float
    # This process's stats shard for the broker duplicates its tally applier adds.
    shard: int
    # Opened by the lifespan before the first request is served.
    pool: asyncpg.Pool
    # None until NATS first answers: the API serves reads while the broker is away.
    nc: Client | None
    js: JetStreamContext | None
    # The live tail's reader of the store, opened by the lifespan with the pool.
    follower: Follower
    tail_metrics: TailMetrics
    # Set when the server begins to stop: open live-tail streams end so that it can.
    closing: asyncio.Event

    if TYPE_CHECKING:
        # State answers any attribute name from its dict, typed Any; hidden from mypy, a name
        # not listed above is an error wherever it is read or set.
        __getattr__: None  # type: ignore[assignment, misc]
        __setattr__: None  # type: ignore[assignment, misc]

    @classmethod
    def build(cls, settings: ApiSettings) -> AppState:
        """Return the state of a new app for `settings`; the lifespan adds the pool and NATS."""
        # A registry per app, never the global one, so two apps in a process never clash.
        metrics = ApiMetrics(CollectorRegistry())
        return cls(
            {
                "settings": settings,
                "metrics": metrics,
                "tail_metrics": TailMetrics(metrics.registry),
                "closing": asyncio.Event(),
                "protection": Protection(settings),
                "started": time.monotonic(),
                "shard": shard_for(f"api-{os.uname().nodename}-{os.getpid()}"),
                "nc": None,
                "js": None,
            }
        )

    @contextlib.asynccontextmanager
    async def connection(
        self, acquire_timeout: float | None = None
    ) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        """Lend a pooled connection; a socket error on the way raises StoreUnreachableError."""
        # asyncpg lets the socket's own OSError through (refused, reset, timed out, host
        # unknown), which names no server once it leaves here. The block holds only queries,
        # so an OSError in it is PostgreSQL's.
        try:
            async with self.pool.acquire(timeout=acquire_timeout) as conn:
                yield conn
        except OSError as exc:
            raise StoreUnreachableError(exc) from exc


def app_state(app: Litestar) -> AppState:
    """Return the app's state as what create_app made it, for code that is not a handler."""
    state = app.state
    assert isinstance(state, AppState)
    return state
