"""Shared test helpers: deadline-bound waits, an in-process consumer, the stats invariants."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
from httpx import AsyncBaseTransport, Request, Response
from litestar import Litestar
from litestar.testing import AsyncTestClient
from litestar.testing.transport import TestClientTransport
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from oncelog.api.app import create_app
from oncelog.api.settings import ApiSettings
from oncelog.consumer.loop import Consumer
from oncelog.consumer.metrics import ConsumerMetrics
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import decode_message
from oncelog.store import stats
from oncelog.store.batch import Item


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


# Stream sequences for messages a test hands to store_batch itself: unique within a run.
stream_seqs = itertools.count(1)


def batch_items(
    topic: str,
    ids: list[str],
    *,
    timestamp: str | None = None,
    seqs: list[int] | None = None,
    delivered: int = 1,
) -> list[Item]:
    """Messages as the consumer hands them to store_batch, one per id, decoded as it decodes
    them; each takes a new stream sequence unless `seqs` gives them."""
    out = []
    now = time.time_ns()
    subject = f"events.{topic}"
    for n, event_id in enumerate(ids):
        body: dict[str, Any] = {"event_id": event_id, "payload": {"n": n}}
        if timestamp is not None:
            body["timestamp"] = timestamp
        data = json.dumps(body).encode()
        out.append(
            Item(
                seq=seqs[n] if seqs else next(stream_seqs),
                delivered=delivered,
                subject=subject,
                received_ns=now,
                headers=None,
                data=data,
                result=decode_message(subject, data, now, "events"),
            )
        )
    return out


@contextlib.asynccontextmanager
async def running_consumer(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool, shard: int = 0
) -> AsyncIterator[Consumer]:
    """Run one consumer replica in this event loop for the duration of the block."""
    # The test's JetStream context shares its connection with the consumer under test.
    consumer = Consumer(settings, js._nc, pool, ConsumerMetrics(CollectorRegistry()), shard)  # noqa: SLF001 - JetStreamContext has no public accessor for its connection
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
    total = stats.totals(await stats.per_topic(conn))
    return {name: getattr(total, name) for name in stats.COUNTERS}


async def assert_invariants(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, int]:
    """Assert the statistics invariants (the store's own check), globally and per topic;
    return the totals."""
    assert await stats.invariant_violations(conn) == []
    return await totals(conn)


def api_settings(settings: ConsumerSettings, **overrides: Any) -> ApiSettings:
    """Return API settings on the test's servers, stream and database, with `overrides`."""
    shared = {
        f: getattr(settings, f) for f in ApiSettings.__struct_fields__ if hasattr(settings, f)
    }
    return msgspec.convert(shared | overrides, ApiSettings)


class _WaitInThread(TestClientTransport[Any], AsyncBaseTransport):
    """Litestar's test transport, waiting for each response in a worker thread.

    Litestar's own runs the app in its portal's event loop but blocks the calling loop for the
    whole request. A consumer in the test's loop would then stop in the middle of its
    transaction while the request waits on that transaction's row lock, until the statement
    timeout: a deadlock no deployment has, since there the API is a process of its own.
    """

    async def handle_async_request(self, request: Request) -> Response:
        return await asyncio.to_thread(self.handle_request, request)


class ApiClient(AsyncTestClient[Litestar]):
    """Litestar's AsyncTestClient, with the test's event loop free while a request runs."""

    def __init__(self, app: Litestar) -> None:
        super().__init__(app=app)
        # httpx takes its transport only in the constructor, where Litestar sets its own.
        self._transport = _WaitInThread(client=self, raise_server_exceptions=True)


@contextlib.asynccontextmanager
async def api_client(
    settings: ConsumerSettings, *, ready: bool = True, **overrides: Any
) -> AsyncIterator[AsyncTestClient[Any]]:
    """Run the API in-process on the test's servers; wait until it is ready unless told not to."""
    async with ApiClient(create_app(api_settings(settings, **overrides))) as client:
        if ready:
            await wait_until(lambda: _api_ready(client), within=10)
        yield client


async def _api_ready(client: AsyncTestClient[Any]) -> bool:
    return (await client.get("/ready")).status_code == 200
