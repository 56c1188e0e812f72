"""Shared test helpers: deadline-bound waits, an in-process consumer, the stats invariants."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from oncelog.api.app import create_app
from oncelog.consumer.loop import Consumer
from oncelog.consumer.metrics import ConsumerMetrics
from oncelog.platform.settings import ApiSettings, ConsumerSettings


async def wait_until(
    check: Callable[[], Awaitable[Any]], within: float = 20.0, interval: float = 0.05
) -> Any:
    """Poll `check` until it returns a truthy value, failing after `within` seconds."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {within}s (last value: {last!r})")


@contextlib.asynccontextmanager
async def running_consumer(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool, shard: int = 0
) -> AsyncIterator[Consumer]:
    """Run one consumer replica in this event loop for the duration of the block."""
    # The test's JetStream context shares its connection with the consumer under test.
    consumer = Consumer(settings, js._nc, pool, ConsumerMetrics(CollectorRegistry()), shard)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def one(conn: asyncpg.Connection | asyncpg.Pool, sql: str, *args: Any) -> asyncpg.Record:
    """Return the single row `sql` selects, failing when there is none."""
    row = await conn.fetchrow(sql, *args)
    assert row is not None, f"no row for {sql}"
    return row


async def totals(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, int]:
    """Return the summed statistics of every topic."""
    row = await conn.fetchrow(
        """SELECT coalesce(sum(received), 0)::bigint AS received,
                  coalesce(sum(stored), 0)::bigint AS stored,
                  coalesce(sum(store_duplicates), 0)::bigint AS store_duplicates,
                  coalesce(sum(broker_duplicates), 0)::bigint AS broker_duplicates,
                  coalesce(sum(dead_lettered), 0)::bigint AS dead_lettered,
                  coalesce(sum(redelivered), 0)::bigint AS redelivered,
                  coalesce(sum(conflicting), 0)::bigint AS conflicting
           FROM topic_stats"""
    )
    assert row is not None
    return dict(row)


async def assert_invariants(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, int]:
    """Assert DESIGN.md's statistics invariants, globally and per topic; return the totals."""
    per_topic = await conn.fetch(
        """SELECT s.topic, sum(s.received) AS received, sum(s.stored) AS stored,
                  sum(s.store_duplicates + s.broker_duplicates) AS dups,
                  sum(s.dead_lettered) AS dead,
                  (SELECT count(*) FROM events e WHERE e.topic = s.topic) AS rows,
                  (SELECT count(*) FROM dead_letters d WHERE d.topic = s.topic) AS dead_rows
           FROM topic_stats s GROUP BY s.topic"""
    )
    for row in per_topic:
        assert row["stored"] == row["rows"], dict(row)
        assert row["received"] == row["stored"] + row["dups"] + row["dead"], dict(row)
        assert row["dead"] == row["dead_rows"], dict(row)
    result = await totals(conn)
    assert result["stored"] == await conn.fetchval("SELECT count(*) FROM events")
    assert result["received"] == (
        result["stored"]
        + result["store_duplicates"]
        + result["broker_duplicates"]
        + result["dead_lettered"]
    )
    return result


def api_settings(settings: ConsumerSettings, **overrides: Any) -> ApiSettings:
    """Return API settings on the test's servers, stream and database, with `overrides`."""
    shared = {
        f: getattr(settings, f) for f in ApiSettings.__struct_fields__ if hasattr(settings, f)
    }
    return msgspec.convert(shared | overrides, ApiSettings)


@contextlib.asynccontextmanager
async def api_client(
    settings: ConsumerSettings, *, ready: bool = True, **overrides: Any
) -> AsyncIterator[AsyncTestClient[Any]]:
    """Run the API in-process on the test's servers; wait until it is ready unless told not to."""
    async with AsyncTestClient(app=create_app(api_settings(settings, **overrides))) as client:
        if ready:
            await wait_until(lambda: _api_ready(client), within=10)
        yield client


async def _api_ready(client: AsyncTestClient[Any]) -> bool:
    return (await client.get("/ready")).status_code == 200
