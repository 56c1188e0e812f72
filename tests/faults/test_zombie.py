"""A consumer frozen with SIGSTOP past ack_wait wakes up as a zombie and must not double-store."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from faults.procs import ConsumerProcess, Fleet, fault_settings
from faults.scenario import Scenario, strike_in_batch
from helpers import wait_until
from oncelog.consumer.settings import ConsumerSettings

pytestmark = pytest.mark.faults


async def test_a_consumer_frozen_past_ack_wait_wakes_up_without_double_storing(
    settings: ConsumerSettings, fleet_factory: Callable[[ConsumerSettings], Fleet]
) -> None:
    """A replica stopped mid-batch past ack_wait, whose batch went to another replica, stores nothing twice when continued."""
    s = fault_settings(settings, ack_wait_seconds=2.0)
    fleet = fleet_factory(s)
    async with Scenario(
        "consumer SIGSTOP past ack_wait, SIGCONT", s, fleet, rate=250.0
    ) as scenario:
        await scenario.start(consumers=2)
        assert scenario.pool is not None
        runs = 3
        for round_ in range(runs):
            zombie = fleet.members[round_ % 2]
            other = fleet.members[(round_ + 1) % 2]
            before = other.metric("oncelog_redeliveries_total")
            stopped = time.monotonic()
            await strike_in_batch(scenario.pool, zombie, signal.SIGSTOP, after_commit=round_ == 1)

            async def taken_over(
                other: ConsumerProcess = other, before: float = before, stopped: float = stopped
            ) -> bool:
                """Whether ack_wait passed twice and the other replica got the zombie's batch."""
                if time.monotonic() - stopped < 2 * s.ack_wait_seconds:
                    return False
                if other.metric("oncelog_redeliveries_total") > before:
                    return True
                # Redelivered keys the zombie still holds locked make the other replica wait.
                assert scenario.pool is not None
                return bool(
                    await scenario.pool.fetchval(
                        """SELECT count(*) FROM pg_stat_activity
                           WHERE application_name = $1 AND wait_event_type = 'Lock'""",
                        other.application_name,
                    )
                )

            await wait_until(taken_over, within=60, interval=0.2)
            zombie.signal(signal.SIGCONT)
            await scenario.recovered(time.monotonic())
        assert all(m.alive for m in fleet.members)
        verdict = await scenario.verdict(runs)
    assert verdict.ok, verdict
