"""PostgreSQL killed or down under load: consumers back off and recover without a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from faults.procs import Fleet, fault_settings
from faults.scenario import Scenario
from helpers import wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import PostgresServer

pytestmark = pytest.mark.faults


async def _outage(
    scenario: Scenario, fleet: Fleet, postgres: PostgresServer, seconds: float | None
) -> None:
    """Kill PostgreSQL's process group; keep it down `seconds` (or until every replica failed a commit); restart it."""
    failures = [m.metric("oncelog_commit_failures_total") for m in fleet.members]
    await asyncio.to_thread(postgres.kill)
    if seconds is None:

        async def all_failed() -> bool:
            return all(
                m.metric("oncelog_commit_failures_total") > before
                for m, before in zip(fleet.members, failures, strict=True)
            )

        await wait_until(all_failed, within=60, interval=0.2)
    else:
        # The outage itself: publishers and consumers run on while the store is gone.
        await asyncio.sleep(seconds)
    await asyncio.to_thread(postgres.start)
    await scenario.recovered(time.monotonic())


async def _run(
    settings: ConsumerSettings,
    postgres: PostgresServer,
    fleet_factory: Callable[[ConsumerSettings], Fleet],
    fault: str,
    outages: list[float | None],
    **overrides: object,
) -> None:
    s = fault_settings(settings, database_url=postgres.url("oncelog"), **overrides)
    fleet = fleet_factory(s)
    async with Scenario(fault, s, fleet, rate=250.0) as scenario:
        await scenario.start(consumers=2)
        pids = fleet.pids()
        for seconds in outages:
            await _outage(scenario, fleet, postgres, seconds)
        verdict = await scenario.verdict(len(outages))
        assert fleet.pids() == pids, "a consumer exited during the outage"
    assert verdict.ok, verdict


async def test_postgres_killed_mid_ingest_recovers_without_consumer_restarts(
    settings: ConsumerSettings,
    own_postgres: PostgresServer,
    fleet_factory: Callable[[ConsumerSettings], Fleet],
) -> None:
    """kill -9 of PostgreSQL mid-ingest, three times, loses nothing and the same consumer processes recover."""
    await _run(
        settings, own_postgres, fleet_factory, "postgres kill -9 mid-ingest", [None, None, None]
    )


async def test_postgres_down_for_a_short_outage_recovers_by_itself(
    settings: ConsumerSettings,
    own_postgres: PostgresServer,
    fleet_factory: Callable[[ConsumerSettings], Fleet],
) -> None:
    """PostgreSQL down for 8 s (longer than ack_wait) loses nothing; consumers recover alone."""
    await _run(settings, own_postgres, fleet_factory, "postgres down 8 s", [8.0])


@pytest.mark.slow
async def test_postgres_down_for_60_seconds_recovers_by_itself(
    settings: ConsumerSettings,
    own_postgres: PostgresServer,
    fleet_factory: Callable[[ConsumerSettings], Fleet],
) -> None:
    """PostgreSQL down for 60 s under load loses nothing; consumers back off and recover alone."""
    # The default retry ceiling (30 s): recovery then shows what production would see.
    await _run(
        settings,
        own_postgres,
        fleet_factory,
        "postgres down 60 s",
        [60.0],
        retry_max_seconds=30.0,
    )
