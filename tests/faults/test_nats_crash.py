"""kill -9 of a single-node nats-server (file store) under load, then a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from faults.procs import Fleet, fault_settings
from faults.scenario import Scenario
from helpers import wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import NatsServer

pytestmark = [pytest.mark.faults, pytest.mark.slow]


async def test_kill_9_of_nats_server_loses_no_acked_event(
    settings: ConsumerSettings,
    own_nats: NatsServer,
    fleet_factory: Callable[[ConsumerSettings], Fleet],
) -> None:
    """nats-server killed with SIGKILL three times under load loses no acked event; publishers retry and consumers reconnect by themselves."""
    s = fault_settings(settings, nats_url=own_nats.url)
    fleet = fleet_factory(s)
    runs = 3
    async with Scenario("nats-server kill -9 (single node)", s, fleet, rate=250.0) as scenario:
        await scenario.start(consumers=2)
        pids = fleet.pids()
        for _ in range(runs):
            assert scenario.load is not None
            await scenario.load.until_acked(len(scenario.ledger.acked) + 300)
            await asyncio.to_thread(own_nats.kill)
            errors = sum(scenario.ledger.errors.values())

            async def publishers_saw_it(errors: int = errors) -> bool:
                return sum(scenario.ledger.errors.values()) > errors

            await wait_until(publishers_saw_it, within=60, interval=0.1)
            # The outage itself: publishers keep retrying while the broker is gone.
            await asyncio.sleep(3)
            await asyncio.to_thread(own_nats.start)
            await scenario.recovered(time.monotonic())
        verdict = await scenario.verdict(runs)
        assert fleet.pids() == pids, "a consumer exited while nats-server was down"
    assert verdict.ok, verdict
