"""POST /publish against the real stack: body shapes, validation, durability, duplicates, limits."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from helpers import api_client, assert_invariants, running_consumer, totals, wait_until
from oncelog.consumer.settings import ConsumerSettings


async def stream_messages(js: JetStreamContext, settings: ConsumerSettings) -> int:
    return int((await js.stream_info(settings.stream)).state.messages)


async def stored(pool: asyncpg.Pool, n: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM events") == n)


async def test_fastapi_client_works_unchanged(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """A client written for a FastAPI aggregator publishes {"events": [...]} or a bare array,
    reads /events?topic= as an array and reads the /stats keys, unchanged."""
    envelope = {
        "events": [
            {
                "topic": "auth.login",
                "event_id": "a-1",
                "timestamp": "2026-01-01T00:00:01Z",
                "source": "svc",
                "payload": {"user": 1},
            },
            {
                "topic": "auth.login",
                "event_id": "a-2",
                "timestamp": "2026-01-01T00:00:02Z",
                "source": "svc",
                "payload": {"user": 2},
            },
        ]
    }
    first = await client.post("/publish", json=envelope)
    assert first.status_code == 202, first.text
    assert first.json() == {"accepted": 2, "duplicates": 0, "published": 2}
    array = [
        {
            "topic": "auth.login",
            "event_id": "a-2",
            "timestamp": "2026-01-01T00:00:02Z",
            "source": "svc",
            "payload": {"user": 2},
        },
        {
            "topic": "auth.logout",
            "event_id": "b-1",
            "timestamp": "2026-01-01T00:00:03Z",
            "source": "svc",
            "payload": {},
        },
    ]
    second = await client.post("/publish", json=array)
    assert second.status_code == 202, second.text
    assert second.json()["accepted"] == 2
    assert second.json()["duplicates"] == 1
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: stored(pool, 3))
    events = (await client.get("/events", params={"topic": "auth.login"})).json()
    assert isinstance(events, list)
    assert [e["event_id"] for e in events] == ["a-1", "a-2"]
    assert events[0]["payload"] == {"user": 1}
    stats = (await client.get("/stats")).json()
    for key in (
        "received",
        "unique_processed",
        "duplicate_dropped",
        "dedup_rate_percent",
        "topics",
        "uptime_seconds",
    ):
        assert key in stats
    assert stats["received"] == 4
    assert stats["unique_processed"] == 3
    assert stats["duplicate_dropped"] == 1
    assert stats["dedup_rate_percent"] == 25.0
    assert stats["topics"] == ["auth.login", "auth.logout"]
    assert stats["duplicates_by_layer"] == {"broker": 1, "store": 0}
    await assert_invariants(pool)


async def test_single_event_defaults_and_stored_fields(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """One event object is accepted; without timestamp it gets the gateway's clock, without
    source "http", without payload {}."""
    before = time.time()
    resp = await client.post("/publish", json={"topic": "one", "event_id": "x"})
    assert resp.status_code == 202, resp.text
    assert resp.json() == {"accepted": 1, "duplicates": 0, "published": 1}
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: stored(pool, 1))
    row = await pool.fetchrow("SELECT ts, source, payload FROM events")
    assert row is not None
    assert row["source"] == "http"
    assert json.loads(row["payload"]) == {}
    assert before - 1 <= row["ts"].timestamp() <= time.time() + 1


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"events": [{"topic": "t", "event_id": 1}]}, ["events[0].event_id"]),
        (
            [{"topic": "t", "event_id": "ok"}, {"topic": "t"}, {"event_id": "x"}],
            ["events[1].event_id", "events[2].topic"],
        ),
        ({"event_id": "x"}, ["topic"]),
        ({"topic": "a..b", "event_id": "x"}, ["topic"]),
        ({"topic": "a.*", "event_id": "x"}, ["topic"]),
        ({"topic": "t", "event_id": ""}, ["event_id"]),
        ({"topic": "t", "event_id": "x" * 256}, ["event_id"]),
        ({"topic": "t", "event_id": "x", "timestamp": "soon"}, ["timestamp"]),
        ({"topic": "t", "event_id": "x", "source": 5}, ["source"]),
        ({"topic": "t", "event_id": "x", "payload": [1]}, ["payload"]),
        ({"topic": "t", "event_id": "x", "payload": "text"}, ["payload"]),
        ({"topic": "t", "event_id": "x", "payload": {"a": "nul\u0000"}}, ["payload"]),
        ({"events": "many"}, ["events"]),
        ({"events": [1]}, ["events[0]"]),
        (5, ["body"]),
        ("text", ["body"]),
    ],
)
async def test_invalid_events_are_422_naming_each_field_and_nothing_is_published(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    body: Any,
    fields: list[str],
) -> None:
    """An invalid event makes the whole request a 422 listing each bad field by index and name,
    and no event of the request reaches the stream."""
    resp = await client.post("/publish", json=body)
    assert resp.status_code == 422, resp.text
    answer = resp.json()
    assert answer["status_code"] == 422
    assert [e["field"] for e in answer["errors"]] == fields
    assert all(e["message"] for e in answer["errors"])
    assert await stream_messages(js, settings) == 0


@pytest.mark.parametrize("raw", [b"", b"   ", b"{", b"[1,", b"\xff\xfe"])
async def test_unreadable_bodies_are_422(
    client: AsyncTestClient[Any], js: JetStreamContext, settings: ConsumerSettings, raw: bytes
) -> None:
    """An empty or malformed body is a 422 naming the body, never a 500."""
    resp = await client.post("/publish", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["field"] == "body"
    assert await stream_messages(js, settings) == 0


async def test_body_over_the_limit_is_413(settings: ConsumerSettings, js: JetStreamContext) -> None:
    """A body over MAX_BODY_BYTES is refused with 413 in the one error shape."""
    async with api_client(settings, max_body_bytes=2048, rate_limit_per_second=0) as c:
        big = [{"topic": "t", "event_id": str(i), "payload": {"pad": "x" * 100}} for i in range(30)]
        resp = await c.post("/publish", json=big)
        assert resp.status_code == 413
        body = resp.json()
        assert body["status_code"] == 413
        assert body["detail"]
        assert body["errors"] == []
        small = await c.post("/publish", json=big[:3])
        assert small.status_code == 202
    assert await stream_messages(js, settings) == 3


async def test_broker_unreachable_is_503_with_retry_after(settings: ConsumerSettings) -> None:
    """Without a broker, POST /publish answers 503 with Retry-After in the error shape."""
    async with api_client(
        settings, ready=False, nats_url="nats://127.0.0.1:1", rate_limit_per_second=0
    ) as c:
        resp = await c.post("/publish", json={"topic": "t", "event_id": "1"})
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "1"
        assert "NATS" in resp.json()["detail"]


async def test_full_stream_is_503_and_the_same_body_can_be_retried(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool
) -> None:
    """When the stream refuses publishes (full, discard=new), POST /publish answers 503 with
    Retry-After; once there is room the same body is retried and every event is stored once."""
    async with api_client(
        settings, stream_max_bytes=4096, publish_timeout_seconds=0.5, rate_limit_per_second=0
    ) as c:
        batch = [
            {"topic": "full", "event_id": f"e{i}", "payload": {"pad": "x" * 200}} for i in range(40)
        ]
        resp = await c.post("/publish", json=batch)
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "1"
        assert "retry" in resp.json()["detail"]
        failures = re.search(
            r"^oncelog_gateway_publish_failures_total (\S+)$",
            (await c.get("/metrics")).text,
            re.MULTILINE,
        )
        assert failures is not None
        # The events the full stream refused are counted, and only those: some did fit.
        assert 0 < float(failures[1]) < len(batch)

        async def accepted() -> bool:
            return (await c.post("/publish", json=batch)).status_code == 202

        # The consumer drains the stream, so it has room again; the retry is idempotent.
        async with running_consumer(settings, js, pool):
            await wait_until(accepted, interval=0.2)
            await wait_until(lambda: stored(pool, 40))
            await wait_until(lambda: _all_counted(pool))
    result = await assert_invariants(pool)
    assert result["stored"] == 40


async def _all_counted(pool: asyncpg.Pool) -> bool:
    t = await totals(pool)
    return bool(t["received"] == t["stored"] + t["broker_duplicates"] + t["store_duplicates"])


async def test_twenty_thousand_events_at_thirty_percent_duplicates(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """20,000 events over HTTP in batches of 100 at 30% duplicates: every unique event stored
    once, /stats exact, no 5xx."""
    rng = random.Random(3)
    unique = [
        {
            "topic": f"load.t{i % 5}",
            "event_id": f"u-{i}",
            "timestamp": f"2026-01-01T00:{(i // 60) % 60:02d}:{i % 60:02d}Z",
            "payload": {"i": i},
        }
        for i in range(14_000)
    ]
    # 6,000 repeats, each placed after its original: in the same batch or up to 20 batches later.
    keyed = [(float(i), e) for i, e in enumerate(unique)]
    for _ in range(6_000):
        j = rng.randrange(len(unique))
        keyed.append((j + rng.uniform(0.5, 2_000), unique[j]))
    sent = [e for _, e in sorted(keyed, key=lambda pair: pair[0])]
    assert len(sent) == 20_000
    statuses: list[int] = []
    gate = asyncio.Semaphore(8)

    async def post(batch: list[dict[str, Any]]) -> None:
        async with gate:
            resp = await client.post("/publish", json=batch)
            statuses.append(resp.status_code)

    started = time.monotonic()
    async with running_consumer(settings, js, pool):
        await asyncio.gather(*(post(sent[i : i + 100]) for i in range(0, 20_000, 100)))
        published = time.monotonic() - started
        await wait_until(lambda: stored(pool, 14_000), within=60)
        await wait_until(lambda: _all_counted(pool))
    assert statuses == [202] * 200
    stats = (await client.get("/stats")).json()
    assert stats["received"] == 20_000
    assert stats["unique_processed"] == 14_000
    assert stats["duplicate_dropped"] == 6_000
    assert stats["dedup_rate_percent"] == 30.0
    assert stats["topics"] == [f"load.t{i}" for i in range(5)]
    await assert_invariants(pool)
    print(f"20,000 events over HTTP published in {published:.1f}s")  # noqa: T201
