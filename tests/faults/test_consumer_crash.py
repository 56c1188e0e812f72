"""kill -9 of consumer replicas under load: inside a batch, between commit and ack, all at once."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from faults.procs import Fleet, fault_settings
from faults.scenario import Scenario, kill_in_batch
from oncelog.consumer.settings import ConsumerSettings

pytestmark = pytest.mark.faults


async def test_kill_9_of_consumers_loses_and_double_stores_nothing(
    settings: ConsumerSettings, fleet_factory: Callable[[ConsumerSettings], Fleet]
) -> None:
    """Replicas killed inside a batch, after a commit before its acks, and all at once lose nothing and store nothing twice."""
    s = fault_settings(settings)
    fleet = fleet_factory(s)
    async with Scenario(
        "consumer kill -9 (in batch, after commit, all)", s, fleet, rate=300.0
    ) as scenario:
        await scenario.start(consumers=2)
        assert scenario.pool is not None
        runs = 0
        for round_ in range(4):
            victim = fleet.members[round_ % 2]
            await kill_in_batch(scenario.pool, victim, after_commit=round_ % 2 == 1)
            runs += 1
            healed = time.monotonic()
            await scenario.restart(victim)
            await scenario.recovered(healed)
        for _ in range(2):
            for member in fleet.members:
                member.kill()
            runs += 1
            # Publishers go on while no consumer runs; the stream holds what they send.
            assert scenario.load is not None
            await scenario.load.until_acked(len(scenario.ledger.acked) + 100)
            healed = time.monotonic()
            await scenario.restart(*fleet.members)
            await scenario.recovered(healed)
        verdict = await scenario.verdict(runs)
    assert verdict.ok, verdict
