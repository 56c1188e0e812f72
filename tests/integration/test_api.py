"""The HTTP API's read routes against the real stack: events, pagination, stats, topics, queue."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext
from prometheus_client.exposition import choose_encoder

from helpers import api_client, running_consumer, totals, wait_until
from oncelog.api import gateway, operations
from oncelog.consumer.settings import ConsumerSettings


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


def instant(text: str) -> datetime:
    """Read an RFC 3339 time from a response."""
    return datetime.fromisoformat(text)


def next_url(resp: Any) -> str | None:
    match = re.fullmatch(r'<(?P<url>[^>]+)>; rel="next"', resp.headers.get("link", ""))
    return match["url"] if match else None


async def test_health_and_ready(client: AsyncTestClient[Any]) -> None:
    """/health answers while alive; /ready names NATS and PostgreSQL as ok."""
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).json() == {
        "status": "ready",
        "nats": "ok",
        "postgres": "ok",
    }


async def test_ready_names_the_failing_part(settings: ConsumerSettings) -> None:
    """/ready answers 503 in the error shape naming NATS when the broker cannot be reached."""
    async with api_client(settings, ready=False, nats_url="nats://127.0.0.1:1") as c:
        resp = await c.get("/ready")
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "1"
        body = resp.json()
        assert body["errors"] == [{"field": "nats", "message": "unreachable"}]
        assert "nats" in body["detail"]
        # Liveness does not depend on the broker.
        assert (await c.get("/health")).status_code == 200


async def test_postgres_unreachable_is_503_naming_it(
    settings: ConsumerSettings, js: JetStreamContext
) -> None:
    """Without PostgreSQL, reads answer 503 with Retry-After and /ready names postgres."""
    async with api_client(
        settings,
        ready=False,
        database_url="postgresql://postgres@127.0.0.1:1/none",
        rate_limit_per_second=0,
        # The test's settings carry the consumer's pool minimum; the API's own default is 0.
        db_pool_min=0,
    ) as c:
        for path in ("/events", "/stats", "/topics", "/dead-letters", "/events/a/b"):
            resp = await c.get(path)
            assert resp.status_code == 503, path
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["detail"] == "PostgreSQL is unavailable; retry later"

        async def postgres_named() -> bool:
            body = (await c.get("/ready")).json()
            return bool(body.get("errors") == [{"field": "postgres", "message": "unreachable"}])

        await wait_until(postgres_named, within=10)


async def test_a_nats_socket_error_is_503_naming_nats_not_postgres(
    client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket error on the way to NATS while publishing is a 503 that names NATS, never one
    that blames PostgreSQL."""

    async def reset(*_: Any, **__: Any) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(gateway, "publish_many", reset)
    resp = await client.post("/publish", json={"topic": "t", "event_id": "1"})
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "1"
    detail = resp.json()["detail"]
    assert "NATS" in detail
    assert "PostgreSQL" not in detail


