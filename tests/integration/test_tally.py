"""The gateway's broker duplicates through the tally stream, on a real NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from nats.js import JetStreamContext

from helpers import api_client, assert_invariants, wait_until
from oncelog.api.tally import TallyApplier, publish_tally
from oncelog.consumer.settings import ConsumerSettings
from oncelog.platform import broker
from oncelog.store.stats import apply_tallies, forget_tallies

SHARD = 7


async def counted(pool: asyncpg.Pool) -> dict[str, tuple[int, int]]:
    rows = await pool.fetch(
        "SELECT topic, received, broker_duplicates FROM topic_stats WHERE shard = $1", SHARD
    )
    return {r["topic"]: (r["received"], r["broker_duplicates"]) for r in rows}


def impatient(pool: asyncpg.Pool) -> Any:
    """A connection factory whose statements give up after 200 ms."""

    @contextlib.asynccontextmanager
    async def connection() -> AsyncIterator[Any]:
        async with pool.acquire() as conn:
            await conn.execute("SET statement_timeout = '200ms'")
            try:
                yield conn
            finally:
                await conn.execute("RESET statement_timeout")

    return connection


@contextlib.asynccontextmanager
async def applying(
    js: JetStreamContext, settings: ConsumerSettings, connection: Any, *, forget: bool = True
) -> AsyncIterator[TallyApplier]:
    await broker.ensure_tally(js, settings)
    applier = TallyApplier(js, settings, connection, SHARD)
    if not forget:
        applier.forget_every_seconds = float("inf")
    task = asyncio.create_task(applier.run())
    try:
        yield applier
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish(js: JetStreamContext, settings: ConsumerSettings, counts: dict[str, int]) -> None:
    await publish_tally(js, settings, counts, deadline=time.monotonic() + 5)


async def raw(js: JetStreamContext, settings: ConsumerSettings, body: bytes, msg_id: str) -> None:
    """Publish `body` to the tally subject as is, as only a hostile or broken client would."""
    await js.publish(broker.tally_subject(settings), body, headers={"Nats-Msg-Id": msg_id})


async def test_journalled_counts_are_added_once_each(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """Every tally the broker acked reaches topic_stats, as received and broker duplicates."""
    async with applying(js, settings, pool.acquire):
        await asyncio.gather(*(publish(js, settings, {"a": 1, "b": i}) for i in range(20)))
        await wait_until(lambda: _is(counted(pool), {"a": (20, 20), "b": (190, 190)}))
    await assert_invariants(pool)


async def test_a_tally_that_comes_again_adds_nothing(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """The same tally delivered twice (its ack lost, or published twice past the broker's
    window) is counted once; in one transaction or in two."""
    tally_id = uuid.uuid4()
    body = json.dumps({"id": str(tally_id), "counts": {"a": 3}}).encode()
    async with applying(js, settings, pool.acquire, forget=False) as applier:
        await raw(js, settings, body, "one")
        await raw(js, settings, body, "two")
        await wait_until(lambda: _is_value(lambda: applier.applied, 2))
    async with pool.acquire() as conn, conn.transaction():
        await apply_tallies(conn, [(tally_id, 1, {"a": 3}), (tally_id, 2, {"a": 3})], SHARD)
    assert await counted(pool) == {"a": (3, 3)}


async def test_counts_wait_out_postgresql_and_none_is_lost(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """While PostgreSQL refuses the write, the tallies stay in the stream; once it takes
    writes again every one of them is counted, once."""
    async with applying(js, settings, impatient(pool)):
        async with pool.acquire() as holder, holder.transaction():
            # SHARE blocks every write of topic_stats until this transaction ends.
            await holder.execute("LOCK TABLE topic_stats IN SHARE MODE")
            for i in range(5):
                await publish(js, settings, {"a": i + 1})
            await asyncio.sleep(0.6)  # long enough for writes to time out and be retried
            assert await holder.fetchval("SELECT count(*) FROM tally_applied") == 0
        await wait_until(lambda: _is(counted(pool), {"a": (15, 15)}))
        await wait_until(lambda: _stream_empty(js, settings))
    assert await counted(pool) == {"a": (15, 15)}


async def test_malformed_tallies_are_refused_and_never_block_the_ones_behind(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """What no gateway publishes (not JSON, a bad topic, a count out of range, another
    field) is refused with a log line, counts nothing, and does not hold back a valid tally."""
    bad = [
        b"not json",
        b"{}",
        json.dumps({"id": str(uuid.uuid4()), "counts": {"a b": 1}}).encode(),
        json.dumps({"id": str(uuid.uuid4()), "counts": {"a": 0}}).encode(),
        json.dumps({"id": str(uuid.uuid4()), "counts": {"a": 2**40}}).encode(),
        json.dumps({"id": "x", "counts": {"a": 1}}).encode(),
        json.dumps({"id": str(uuid.uuid4()), "counts": {"a": 1}, "shard": 3}).encode(),
        b"\xff\xfe",
    ]
    await broker.ensure_tally(js, settings)
    for i, body in enumerate(bad):
        await raw(js, settings, body, f"bad-{i}")
    await publish(js, settings, {"z": 2})
    async with applying(js, settings, pool.acquire) as applier:
        await wait_until(lambda: _is(counted(pool), {"z": (2, 2)}))
        await wait_until(lambda: _is_value(lambda: applier.rejected, len(bad)))
    info = await js.stream_info(f"{settings.stream}_TALLY")
    assert info.state.messages == 0


async def test_ids_below_the_streams_first_sequence_are_forgotten(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """Once acked (and so gone from the work queue), a tally cannot come again: its id goes."""
    async with applying(js, settings, pool.acquire, forget=False):
        for i in range(3):
            await publish(js, settings, {"a": i + 1})
        await wait_until(lambda: _is(counted(pool), {"a": (6, 6)}))
        await wait_until(lambda: _stream_empty(js, settings))
    first = (await js.stream_info(f"{settings.stream}_TALLY")).state.first_seq
    async with pool.acquire() as conn:
        assert await forget_tallies(conn, first, older_than_seconds=600) == 0
        assert await forget_tallies(conn, first - 1) == 2
        assert await forget_tallies(conn, first) == 1
        assert await forget_tallies(conn, first) == 0
    assert await counted(pool) == {"a": (6, 6)}


async def test_publish_answers_202_while_postgresql_is_locked_and_counts_after(
    settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """The gateway's answer waits for the broker only: with topic_stats locked, a body with a
    duplicate is still 202, and its duplicate is counted once the lock goes."""
    body = {"topic": "busy", "event_id": "e1"}
    async with api_client(settings, rate_limit_per_second=0) as c:
        assert (await c.post("/publish", json=body)).json()["published"] == 1
        async with pool.acquire() as holder, holder.transaction():
            await holder.execute("LOCK TABLE topic_stats IN SHARE MODE")
            resp = await asyncio.wait_for(c.post("/publish", json=body), timeout=5)
            assert resp.status_code == 202, resp.text
            assert resp.json()["duplicates"] == 1
        await wait_until(lambda: _broker_duplicates(pool, 1))


async def test_a_tally_the_broker_does_not_take_is_503_and_the_retry_is_counted_once(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool
) -> None:
    """With the tally stream gone, a body with duplicates is 503 saying its events are in the
    stream, never a 202 with the count missing; once the stream is back, the retry of the same
    body is counted once."""
    body = {"topic": "busy", "event_id": "e1"}
    async with api_client(settings, publish_timeout_seconds=0.5, rate_limit_per_second=0) as c:
        assert (await c.post("/publish", json=body)).json()["published"] == 1
        await js.delete_stream(f"{settings.stream}_TALLY")
        resp = await c.post("/publish", json=body)
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "1"
        detail = resp.json()["detail"]
        assert "1 events are in the stream" in detail
        assert "retry the same body" in detail
        await broker.ensure_tally(js, settings)
        retry = await c.post("/publish", json=body)
        assert retry.status_code == 202, retry.text
        assert retry.json()["duplicates"] == 1
        await wait_until(lambda: _broker_duplicates(pool, 1))
        metrics = (await c.get("/metrics")).text
        assert 'oncelog_duplicates_total{layer="broker"} 1.0' in metrics
    result = await assert_invariants(pool)
    assert (result["broker_duplicates"], result["received"]) == (1, 1)


@pytest.mark.parametrize("replicas", [2, 3])
async def test_appliers_sharing_the_durable_count_each_tally_once(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool, replicas: int
) -> None:
    """Several API processes pull the one durable: each tally is counted by one of them."""
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(replicas):
            await stack.enter_async_context(applying(js, settings, pool.acquire))
        await asyncio.gather(*(publish(js, settings, {"a": 1}) for _ in range(200)))
        await wait_until(lambda: _is(counted(pool), {"a": (200, 200)}))
        await wait_until(lambda: _stream_empty(js, settings))


async def _stream_empty(js: JetStreamContext, settings: ConsumerSettings) -> bool:
    return (await js.stream_info(f"{settings.stream}_TALLY")).state.messages == 0


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _is_value(read: Any, expected: Any) -> bool:
    return bool(read() == expected)


async def _broker_duplicates(pool: asyncpg.Pool, n: int) -> bool:
    total = await pool.fetchval("SELECT coalesce(sum(broker_duplicates), 0) FROM topic_stats")
    return bool(total == n)
