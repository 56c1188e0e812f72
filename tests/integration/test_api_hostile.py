"""Hostile HTTP input: each input once broke a promise; each now gets a clear 4xx or is stored."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from nats.aio.client import Client
from nats.js import JetStreamContext

from helpers import assert_invariants, running_consumer, wait_until
from oncelog.api.ingest import BodyError, prepare
from oncelog.consumer.settings import ConsumerSettings

JSON = {"Content-Type": "application/json"}


def _errors(resp: Any) -> dict[str, str]:
    return {e["field"]: e["message"] for e in resp.json()["errors"]}


async def test_ids_that_differ_only_in_whitespace_are_different_events(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """Event ids differing by a space, a non-breaking or ideographic space are stored apart."""
    ids = ["x-1", "x-1 ", " x-1", "x-1\u3000", "x-1\u00a0", "x 1", "x\u20281", "x-1~", "x-1:"]
    resp = await client.post("/publish", json=[{"topic": "ws", "event_id": i} for i in ids])
    assert resp.status_code == 202, resp.text
    assert resp.json()["duplicates"] == 0
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: pool.fetchval("SELECT count(*) FROM events"), within=20)
        await wait_until(
            lambda: pool.fetchval("SELECT count(*) = $1 FROM events", len(ids)), within=20
        )
    stored = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM events")}
    assert stored == set(ids)
    again = await client.post("/publish", json=[{"topic": "ws", "event_id": i} for i in ids])
    assert again.json()["duplicates"] == len(ids)
    await assert_invariants(pool)


@pytest.mark.parametrize("event_id", ["x\n1", "x\r1", "x\t1", "x\x001", "x\x7f", "x\x85"])
async def test_control_characters_in_an_event_id_are_422(
    client: AsyncTestClient[Any], event_id: str
) -> None:
    """A control character in event_id is refused naming the field, never altered."""
    resp = await client.post("/publish", json={"topic": "cc", "event_id": event_id})
    assert resp.status_code == 422, resp.text
    assert "control characters" in _errors(resp)["event_id"]


async def test_a_newline_in_a_topic_is_422_and_breaks_nothing(
    client: AsyncTestClient[Any], js: JetStreamContext, settings: ConsumerSettings
) -> None:
    """A topic ending in a newline is a quick 422; the broker connection stays up for others."""
    for topic in ["nl.t\n", "nl.t\r\n", "nl t", "nl.t\x00", "nl.\u0131"]:
        started = time.monotonic()
        resp = await client.post("/publish", json={"topic": topic, "event_id": "e"})
        assert resp.status_code == 422, (topic, resp.text)
        assert "topic" in _errors(resp)
        assert time.monotonic() - started < 2
    ok = await client.post("/publish", json={"topic": "nl.t", "event_id": "e"})
    assert ok.status_code == 202, ok.text
    assert (await js.stream_info(settings.stream)).state.messages == 1


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"event_id": "a\u0000b"}, "event_id"),
        ({"event_id": "a", "source": "s\u0000"}, "source"),
        ({"event_id": "a", "payload": {"s": "\u0000"}}, "payload"),
        ({"event_id": "a", "payload": {"\u0000": 1}}, "payload"),
        ({"event_id": "a", "timestamp": "9999-12-31T23:59:59-01:00"}, "timestamp"),
        ({"event_id": "a", "timestamp": "0001-01-01T00:00:00+01:00"}, "timestamp"),
    ],
)
async def test_events_the_store_cannot_hold_are_422_before_publishing(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    event: dict[str, Any],
    field: str,
) -> None:
    """What PostgreSQL would refuse is refused over HTTP naming the field; nothing is published."""
    resp = await client.post("/publish", json={"topic": "unstorable"} | event)
    assert resp.status_code == 422, resp.text
    assert field in _errors(resp)
    assert (await js.stream_info(settings.stream)).state.messages == 0


@pytest.mark.parametrize("number", [b"1e1000000", b"-1e400", b"1e-400", b"0e-20000", b"9" * 400])
async def test_numbers_out_of_range_are_422(client: AsyncTestClient[Any], number: bytes) -> None:
    """A payload number outside a 64-bit float's range is a 422 naming the payload."""
    body = b'{"topic": "num", "event_id": "n", "payload": {"n": %s}}' % number
    resp = await client.post("/publish", content=body, headers=JSON)
    assert resp.status_code == 422, resp.text
    assert "payload" in _errors(resp)


@pytest.mark.parametrize("depth", [101, 1000, 100_000])
async def test_deep_nesting_is_422_not_500(client: AsyncTestClient[Any], depth: int) -> None:
    """A body nested deeper than the limit, or than the interpreter's stack, is a 422."""
    inner = b"[" * depth + b"]" * depth
    for body in [
        b'{"topic": "deep", "event_id": "d", "payload": {"a": %s}}' % inner,
        b"[" * depth + b"]" * depth,
        b'{"events": %s}' % inner,
    ]:
        resp = await client.post("/publish", content=body, headers=JSON)
        assert resp.status_code == 422, resp.text[:300]


