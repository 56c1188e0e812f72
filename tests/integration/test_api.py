"""The HTTP API against the real stack: health, readiness, events and stats."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from helpers import running_consumer, totals, wait_until
from oncelog.api.app import create_app
from oncelog.platform.settings import ApiSettings, ConsumerSettings


@pytest.fixture
async def client(
    settings: ConsumerSettings, js: JetStreamContext
) -> AsyncIterator[AsyncTestClient[Any]]:
    api_settings = msgspec.convert(
        {f: getattr(settings, f) for f in ApiSettings.__struct_fields__ if hasattr(settings, f)},
        ApiSettings,
    )
    async with AsyncTestClient(app=create_app(api_settings)) as c:
        await wait_until(lambda: _ready(c), within=10)
        yield c


async def _ready(c: AsyncTestClient[Any]) -> bool:
    return (await c.get("/ready")).status_code == 200


async def seed(
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
    events: list[dict[str, Any]],
) -> None:
    for e in events:
        await js.publish(f"{settings.subject_prefix}.{e.pop('topic')}", json.dumps(e).encode())
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: _received(pool, len(events)))


async def _received(pool: asyncpg.Pool, n: int) -> bool:
    return bool((await totals(pool))["received"] == n)


async def test_health_and_ready(client: AsyncTestClient[Any]) -> None:
    """/health answers while alive; /ready names NATS and PostgreSQL as ok."""
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).json() == {
        "status": "ready",
        "nats": "ok",
        "postgres": "ok",
    }


async def test_events_of_a_topic_as_a_json_array(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """GET /events?topic=X returns that topic's events, oldest first, as a plain array."""
    await seed(
        js,
        settings,
        pool,
        [
            {
                "topic": "a.b",
                "event_id": "2",
                "timestamp": "2026-01-01T00:00:02Z",
                "payload": {"k": 2},
            },
            {"topic": "a.b", "event_id": "1", "timestamp": "2026-01-01T00:00:01Z", "source": "s"},
            {"topic": "a.c", "event_id": "3", "timestamp": "2026-01-01T00:00:03Z"},
        ],
    )
    resp = await client.get("/events", params={"topic": "a.b"})
    assert resp.status_code == 200
    body = resp.json()
    assert [e["event_id"] for e in body] == ["1", "2"]
    assert body[1] == {
        "topic": "a.b",
        "event_id": "2",
        "timestamp": "2026-01-01T00:00:02Z",
        "source": "nats",
        "payload": {"k": 2},
    }


async def test_stats_carry_the_keys_existing_clients_read(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """GET /stats has received, unique_processed, duplicate_dropped, dedup_rate_percent, topics,
    uptime_seconds, and they add up."""
    await seed(
        js,
        settings,
        pool,
        [
            {"topic": "x", "event_id": "1"},
            {"topic": "x", "event_id": "1"},
            {"topic": "y", "event_id": "1"},
            {"topic": "y", "event_id": "2"},
        ],
    )
    stats = (await client.get("/stats")).json()
    assert stats["received"] == 4
    assert stats["unique_processed"] == 3
    assert stats["duplicate_dropped"] == 1
    assert stats["dedup_rate_percent"] == 25.0
    assert stats["topics"] == ["x", "y"]
    assert stats["uptime_seconds"] >= 0
    assert stats["duplicates_by_layer"] == {"broker": 0, "store": 1}
    assert stats["per_topic"]["x"]["duplicate_dropped"] == 1
