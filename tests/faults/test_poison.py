"""Poison input through raw NATS publishes, under load: each is dead-lettered, none stalls a consumer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import nats.errors
import pytest

from faults.procs import Fleet, fault_settings
from faults.scenario import Scenario
from helpers import wait_until
from oncelog.consumer.settings import ConsumerSettings

pytestmark = pytest.mark.faults

# Consumers of this scenario refuse messages above this size (the server's max_payload is
# 1 MiB, so a larger limit could never be exceeded by a message that reaches the stream).
MAX_EVENT_BYTES = 512 * 1024

# kind -> (body, expected words in the dead letter's reason)
POISON: dict[str, tuple[bytes, str]] = {
    "utf8-in-id": (b'{"event_id": "\xff\xfe"}', "not valid JSON"),
    "utf8-in-payload": (b'{"event_id": "x", "payload": {"k": "\xc3"}}', "not UTF-8"),
    "invalid-json": (b'{"event_id": ', "not valid JSON"),
    "not-an-object": (b"[1, 2]", "invalid event"),
    "oversize": (
        b'{"event_id": "big", "payload": {"s": "' + b"a" * 1_000_000 + b'"}}',
        f"the limit is {MAX_EVENT_BYTES}",
    ),
    "deeply-nested": (
        b'{"event_id": "x", "payload": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        "nested",
    ),
    "id-not-a-string": (b'{"event_id": 7}', "event_id"),
    "payload-not-an-object": (b'{"event_id": "x", "payload": [1]}', "JSON object"),
    "bad-timestamp": (b'{"event_id": "x", "timestamp": "yesterday"}', "timestamp"),
    "source-not-a-string": (b'{"event_id": "x", "source": 5}', "source"),
    "empty-body": (b"", "empty body"),
    "no-headers": (b"{", "not valid JSON"),
    "topic-mismatch": (b'{"event_id": "x", "topic": "other.topic"}', "disagrees with subject"),
    "nul-in-payload": (b'{"event_id": "x", "payload": {"s": "\\u0000"}}', "must not contain"),
    "lone-surrogate": (b'{"event_id": "x", "payload": {"s": "\\ud800"}}', "lone UTF-16 surrogate"),
    # These three stalled every consumer before the validator knew PostgreSQL's limits.
    "late-timestamp": (
        b'{"event_id": "x", "timestamp": "9999-12-31T23:59:59-01:00"}',
        "outside years 1-9999",
    ),
    "nul-in-id": (b'{"event_id": "x\\u0000y"}', "control characters"),
    "huge-number": (b'{"event_id": "x", "payload": {"n": 1e1000000}}', "exponent beyond"),
}


async def test_poison_input_is_dead_lettered_with_its_reason_and_stalls_nothing(
    settings: ConsumerSettings, fleet_factory: Callable[[ConsumerSettings], Fleet]
) -> None:
    """Every kind of poison message, three times under load, becomes a dead letter with its reason; no consumer dies or stalls."""
    s = fault_settings(settings, max_event_bytes=MAX_EVENT_BYTES)
    fleet = fleet_factory(s)
    runs = 3
    async with Scenario(
        f"poison input ({len(POISON)} kinds, raw NATS)", s, fleet, rate=250.0
    ) as scenario:
        await scenario.start(consumers=2)
        assert scenario.nc is not None
        assert scenario.pool is not None
        pool = scenario.pool
        pids = fleet.pids()
        for run in range(runs):
            for kind, (data, _) in POISON.items():
                headers = None if kind == "no-headers" else {"X-Poison": kind}
                await scenario.nc.publish(
                    f"{s.subject_prefix}.faults.poison.{kind}", data, headers=headers
                )
            # A valid event without any header (so without Msg-Id) is an event, not poison.
            key = ("faults.plain", f"plain-{run}")
            scenario.ledger.attempt(key)
            ack = await scenario.js.publish(
                f"{s.subject_prefix}.{key[0]}", json.dumps({"event_id": key[1]}).encode()
            )
            scenario.ledger.ack(key, duplicate=ack.duplicate is True)
            sent = time.monotonic()
            expected = len(POISON) * (run + 1)

            async def dead_lettered(expected: int = expected) -> bool:
                return bool(await pool.fetchval("SELECT count(*) FROM dead_letters") == expected)

            await wait_until(dead_lettered, within=60, interval=0.1)
            await scenario.recovered(sent)
        # A message above the server's max_payload never enters the stream: its publisher sees why.
        with pytest.raises(nats.errors.MaxPayloadError):
            await scenario.js.publish(
                f"{s.subject_prefix}.faults.poison.huge", b"x" * (1024 * 1024 + 1)
            )
        verdict = await scenario.verdict(runs, dead_letters=len(POISON) * runs)
        assert fleet.pids() == pids, "a consumer exited on poison input"
        letters = await pool.fetch("SELECT subject, headers, reason FROM dead_letters")
    assert verdict.ok, verdict
    for letter in letters:
        kind = letter["subject"].rsplit(".", 1)[1]
        assert POISON[kind][1] in letter["reason"], (kind, letter["reason"])
        expected_headers = {} if kind == "no-headers" else {"X-Poison": kind}
        assert json.loads(letter["headers"]) == expected_headers
    assert sorted(letter["subject"].rsplit(".", 1)[1] for letter in letters) == sorted(
        list(POISON) * runs
    )
