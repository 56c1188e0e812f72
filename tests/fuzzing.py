"""An end-to-end fuzz round: hostile events over HTTP and NATS into a real stack, then the books.

Each round publishes a drawn mix of events through the gateway (POST /publish) and straight to
JetStream (with the contract's Msg-Id), waits until the consumer has acked every message, and
checks the promise: every input was refused with a clear error (a 4xx naming a field, or a
dead letter with a reason) or stored exactly once; no 5xx, no stall, no silent drop; two
different accepted events are two rows; the statistics invariants hold.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from helpers import assert_invariants, wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import Decoded, decode_message, msg_id
from strategies import HOSTILE_TOPIC, TOKEN, clean_body, event_body

JSON = {"Content-Type": "application/json"}


@dataclass
class Tally:
    """What all rounds of one run tried and found; every count after `inputs` must stay 0."""

    inputs: int = 0
    http_accepted: int = 0
    http_refused: int = 0
    nats_stored: int = 0
    nats_dead_lettered: int = 0
    server_errors: int = 0
    stalls: int = 0
    silent_drops: int = 0
    notes: list[str] = field(default_factory=list)


# One tally per test session; tests/conftest.py prints it when a fuzz round ran.
TALLY = Tally()


@st.composite
def round_inputs(draw: st.DrawFn) -> list[tuple[str, str, bytes]]:
    """Draw one round: (path, topic suffix, body) with path "http" or "nats"."""
    count = draw(st.integers(min_value=1, max_value=12))
    out: list[tuple[str, str, bytes]] = []
    for _ in range(count):
        path = draw(st.sampled_from(["http", "nats"]))
        suffix = draw(st.one_of(TOKEN, st.lists(TOKEN, min_size=1, max_size=3).map(".".join)))
        clean: bool = draw(st.booleans())
        topic: str | None
        if path == "http":
            topic = suffix if clean else draw(st.one_of(st.just(suffix), HOSTILE_TOPIC))
        else:
            topic = draw(st.one_of(st.none(), st.just(suffix), HOSTILE_TOPIC))
        _, body = draw(clean_body(topic=topic) if clean else event_body(topic=topic))
        out.append((path, suffix, body))
    # Resending an earlier input is how retries and replays look on the wire.
    resend: bool = draw(st.booleans())
    if resend:
        index: int = draw(st.integers(min_value=0, max_value=len(out) - 1))
        out.append(out[index])
    return out


async def fuzz_round(
    inputs: list[tuple[str, str, bytes]],
    *,
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
    tally: Tally,
) -> None:
    """Publish one round and check every input's fate."""
    prefix = "fz" + uuid.uuid4().hex[:10]
    expected: dict[tuple[str, str], bytes] = {}
    # Keys accepted more than once with other payloads: which copy is first stored depends on
    # which commit worker's batch commits first, so only the key is checked for them.
    repeated: set[tuple[str, str]] = set()
    nats_seqs: dict[int, bool] = {}
    for path, suffix, body in inputs:
        tally.inputs += 1
        if path == "http":
            event = await _post(client, prefix, body, tally)
        else:
            event = await _publish(
                js, f"{settings.subject_prefix}.{prefix}.{suffix}", body, nats_seqs
            )
        if event is not None:
            _expect(expected, repeated, event)
    try:
        await wait_until(lambda: _drained(js, settings), within=30, interval=0.05)
    except AssertionError:
        tally.stalls += 1
        raise
    rows = {
        (r["topic"], r["event_id"]): r["payload"]
        for r in await pool.fetch(
            "SELECT topic, event_id, payload FROM events WHERE topic LIKE $1", prefix + "%"
        )
    }
    missing = set(expected) - set(rows)
    if missing:
        tally.silent_drops += len(missing)
        tally.notes.append(f"not stored: {sorted(missing)[:3]}")
    assert not missing, missing
    assert set(rows) == set(expected), set(rows) ^ set(expected)
    for key, payload in expected.items():
        if key not in repeated:
            assert _exact(rows[key]) == _exact(payload), key
    dead = {
        r["stream_seq"]
        for r in await pool.fetch("SELECT stream_seq, reason FROM dead_letters WHERE reason <> ''")
    }
    stored_seqs = {
        r["stream_seq"]
        for r in await pool.fetch("SELECT stream_seq FROM events WHERE topic LIKE $1", prefix + "%")
    }
    dup_seqs = {r["stream_seq"] for r in await pool.fetch("SELECT stream_seq FROM duplicates")}
    for seq, valid in nats_seqs.items():
        if valid:
            tally.nats_stored += 1
            assert seq in stored_seqs or seq in dup_seqs, seq
        else:
            tally.nats_dead_lettered += 1
            assert seq in dead, seq
    await assert_invariants(pool)


async def _post(
    client: AsyncTestClient[Any], prefix: str, body: bytes, tally: Tally
) -> Decoded | None:
    """POST one body; return the event the gateway accepted, or None (refused, or a 5xx)."""
    body = _under(prefix, body)
    resp = await client.post("/publish", content=body, headers=JSON)
    if resp.status_code >= 500:
        tally.server_errors += 1
        tally.notes.append(f"{resp.status_code} for {body[:200]!r}: {resp.text[:200]}")
        return None
    if resp.status_code != 202:
        assert resp.status_code == 422, (resp.status_code, resp.text)
        errors = resp.json()["errors"]
        assert errors, resp.text
        assert all(e["field"] and e["message"] for e in errors), errors
        tally.http_refused += 1
        return None
    tally.http_accepted += 1
    topic = json.loads(body)["topic"]
    decoded = decode_message(f"x.{topic}", body, time.time_ns(), "x")
    assert isinstance(decoded, Decoded), (body, decoded)
    return decoded


async def _publish(
    js: JetStreamContext, subject: str, body: bytes, seqs: dict[int, bool]
) -> Decoded | None:
    """Publish one message as a third-party client would; return the event it carries."""
    body = _under(subject.split(".")[1], body)
    decoded = decode_message(subject, body, time.time_ns(), subject.partition(".")[0])
    headers = None
    if isinstance(decoded, Decoded):
        headers = {"Nats-Msg-Id": msg_id(decoded.topic, decoded.event_id)}
    ack = await js.publish(subject, body, headers=headers)
    if ack.duplicate:
        return None
    seqs[ack.seq] = isinstance(decoded, Decoded)
    return decoded if isinstance(decoded, Decoded) else None


def _exact(document: str | bytes) -> Any:
    """Decode JSON with numbers as decimals: jsonb keeps a number's decimal value, not its
    float, so 1.7976931348623157e308 comes back as 17976931348623157 and 292 zeros."""
    return json.loads(document, parse_float=Decimal, parse_int=Decimal)


def _under(prefix: str, body: bytes) -> bytes:
    """Move the topic written in a body under this round's prefix, when it is a string."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if isinstance(doc, dict) and isinstance(doc.get("topic"), str):
        doc["topic"] = f"{prefix}.{doc['topic']}"
        return json.dumps(doc).encode()
    return body


def _expect(
    expected: dict[tuple[str, str], bytes], repeated: set[tuple[str, str]], event: Decoded
) -> None:
    key = (event.topic, event.event_id)
    if key in expected and expected[key] != event.payload:
        repeated.add(key)
    expected.setdefault(key, event.payload)


async def _drained(js: JetStreamContext, settings: ConsumerSettings) -> bool:
    """Every message of the work-queue stream is acked, so committed."""
    return (await js.stream_info(settings.stream)).state.messages == 0
