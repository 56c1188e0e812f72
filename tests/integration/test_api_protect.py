"""API protection and metrics: API keys, the per-client rate limit, /metrics."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import msgspec
import pytest
from nats.js import JetStreamContext

from helpers import api_client, wait_until
from oncelog.api.protect import RATE_LIMIT_HEADERS, Quota, TokenBuckets
from oncelog.api.settings import ApiSettings
from oncelog.consumer.settings import ConsumerSettings

EVENT = {"topic": "guarded", "event_id": "1"}


async def test_api_keys_guard_publish_and_read_routes(
    settings: ConsumerSettings, js: JetStreamContext
) -> None:
    """With API_KEYS_PUBLISH and API_KEYS_READ set, write and read routes answer 401 in the one
    error shape unless X-API-Key holds a key of their list; operations routes stay open."""
    async with api_client(
        settings,
        api_keys_publish="pub-1, pub-2",
        api_keys_read="read-1",
        rate_limit_per_second=0,
    ) as c:
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": "read-1"}):
            resp = await c.post("/publish", json=EVENT, headers=headers)
            assert resp.status_code == 401, headers
            body = resp.json()
            assert body["status_code"] == 401
            assert "X-API-Key" in body["detail"]
            assert resp.headers["www-authenticate"] == "X-API-Key"
        for key in ("pub-1", "pub-2"):
            resp = await c.post("/publish", json=EVENT, headers={"X-API-Key": key})
            assert resp.status_code == 202, resp.text
        for path in ("/events", "/stats", "/topics", "/dead-letters", "/queue/stats"):
            assert (await c.get(path)).status_code == 401, path
            assert (await c.get(path, headers={"X-API-Key": "pub-1"})).status_code == 401, path
            ok = await c.get(path, headers={"X-API-Key": "read-1"})
            assert ok.status_code == 200, (path, ok.text)
        replay = await c.post("/dead-letters/1/replay", headers={"X-API-Key": "read-1"})
        assert replay.status_code == 401
        for path in ("/health", "/ready", "/metrics", "/schema/openapi.json"):
            assert (await c.get(path)).status_code == 200, path


async def test_routes_are_open_without_keys(
    settings: ConsumerSettings, js: JetStreamContext
) -> None:
    """Without configured keys every route is open, whatever X-API-Key says."""
    async with api_client(settings, rate_limit_per_second=0) as c:
        resp = await c.post("/publish", json=EVENT, headers={"X-API-Key": "anything"})
        assert resp.status_code == 202
        assert (await c.get("/stats")).status_code == 200


async def test_rate_limit_is_a_token_bucket_per_client(
    settings: ConsumerSettings, js: JetStreamContext
) -> None:
    """Past its burst a client gets 429 with Retry-After in the error shape; another API key has
    its own bucket, and X-Forwarded-For does not make a new client."""
    async with api_client(
        settings,
        rate_limit_per_second=0.5,
        rate_limit_burst=3,
        api_keys_read="k1,k2",
    ) as c:
        # Waiting for readiness used /ready, which is not rate limited.
        codes = [(await c.get("/stats", headers={"X-API-Key": "k1"})).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = await c.get("/stats", headers={"X-API-Key": "k1"})
        assert limited.status_code == 429
        # Rate 0.5 a second: the next token is two seconds away.
        assert limited.headers["retry-after"] == "2"
        assert limited.json()["status_code"] == 429
        assert (await c.get("/stats", headers={"X-API-Key": "k2"})).status_code == 200
        # Unknown keys share their socket address's bucket, so inventing keys does not help.
        codes = [
            (await c.get("/stats", headers={"X-API-Key": f"fake-{i}"})).status_code
            for i in range(4)
        ]
        assert codes[-1] == 429
        spoofed = await c.get(
            "/stats", headers={"X-API-Key": "fake", "X-Forwarded-For": "203.0.113.9"}
        )
        assert spoofed.status_code == 429
        assert (await c.get("/health")).status_code == 200


async def test_concurrent_requests_share_one_bucket_on_the_event_loop(
    settings: ConsumerSettings, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty requests at once with a burst of 5: exactly 5 pass. The buckets are only touched
    on the event loop's thread, never from a worker thread racing another request."""
    on_loop: list[bool] = []
    take = TokenBuckets.take

    def recording(self: TokenBuckets, client: str) -> Quota:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # a worker thread: no event loop runs there
            on_loop.append(False)
        return take(self, client)

    monkeypatch.setattr(TokenBuckets, "take", recording)
    async with api_client(settings, rate_limit_per_second=0.01, rate_limit_burst=5) as c:
        responses = await asyncio.gather(*(c.get("/stats") for _ in range(20)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 5 + [429] * 15
    assert on_loop == [True] * 20


async def test_rate_limited_answers_carry_the_ratelimit_headers(
    settings: ConsumerSettings, js: JetStreamContext
) -> None:
    """With the limit on, every answer of a rate-limited route carries RateLimit-Limit (the
    burst), RateLimit-Remaining (counting down to 0) and RateLimit-Reset, 2xx, 4xx and 429
    alike; the 429 adds Retry-After. Probes and /metrics carry none."""
    async with api_client(
        settings, rate_limit_per_second=1, rate_limit_burst=3, api_keys_read="k"
    ) as c:
        key = {"X-API-Key": "k"}
        answers = [
            await c.get("/stats", headers=key),
            await c.get("/events", params={"limit": "1e3"}, headers=key),
            await c.post("/dead-letters/abc/replay"),
            await c.get("/stats", headers=key),
        ]
        assert [a.status_code for a in answers] == [200, 422, 422, 200]
        # The keyed requests share the key's bucket, the keyless replay its address's.
        remaining = [int(a.headers["ratelimit-remaining"]) for a in answers]
        assert remaining == [2, 1, 2, 0]
        for answer in answers:
            assert answer.headers["ratelimit-limit"] == "3"
            assert 1 <= int(answer.headers["ratelimit-reset"]) <= 3
        limited = await c.get("/stats", headers=key)
        assert limited.status_code == 429
        assert limited.headers["ratelimit-remaining"] == "0"
        assert limited.headers["ratelimit-limit"] == "3"
        assert int(limited.headers["ratelimit-reset"]) >= int(limited.headers["retry-after"])
        for path in ("/health", "/ready", "/metrics"):
            resp = await c.get(path)
            assert not {h.lower() for h in RATE_LIMIT_HEADERS} & set(resp.headers), path


async def test_no_ratelimit_headers_while_the_limit_is_off(
    settings: ConsumerSettings, js: JetStreamContext
) -> None:
    """The default is no rate limit (RATE_LIMIT_PER_SECOND=0): no 429 and no RateLimit headers,
    however fast a client asks."""
    assert msgspec.convert({}, ApiSettings).rate_limit_per_second == 0
    async with api_client(settings) as c:
        answers = [await c.get("/stats") for _ in range(300)]
    assert {a.status_code for a in answers} == {200}
    assert not {h.lower() for h in RATE_LIMIT_HEADERS} & set(answers[-1].headers)


async def test_metrics_count_by_route_template(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool
) -> None:
    """/metrics exports request counts and durations labelled with the route template, never
    the raw path, plus pool, gateway and broker-duplicate metrics."""
    async with api_client(settings, rate_limit_per_second=0) as c:
        assert (await c.post("/publish", json=EVENT)).status_code == 202
        assert (await c.post("/publish", json=[EVENT, EVENT])).status_code == 202
        await c.get("/events/guarded/1")
        await c.get("/events/other/2")
        await c.get("/no/such/route")
        await c.get("/events", params={"limit": "5000"})
        # The tally applier's connection is back in the pool once the duplicates are counted.
        await wait_until(lambda: _broker_duplicates_counted(pool, 2))
        resp = await c.get("/metrics")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        text = resp.text

    def value(pattern: str) -> float:
        match = re.search("^" + re.escape(pattern) + r" (\S+)$", text, re.MULTILINE)
        assert match, pattern
        return float(match[1])

    route = 'route="/events/{topic}/{event_id}"'
    assert value(f'oncelog_http_requests_total{{method="GET",{route},status="404"}}') == 2
    assert value(f'oncelog_http_request_duration_seconds_count{{method="GET",{route}}}') == 2
    assert "guarded" not in "".join(
        line for line in text.splitlines() if line.startswith("oncelog_http")
    )
    assert value('oncelog_http_requests_total{method="POST",route="/publish",status="202"}') == 2
    assert value('oncelog_http_requests_total{method="GET",route="/events",status="422"}') == 1
    assert value('oncelog_http_requests_total{method="GET",route="unmatched",status="404"}') == 1
    assert value("oncelog_gateway_events_published_total") == 3
    assert value('oncelog_duplicates_total{layer="broker"}') == 2
    assert value("oncelog_gateway_publish_failures_total") == 0
    # Every request is answered, so the connections the reads used are back in the pool.
    assert value('oncelog_db_pool_connections{state="in_use"}') == 0
    assert value('oncelog_db_pool_connections{state="idle"}') >= 1


async def _broker_duplicates_counted(pool: asyncpg.Pool, n: int) -> bool:
    total = await pool.fetchval("SELECT coalesce(sum(broker_duplicates), 0) FROM topic_stats")
    return bool(total == n)
