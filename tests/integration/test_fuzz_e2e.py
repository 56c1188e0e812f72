"""The end-to-end property, in `just test`: hostile input through a real stack, bounded."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from fuzzing import TALLY, fuzz_round, round_inputs
from helpers import api_client, running_consumer
from oncelog.consumer.settings import ConsumerSettings

# `just test` draws a small, fixed set of rounds (derandomized: the same on every run);
# `just test-faults` sets ONCELOG_FUZZ_ROUNDS higher and lets Hypothesis pick new ones.
ROUNDS = int(os.environ.get("ONCELOG_FUZZ_ROUNDS", "25"))


@pytest.fixture
async def stack(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool
) -> AsyncIterator[AsyncTestClient[Any]]:
    """Return the API with one consumer running behind it, shared by every round."""
    async with (
        api_client(settings, rate_limit_per_second=0) as client,
        running_consumer(settings, js, pool),
    ):
        yield client


@settings(
    max_examples=ROUNDS,
    derandomize="ONCELOG_FUZZ_ROUNDS" not in os.environ,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(inputs=round_inputs())
async def test_hostile_input_is_refused_or_stored_exactly_once(
    stack: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
    inputs: list[tuple[str, str, bytes]],
) -> None:
    """Every input over HTTP or NATS is refused with a clear error or stored exactly once:
    never a 5xx, a stall or a silent drop, and the statistics stay exact."""
    # The tally runs over the whole session (it is printed at the end); the assertion is about
    # this round alone, so that Hypothesis shrinks the round that failed, not any later one.
    errors, notes = TALLY.server_errors, len(TALLY.notes)
    await fuzz_round(inputs, client=stack, js=js, settings=settings, pool=pool, tally=TALLY)
    assert TALLY.server_errors == errors, TALLY.notes[notes:]
