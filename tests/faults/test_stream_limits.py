"""A full stream refuses publishes with an error publishers see, and never evicts an unconsumed event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from faults.procs import Fleet, fault_settings
from faults.scenario import Scenario
from helpers import wait_until
from oncelog.consumer.settings import ConsumerSettings

pytestmark = [pytest.mark.faults, pytest.mark.slow]

MAX_BYTES = 256 * 1024
REFUSAL = "ServiceUnavailableError"


async def test_a_full_stream_refuses_publishes_and_evicts_nothing(
    settings: ConsumerSettings, fleet_factory: Callable[[ConsumerSettings], Fleet]
) -> None:
    """With no consumer running the stream fills up; publishers are refused and retry; nothing unconsumed is evicted."""
    s = fault_settings(settings, stream_max_bytes=MAX_BYTES)
    fleet = fleet_factory(s)
    runs = 2
    async with Scenario("stream full (max_bytes, discard=new)", s, fleet, rate=400.0) as scenario:
        await scenario.start(consumers=0, warmup=100)
        for run in range(runs):
            if run:
                for member in fleet.members:
                    await asyncio.to_thread(member.kill)
            # JetStream answers 503 "maximum bytes exceeded" (err_code 10077), which nats-py
            # raises as ServiceUnavailableError.
            refusals = scenario.ledger.errors[REFUSAL]

            async def refused(refusals: int = refusals) -> bool:
                return scenario.ledger.errors[REFUSAL] > refusals + 20

            await wait_until(refused, within=180, interval=0.2)
            assert "maximum bytes exceeded" in scenario.ledger.error_messages[REFUSAL]
            info = await scenario.js.stream_info(s.stream)
            assert info.state.bytes <= MAX_BYTES
            if run == 0:
                # Nothing was consumed yet, so nothing may have left the stream.
                assert info.state.first_seq == 1
                assert info.state.messages == info.state.last_seq
            healed = time.monotonic()
            if run == 0:
                await asyncio.to_thread(fleet.start, 2)
            else:
                await scenario.restart(*fleet.members)
            await scenario.recovered(healed)
        verdict = await scenario.verdict(runs)
    assert verdict.ok, verdict
