"""A 3-node nats-server cluster with the stream at R3: the stream leader, then a follower, killed under load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from faults.conftest import NatsCluster
from faults.procs import Fleet, fault_settings
from faults.scenario import Scenario
from helpers import wait_until
from oncelog.consumer.settings import ConsumerSettings

pytestmark = [pytest.mark.faults, pytest.mark.slow]


async def _placement(scenario: Scenario) -> tuple[str, list[str]] | None:
    """Return the stream's leader and its current followers, or None while there is no leader."""
    try:
        info = await asyncio.wait_for(scenario.js.stream_info(scenario.settings.stream), 3)
    except Exception:  # no leader to answer yet
        return None
    cluster = info.cluster
    if cluster is None or not cluster.leader:
        return None
    followers = [r.name for r in cluster.replicas or [] if r.name and r.current and not r.offline]
    return cluster.leader, followers


async def test_killing_the_stream_leader_then_a_follower_loses_no_acked_event(
    settings: ConsumerSettings,
    nats_cluster: NatsCluster,
    fleet_factory: Callable[[ConsumerSettings], Fleet],
) -> None:
    """With the stream at R3, kill -9 of its leader and then of a follower, twice under load, loses no acked event."""
    s = fault_settings(settings, nats_url=nats_cluster.url, stream_replicas=3)
    fleet = fleet_factory(s)
    runs = 0
    async with Scenario(
        "3-node cluster R3: kill -9 leader, then follower", s, fleet, rate=200.0, timeout=3.0
    ) as scenario:
        await scenario.start(consumers=2)
        pids = fleet.pids()
        for _ in range(2):
            for role in ("leader", "follower"):
                assert scenario.load is not None
                await scenario.load.until_acked(len(scenario.ledger.acked) + 200, within=120)

                async def fully_replicated() -> tuple[str, list[str]] | None:
                    placement = await _placement(scenario)
                    return placement if placement and len(placement[1]) == 2 else None

                leader, followers = await wait_until(fully_replicated, within=120, interval=0.5)
                victim = nats_cluster.nodes[leader if role == "leader" else followers[0]]
                await asyncio.to_thread(victim.kill)
                runs += 1
                if role == "leader":

                    async def new_leader(old: str = leader) -> bool:
                        placement = await _placement(scenario)
                        return placement is not None and placement[0] != old

                    await wait_until(new_leader, within=120, interval=0.2)
                await asyncio.to_thread(victim.start)
                await scenario.recovered(time.monotonic())
        verdict = await scenario.verdict(runs)
        assert fleet.pids() == pids, "a consumer exited during the cluster faults"
    assert verdict.ok, verdict
