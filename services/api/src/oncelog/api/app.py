"""The Litestar application: state, lifespan and OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.openapi import OpenAPIConfig

from oncelog.api import gateway, operations, routes, stream, tail
from oncelog.api.errors import exception_handlers
from oncelog.api.metrics import MetricsMiddleware, count_unmatched
from oncelog.api.openapi import COMPONENTS, add_components
from oncelog.api.protect import send_rate_limit_headers
from oncelog.api.settings import ApiSettings
from oncelog.api.state import AppState, app_state
from oncelog.api.tally import TallyApplier
from oncelog.platform import broker, db

__all__ = ["create_app"]

_log = logging.getLogger("oncelog.api")


async def _connect_nats(state: AppState, settings: ApiSettings) -> None:
    """Connect to NATS, retrying until it answers, then apply tallies until the app stops.

    The API serves reads while NATS is away.
    """
    delay = 0.5
    while True:
        nc = None
        try:
            nc = await broker.connect(settings, "oncelog-api", connect_timeout=2)
            js = nc.jetstream()
            await broker.ensure_stream(js, settings)
            await broker.ensure_tally(js, settings)
        except Exception as exc:
            _log.warning("nats not reachable yet, or its streams not provisioned: %r", exc)
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)
            continue
        state.nc = nc
        state.js = js
        break
    await _apply_tallies(TallyApplier(js, settings, state.connection, state.shard))


async def _apply_tallies(applier: TallyApplier) -> None:
    """Run the tally applier for as long as the app runs; a failure only restarts it."""
    while True:
        try:
            await applier.run()
        except Exception as exc:
            _log.warning("the tally applier stopped: %r; starting it again", exc)
            await asyncio.sleep(1.0)


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel `task` until it ends.

    Python 3.11's asyncio.wait_for (inside nats-py's fetch) loses a cancellation that lands as
    its inner wait completes, and the applier would then run on; so the cancel is repeated.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()


@contextlib.asynccontextmanager
async def _lifespan(app: Litestar) -> AsyncIterator[None]:
    state = app_state(app)
    settings = state.settings
    pool = await db.create_pool(settings, "oncelog-api")
    state.pool = pool
    state.metrics.watch_pool(pool)
    state.follower = tail.Follower(
        pool,
        poll_seconds=settings.tail_poll_seconds,
        max_streams=settings.tail_max_streams,
        buffer=settings.tail_buffer,
        buffer_bytes=settings.tail_buffer_bytes,
        on_count=state.tail_metrics.streams.set,
    )
    connecting = asyncio.create_task(_connect_nats(state, settings))
    try:
        yield
    finally:
        state.closing.set()
        await state.follower.stop()
        await _stop(connecting)
        if state.nc is not None:
            with contextlib.suppress(Exception):
                await state.nc.drain()
        await pool.close()


def create_app(settings: ApiSettings) -> Litestar:
    """Build the API for `settings`; connections open in the lifespan."""
    app = Litestar(
        route_handlers=[
            gateway.publish,
            gateway.replay,
            routes.events,
            stream.stream_events,
            routes.event,
            routes.stats,
            routes.topics,
            routes.dead_letters,
            operations.queue_stats,
            operations.health,
            operations.ready,
            operations.metrics,
        ],
        lifespan=[_lifespan],
        state=AppState.build(settings),
        middleware=[MetricsMiddleware()],
        before_send=[count_unmatched, send_rate_limit_headers],
        exception_handlers=exception_handlers,
        request_max_body_size=settings.max_body_bytes,
        # Logging is set up by oncelog.platform.log (JSON lines); Litestar must not replace it.
        logging_config=None,
        openapi_config=OpenAPIConfig(
            title="oncelog",
            version="0.1.0",
            description="Events stored exactly once, queried and counted exactly. Every error "
            "answers with one shape: {status_code, detail, errors: [{field, message}]}.",
            components=COMPONENTS,
        ),
    )
    # Built once here, so a schema Litestar cannot generate fails at start-up, not at the first
    # /schema request, and the components only this module knows are added to it.
    add_components(app.openapi_schema)
    return app