async def test_an_os_error_of_neither_server_is_a_500(
    client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError that is neither PostgreSQL's nor NATS's (a file error, say) is a 500, not a
    503 telling the client to retry against a database that is fine."""

    def unreadable(*_: Any) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(operations, "choose_encoder", lambda _: (unreadable, "text/plain"))
    resp = await client.get("/metrics")
    assert resp.status_code == 500, resp.text
    assert resp.json()["detail"] == "internal server error"


@pytest.mark.parametrize(
    "accept",
    [
        "",
        "text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
        "application/openmetrics-text;version=1.0.0;escaping=underscores;q=0.5,"
        "text/plain;version=1.0.0;escaping=underscores;q=0.4",
        "application/openmetrics-text",
    ],
)
async def test_metrics_content_type_is_prometheus_clients_own(
    client: AsyncTestClient[Any], accept: str
) -> None:
    """/metrics negotiates the format like prometheus_client's own handler and sends its
    Content-Type unchanged: one charset, which Go's media-type parser (Prometheus 3) needs."""
    expected = choose_encoder(accept)[1]
    resp = await client.get("/metrics", headers={"accept": accept} if accept else {})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == expected
    assert resp.headers["content-type"].count("charset") == 1
    assert "oncelog_http_requests_total" in resp.text


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
    assert "link" not in resp.headers


async def test_wildcards_time_range_and_order(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """`*` matches one token, `>` one or more; since/until bound the time; order=desc reverses."""
    topics = ["auth", "auth.prod", "auth.prod.login", "auth.dev", "authx.prod", "billing.prod"]
    await seed(
        js,
        settings,
        pool,
        [
            {"topic": t, "event_id": f"e{i}", "timestamp": f"2026-01-01T00:00:0{i}Z"}
            for i, t in enumerate(topics)
        ],
    )

    async def topics_of(**params: Any) -> list[str]:
        resp = await client.get("/events", params=params)
        assert resp.status_code == 200, resp.text
        return [e["topic"] for e in resp.json()]

    assert await topics_of(topic="auth.*") == ["auth.prod", "auth.dev"]
    assert await topics_of(topic="auth.>") == ["auth.prod", "auth.prod.login", "auth.dev"]
    assert await topics_of(topic="*.prod") == ["auth.prod", "authx.prod", "billing.prod"]
    assert await topics_of(topic=">") == topics
    assert await topics_of(topic="auth") == ["auth"]
    assert await topics_of() == topics
    assert await topics_of(since="2026-01-01T00:00:02Z", until="2026-01-01T00:00:04Z") == [
        "auth.prod.login",
        "auth.dev",
    ]
    # A time without zone is UTC, as the contract says.
    assert await topics_of(since="2026-01-01T00:00:05") == ["billing.prod"]
    assert await topics_of(order="desc", limit=2) == ["billing.prod", "authx.prod"]


async def test_pagination_returns_each_event_once_while_events_arrive(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """Walking Link rel=next pages returns every stored event exactly once, in order, even while
    new events with earlier, equal and later timestamps are being stored."""
    stamps = [f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z" for i in range(0, 300, 2)]
    seeded = [
        {"topic": f"p.t{i % 3}", "event_id": f"old-{i}", "timestamp": stamps[i // 2]}
        for i in range(300)
    ]
    await seed(js, settings, pool, [dict(e) for e in seeded])
    async with running_consumer(settings, js, pool):
        arriving = [
            {"topic": f"p.t{i % 3}", "event_id": f"new-{i}", "timestamp": stamps[(i * 7) % 150]}
            for i in range(150)
        ]

        async def publish_more() -> None:
            for i in range(0, 150, 10):
                resp = await client.post("/publish", json=arriving[i : i + 10])
                assert resp.status_code == 202, resp.text
                await asyncio.sleep(0)

        writer = asyncio.create_task(publish_more())
        seen: list[tuple[str, str, str]] = []
        url: str | None = "/events?topic=p.>&limit=23"
        pages = 0
        while url is not None:
            resp = await client.get(url)
            assert resp.status_code == 200, resp.text
            page = resp.json()
            assert len(page) <= 23
            seen += [(e["timestamp"], e["topic"], e["event_id"]) for e in page]
            url = next_url(resp)
            pages += 1
        await writer
    assert pages >= 14
    ids = [key[2] for key in seen]
    assert len(ids) == len(set(ids)), "an event came back twice"
    assert {e["event_id"] for e in seeded} <= set(ids), "a stored event was skipped"
    assert seen == sorted(seen)


async def test_pagination_descending(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """order=desc pages go newest first and a cursor cannot be reused for the other order."""
    await seed(
        js,
        settings,
        pool,
        [
            {"topic": "d", "event_id": f"{i:02d}", "timestamp": "2026-01-01T00:00:00Z"}
            for i in range(10)
        ],
    )
    first = await client.get("/events", params={"topic": "d", "limit": 4, "order": "desc"})
    assert [e["event_id"] for e in first.json()] == ["09", "08", "07", "06"]
    url = next_url(first)
    assert url is not None
    second = await client.get(url)
    assert [e["event_id"] for e in second.json()] == ["05", "04", "03", "02"]
    cursor = url.split("cursor=")[1]
    wrong = await client.get("/events", params={"topic": "d", "order": "asc", "cursor": cursor})
    assert wrong.status_code == 422
    assert wrong.json()["errors"][0]["field"] == "cursor"


async def test_a_page_holds_at_most_events_page_bytes_of_payloads(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """A page ends early once its payloads would pass EVENTS_PAGE_BYTES, with a next link: big
    events cannot make one response hold a gigabyte. An event bigger than the budget comes
    alone, and walking the pages still returns every event once, in order."""
    events = [
        {
            "topic": "big",
            "event_id": f"{i:02d}",
            "timestamp": f"2026-01-01T00:00:{i:02d}Z",
            "payload": {"pad": "x" * (2000 if i == 9 else 480)},
        }
        for i in range(10)
    ]
    await seed(js, settings, pool, events)
    async with api_client(settings, events_page_bytes=1200, rate_limit_per_second=0) as c:
        pages: list[list[str]] = []
        url: str | None = "/events?topic=big&limit=100"
        while url is not None:
            resp = await c.get(url)
            assert resp.status_code == 200, resp.text
            pages.append([e["event_id"] for e in resp.json()])
            url = next_url(resp)
    # Payloads of about 490 bytes: three start within 1,200 bytes, the fourth would not.
    assert pages == [["00", "01", "02"], ["03", "04", "05"], ["06", "07", "08"], ["09"]]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "1001"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"topic": "a..b"}, "topic"),
        ({"topic": "a.>.b"}, "topic"),
        ({"topic": "a b"}, "topic"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-01T00:00:00Z"}, "until"),
        ({"order": "sideways"}, "order"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "WzFd"}, "cursor"),
    ],
)
async def test_events_rejects_bad_queries_naming_the_field(
    client: AsyncTestClient[Any], params: dict[str, str], field: str
) -> None:
    """Every bad query parameter of GET /events is a 422 in the one error shape naming it."""
    resp = await client.get("/events", params=params)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["status_code"] == 422
    assert field in [e["field"] for e in body["errors"]], body


async def test_one_event_with_its_provenance(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """GET /events/{topic}/{event_id} returns the event, its stream sequence, when it was stored,
    and how many copies the store dropped and when the last one came; unknown keys are 404."""
    await seed(
        js,
        settings,
        pool,
        [
            {"topic": "orders.eu", "event_id": "o-1", "payload": {"n": 1}},
            {"topic": "orders.eu", "event_id": "o-1", "payload": {"n": 1}},
            {"topic": "orders.eu", "event_id": "o-1", "payload": {"n": 2}},
            {"topic": "orders.eu", "event_id": "o-2"},
        ],
    )
    resp = await client.get("/events/orders.eu/o-1")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["event"]["payload"] == {"n": 1}
    assert body["event"]["topic"] == "orders.eu"
    p = body["provenance"]
    assert p["stream_seq"] == 1
    assert p["store_duplicates"] == 2
    # Compared as instants: the texts differ in length when a fraction of a second is zero.
    received = instant(p["received_at"])
    assert received <= instant(p["first_stored_at"])
    assert received <= instant(p["last_duplicate_at"])
    quiet = (await client.get("/events/orders.eu/o-2")).json()["provenance"]
    assert quiet["store_duplicates"] == 0
    assert quiet["last_duplicate_at"] is None
    missing = await client.get("/events/orders.eu/nope")
    assert missing.status_code == 404
    assert missing.json()["status_code"] == 404
    assert "nope" in missing.json()["detail"]


async def test_stats_carry_the_keys_existing_clients_read(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """GET /stats has received, unique_processed, duplicate_dropped, dedup_rate_percent, topics,
    uptime_seconds, and they add up; the uptime grows between two calls."""
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
    assert stats["topic_count"] == 2
    assert stats["duplicates_by_layer"] == {"broker": 0, "store": 1}
    assert stats["dead_lettered"] == 0
    assert stats["redelivered"] == 0
    assert stats["per_topic"]["x"]["duplicate_dropped"] == 1
    assert stats["per_topic"]["y"]["unique_processed"] == 2
    first = stats["uptime_seconds"]
    assert first > 0

    async def later_uptime() -> bool:
        return bool((await client.get("/stats")).json()["uptime_seconds"] > first)

    await wait_until(later_uptime, within=5)


async def test_topics_with_counts_and_time_range(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """GET /topics lists each topic with its counts and first/last timestamps; topic= filters."""
    await seed(
        js,
        settings,
        pool,
        [
            {"topic": "t.a", "event_id": "1", "timestamp": "2026-01-01T00:00:05Z"},
            {"topic": "t.a", "event_id": "2", "timestamp": "2026-01-01T00:00:01Z"},
            {"topic": "t.a", "event_id": "2", "timestamp": "2026-01-01T00:00:01Z"},
            {"topic": "u", "event_id": "1", "timestamp": "2026-01-01T00:00:09Z"},
        ],
    )
    body = (await client.get("/topics")).json()
    assert [t["topic"] for t in body] == ["t.a", "u"]
    a = body[0]
    assert (a["received"], a["unique_processed"], a["duplicate_dropped"]) == (3, 2, 1)
    assert a["first_timestamp"] == "2026-01-01T00:00:01Z"
    assert a["last_timestamp"] == "2026-01-01T00:00:05Z"
    assert a["last_stored_at"] is not None
    assert [t["topic"] for t in (await client.get("/topics?topic=t.*")).json()] == ["t.a"]
    assert (await client.get("/topics?topic=t..")).status_code == 422


async def test_queue_stats(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """GET /queue/stats shows unconsumed messages as stream messages and consumer pending, then
    zero once the consumer has stored them."""
    for i in range(5):
        await js.publish(f"{settings.subject_prefix}.q", json.dumps({"event_id": str(i)}).encode())
    body = (await client.get("/queue/stats")).json()
    assert body["stream"]["name"] == settings.stream
    assert body["stream"]["messages"] == 5
    assert body["stream"]["bytes"] > 0
    assert body["stream"]["last_seq"] == 5
    assert body["consumer"]["name"] == settings.durable
    assert body["consumer"]["pending"] == 5
    async with running_consumer(settings, js, pool):

        async def drained() -> bool:
            b = (await client.get("/queue/stats")).json()
            return bool(b["stream"]["messages"] == 0 and b["consumer"]["ack_pending"] == 0)

        await wait_until(drained)
    body = (await client.get("/queue/stats")).json()
    assert body["consumer"]["pending"] == 0
    assert body["consumer"]["last_acked_at"] is not None
