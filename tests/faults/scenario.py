"""One fault scenario's moving parts: load, consumer processes, checker pool, recovery clock."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from types import TracebackType
from typing import Any, Self

import asyncpg
from litestar.testing import AsyncTestClient
from nats.aio.client import Client
from nats.js import JetStreamContext

from faults.checker import RESULTS, Ledger, Verdict, check, drained, wait_stored
from faults.load import Load, connect
from faults.procs import ConsumerProcess, Fleet, api_client
from helpers import wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.platform import broker

__all__ = ["Scenario", "kill_in_batch", "strike_in_batch"]


async def _provision(js: JetStreamContext, settings: ConsumerSettings) -> bool:
    try:
        await broker.ensure_stream(js, settings)
        await broker.ensure_consumer(js, settings)
    except Exception:  # a fresh cluster answers only once it has a meta leader
        return False
    return True


class Scenario:
    """Publishers, consumers and the checker of one fault test; `verdict` drains and checks."""

    def __init__(self, fault: str, settings: ConsumerSettings, fleet: Fleet, **load: Any) -> None:
        self.fault = fault
        self.settings = settings
        self.fleet = fleet
        self.ledger = Ledger()
        self.recoveries: list[float] = []
        self._load_options = load
        self.nc: Client | None = None
        self.pool: asyncpg.Pool | None = None
        self.load: Load | None = None
        self.checked = False

    @property
    def js(self) -> JetStreamContext:
        """Return the scenario's JetStream context."""
        assert self.nc is not None
        return self.nc.jetstream()

    async def __aenter__(self) -> Self:
        self.nc = await connect(self.settings.nats_url.split(","), "oncelog-faults")
        await wait_until(lambda: _provision(self.js, self.settings), within=60, interval=0.5)
        pool = await asyncpg.create_pool(self.settings.database_url, min_size=1, max_size=3)
        assert pool is not None
        self.pool = pool
        self.load = Load(self.nc, self.settings.subject_prefix, self.ledger, **self._load_options)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not self.checked:
            # The table shows a scenario that failed before its check, with what it saw so far.
            RESULTS.append(
                Verdict(
                    fault=self.fault,
                    runs=len(self.recoveries),
                    attempted=len(self.ledger.attempted),
                    acked=len(self.ledger.acked),
                    violations=[f"FAILED: {type(exc).__name__}: {exc}"],
                    publish_errors=dict(self.ledger.errors),
                )
            )
        if self.load is not None:
            with contextlib.suppress(Exception):
                await self.load.stop(within=10)
        if self.nc is not None:
            await self.nc.close()
        if self.pool is not None:
            await self.pool.close()

    async def start(self, consumers: int, warmup: int = 200) -> None:
        """Start `consumers` replicas and the load; return once `warmup` events were acked."""
        await asyncio.to_thread(self.fleet.start, consumers)
        assert self.load is not None
        self.load.start()
        await self.load.until_acked(warmup, within=120)

    async def recovered(self, healed: float, within: float = 180.0) -> float:
        """Wait until every event acked before `healed` is stored; record and return the delay."""
        assert self.pool is not None
        took = await wait_stored(self.pool, self.ledger.acked_before(healed), healed, within)
        self.recoveries.append(took)
        return took

    async def restart(self, *members: ConsumerProcess) -> None:
        """Start killed replicas again and wait until they consume."""
        for member in members:
            member.start()
        for member in members:
            await asyncio.to_thread(member.wait_serving)

    async def verdict(self, runs: int, *, dead_letters: int = 0) -> Verdict:
        """Stop the load, wait for the drain, then run the checker against the store and the API."""
        assert self.load is not None
        assert self.pool is not None
        await self.load.stop()
        pool, s = self.pool, self.settings
        await wait_until(
            lambda: drained(self.js, s.stream, s.durable, pool, self.ledger),
            within=240,
            interval=0.25,
        )
        client: AsyncTestClient[Any]
        self.checked = True
        async with api_client(s) as client:
            return await check(
                self.fault,
                runs,
                self.ledger,
                pool,
                self.js,
                s.stream,
                api=client,
                recovery_seconds=max(self.recoveries, default=None),
                dead_letters_expected=dead_letters,
            )


async def strike_in_batch(
    pool: asyncpg.Pool,
    victim: ConsumerProcess,
    sig: int,
    *,
    after_commit: bool,
    within: float = 10.0,
) -> bool:
    """Send `sig` to `victim` inside a store transaction, or just after one commits.

    The victim's PostgreSQL session (found by its application_name) shows an open transaction
    while a batch is stored and turns idle at commit, before the acks go out. Returns False when
    neither was seen within `within` seconds and the signal went out at a random point instead.
    """
    query = """SELECT xact_start IS NOT NULL FROM pg_stat_activity
               WHERE application_name = $1 AND backend_type = 'client backend'"""
    async with pool.acquire() as conn:
        deadline = time.monotonic() + within
        seen_open = False
        while time.monotonic() < deadline:
            open_now = any(r[0] for r in await conn.fetch(query, victim.application_name))
            if (open_now and not after_commit) or (seen_open and after_commit and not open_now):
                victim.signal(sig)
                return True
            seen_open = seen_open or open_now
            await asyncio.sleep(0.001)
    victim.signal(sig)
    return False


async def kill_in_batch(pool: asyncpg.Pool, victim: ConsumerProcess, *, after_commit: bool) -> bool:
    """SIGKILL `victim` inside a batch or between its commit and its acks, and reap it."""
    landed = await strike_in_batch(pool, victim, signal.SIGKILL, after_commit=after_commit)
    await asyncio.to_thread(victim.kill)
    return landed
