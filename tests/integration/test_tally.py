"""The gateway's group commit of broker duplicates, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from helpers import wait_until
from oncelog.api.tally import DuplicateTally

SHARD = 7


async def _true(value: bool) -> bool:
    return value


async def writing(tally: DuplicateTally, counts: dict[str, int]) -> asyncio.Task[None]:
    """Start a request's add; return once the write carrying it is under way."""
    task = asyncio.create_task(tally.add(counts))
    await wait_until(lambda: _true(tally.writes == 1 and not tally.queued))
    return task


async def queued(tally: DuplicateTally, counts: list[dict[str, int]]) -> list[asyncio.Task[None]]:
    """Start one add per entry; return once all of them wait for the next write."""
    tasks = [asyncio.create_task(tally.add(c)) for c in counts]
    await wait_until(lambda: _true(tally.queued == len(counts)))
    return tasks


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


async def test_requests_that_wait_together_are_one_transaction_and_all_counted(
    pool: asyncpg.Pool,
) -> None:
    """While one write waits on a row lock, every request that comes meanwhile goes into the
    next write, and each one's counts are committed before it is answered."""
    tally = DuplicateTally(pool.acquire, SHARD)
    async with pool.acquire() as holder:
        async with holder.transaction():
            await holder.execute("LOCK TABLE topic_stats IN SHARE MODE")
            first = await writing(tally, {"a": 1})
            rest = await queued(tally, [{"a": 2, "b": i} for i in range(1, 20)])
            assert not any(t.done() for t in [first, *rest])
        await asyncio.gather(first, *rest)
    assert tally.writes == 2
    assert await counted(pool) == {"a": (39, 39), "b": (190, 190)}


async def test_a_failed_write_fails_every_request_it_carried_and_counts_none(
    pool: asyncpg.Pool,
) -> None:
    """A write that PostgreSQL refuses raises its error in each request of the group, counts
    nothing of any of them, and the next request is written on its own again."""
    tally = DuplicateTally(impatient(pool), SHARD)
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("LOCK TABLE topic_stats IN SHARE MODE")
        waiting = [asyncio.create_task(tally.add({"a": 1})) for _ in range(5)]
        results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, asyncpg.QueryCanceledError) for r in results), results
    assert await counted(pool) == {}
    await tally.add({"a": 4})
    assert await counted(pool) == {"a": (4, 4)}


async def test_a_request_cancelled_while_it_waits_leaves_its_counts_to_the_write(
    pool: asyncpg.Pool,
) -> None:
    """A client that goes away does not take its counts with it: the broker dropped those
    messages either way, and the write commits them for whoever else waits."""
    tally = DuplicateTally(pool.acquire, SHARD)
    async with pool.acquire() as holder:
        async with holder.transaction():
            await holder.execute("LOCK TABLE topic_stats IN SHARE MODE")
            gone = await writing(tally, {"a": 1})
            (stays,) = await queued(tally, [{"a": 2}])
            gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        await stays
    assert await counted(pool) == {"a": (3, 3)}