async def test_replay_with_a_deep_body_is_422(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """A dead letter replayed with a deeply nested correction is a 422, not a 500."""
    await js.publish(f"{settings.subject_prefix}.dl", b"not json")
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: pool.fetchval("SELECT count(*) FROM dead_letters"))
    letter = await pool.fetchval("SELECT id FROM dead_letters")
    inner = b"[" * 1000 + b"]" * 1000
    resp = await client.post(
        f"/dead-letters/{letter}/replay",
        content=b'{"event_id": "d", "payload": {"a": %s}}' % inner,
        headers=JSON,
    )
    assert resp.status_code == 422, resp.text[:300]
    resp = await client.post(f"/dead-letters/{letter}/replay", content=b"[" * 5000, headers=JSON)
    assert resp.status_code == 422, resp.text[:300]


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
async def test_publish_refuses_bodies_not_declared_json(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    content_type: str | None,
) -> None:
    """A body a browser could send cross-origin without a preflight is a 415; nothing is published."""
    body = json.dumps({"topic": "ct", "event_id": "1"}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    resp = await client.post("/publish", content=body, headers=headers)
    assert resp.status_code == 415, resp.text
    assert resp.json()["errors"][0]["field"] == "Content-Type"
    assert (await js.stream_info(settings.stream)).state.messages == 0


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/cloudevents+json",
    ],
)
async def test_publish_takes_json_with_parameters(
    client: AsyncTestClient[Any], content_type: str
) -> None:
    """application/json with parameters, in any case, and +json types are JSON."""
    body = json.dumps({"topic": "ct", "event_id": content_type}).encode()
    resp = await client.post("/publish", content=body, headers={"Content-Type": content_type})
    assert resp.status_code == 202, resp.text


async def test_replay_with_a_text_body_is_415(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """Replaying with a body that is not declared JSON is a 415; without a body it needs none."""
    await js.publish(f"{settings.subject_prefix}.dl", b'{"event_id": "fixed"')
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: pool.fetchval("SELECT count(*) FROM dead_letters"))
    letter = await pool.fetchval("SELECT id FROM dead_letters")
    text = await client.post(
        f"/dead-letters/{letter}/replay",
        content=b'{"event_id": "fixed"}',
        headers={"Content-Type": "text/plain"},
    )
    assert text.status_code == 415, text.text
    bare = await client.post(f"/dead-letters/{letter}/replay")
    # Without a body the stored bytes are replayed; they are still not an event.
    assert bare.status_code == 422, bare.text


@pytest.mark.parametrize(
    "query",
    [
        "topic=a.b%0A",
        "topic=a.b%0D",
        "topic=a%00",
        "topic=a.>.b",
        "topic=a..b",
        "limit=1e3",
        "limit=10.0",
        "limit=%2B5",
        "limit=0x10",
        "limit=%EF%BC%95",
    ],
)
async def test_bad_query_parameters_are_422(client: AsyncTestClient[Any], query: str) -> None:
    """A topic with a line break or a limit not written in digits is a 422 naming it."""
    for route in ["/events", "/dead-letters"]:
        resp = await client.get(f"{route}?{query}")
        assert resp.status_code == 422, (route, query, resp.text)
        assert query.partition("=")[0] in _errors(resp)


async def test_the_largest_event_the_gateway_accepts_is_stored(
    client: AsyncTestClient[Any],
    nc: Client,
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """At the size limit: the largest accepted event reaches the store; one byte more is a 422."""
    max_payload = nc.max_payload

    def body(size: int) -> bytes:
        return json.dumps(
            {
                "topic": "big",
                "event_id": "b",
                "source": "s",
                "timestamp": "2026-01-01T00:00:00Z",
                "payload": {"s": "x" * size},
            }
        ).encode()

    def accepted(size: int) -> bool:
        try:
            prepare(body(size), now=datetime.now(UTC), subject_prefix="ev", max_payload=max_payload)
        except BodyError:
            return False
        return True

    low, high = 0, max_payload
    while low + 1 < high:
        middle = (low + high) // 2
        low, high = (middle, high) if accepted(middle) else (low, middle)
    over = await client.post("/publish", content=body(high), headers=JSON)
    assert over.status_code == 422, over.text[:200]
    assert "broker's limit" in _errors(over)["body"]
    ok = await client.post("/publish", content=body(low), headers=JSON)
    assert ok.status_code == 202, ok.text[:200]
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: pool.fetchval("SELECT count(*) = 1 FROM events"), within=20)
    assert await pool.fetchval("SELECT length(payload->>'s') FROM events") == low
