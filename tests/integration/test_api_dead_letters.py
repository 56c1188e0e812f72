"""Dead letters over HTTP: listing with reasons, and replay end to end with the consumer."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from helpers import assert_invariants, running_consumer, totals, wait_until
from oncelog.consumer.settings import ConsumerSettings


async def dead_letter(
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
    messages: list[tuple[str, bytes]],
    **consumer: Any,
) -> None:
    """Publish raw messages and let a consumer (with `consumer` settings) dead-letter them."""
    for topic, data in messages:
        await js.publish(f"{settings.subject_prefix}.{topic}", data)
    async with running_consumer(msgspec.structs.replace(settings, **consumer), js, pool):
        await wait_until(lambda: _received(pool, len(messages)))


async def _received(pool: asyncpg.Pool, n: int) -> bool:
    return bool((await totals(pool))["received"] >= n)


async def stored(pool: asyncpg.Pool, n: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM events") == n)


async def test_dead_letters_newest_first_with_reasons_and_pages(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """GET /dead-letters lists letters newest first with subject, raw bytes, text and reason,
    pages through Link rel=next, and filters by topic pattern."""
    await dead_letter(
        js,
        settings,
        pool,
        [
            ("bad.a", b"not json"),
            ("bad.b", b'{"payload": {}}'),
            ("bad.a", b'{"event_id": 5}'),
            ("ok", b'{"event_id": "fine"}'),
            ("bad.c", b"\xff\xfe"),
        ],
    )
    first = await client.get("/dead-letters", params={"limit": 2})
    assert first.status_code == 200, first.text
    page = first.json()
    assert [d["topic"] for d in page] == ["bad.c", "bad.a"]
    assert page[0]["text"] is None
    assert base64.b64decode(page[0]["raw"]) == b"\xff\xfe"
    assert page[1]["text"] == '{"event_id": 5}'
    assert "event_id" in page[1]["reason"]
    assert page[1]["subject"] == f"{settings.subject_prefix}.bad.a"
    assert page[1]["truncated"] is False
    assert page[1]["replayed_at"] is None
    link = first.headers["link"]
    second = await client.get(link[1 : link.index(">")])
    assert [d["topic"] for d in second.json()] == ["bad.b", "bad.a"]
    assert "link" not in second.headers
    assert second.json()[1]["reason"].startswith("not valid JSON")
    only_a = (await client.get("/dead-letters", params={"topic": "bad.a"})).json()
    assert [d["text"] for d in only_a] == ['{"event_id": 5}', "not json"]
    assert (await client.get("/dead-letters", params={"limit": 201})).status_code == 422
    assert (await client.get("/dead-letters", params={"cursor": "!!"})).status_code == 422


async def test_replay_with_a_corrected_event_stores_it_once(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """A dead letter replayed with a corrected body is stored under the letter's topic; replaying
    it again is a duplicate, never a second row, and the statistics stay exact."""
    await dead_letter(js, settings, pool, [("orders", b'{"event_id": 7, "payload": {"n": 1}}')])
    (letter,) = (await client.get("/dead-letters")).json()
    url = f"/dead-letters/{letter['id']}/replay"
    corrected = {"event_id": "7", "payload": {"n": 1}}
    async with running_consumer(settings, js, pool):
        first = await client.post(url, json=corrected)
        assert first.status_code == 202, first.text
        body = first.json()
        assert (body["topic"], body["event_id"], body["duplicate"]) == ("orders", "7", False)
        await wait_until(lambda: stored(pool, 1))
        again = await client.post(url, json=corrected)
        assert again.status_code == 202
        assert again.json()["duplicate"] is True
        await wait_until(lambda: _received(pool, 3))
    assert await pool.fetchval("SELECT count(*) FROM events WHERE topic = 'orders'") == 1
    (listed,) = (await client.get("/dead-letters")).json()
    assert listed["replayed_at"] is not None
    stats = (await client.get("/stats")).json()
    assert stats["unique_processed"] == 1
    assert stats["dead_lettered"] == 1
    assert stats["duplicates_by_layer"] == {"broker": 1, "store": 0}
    await assert_invariants(pool)


async def test_replay_without_a_body_reinjects_the_stored_bytes(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """A letter refused by a limit since raised is replayed from its stored bytes without a body,
    stored once, and a second replay stores nothing new."""
    raw = json.dumps({"event_id": "big", "payload": {"pad": "x" * 400}}).encode()
    await dead_letter(js, settings, pool, [("big", raw)], max_event_bytes=200)
    (letter,) = (await client.get("/dead-letters")).json()
    assert "limit is 200" in letter["reason"]
    url = f"/dead-letters/{letter['id']}/replay"
    async with running_consumer(settings, js, pool):
        for _ in range(2):
            resp = await client.post(url)
            assert resp.status_code == 202, resp.text
            assert resp.json()["event_id"] == "big"
        await wait_until(lambda: stored(pool, 1))
        await wait_until(lambda: _received(pool, 3))
    row = await pool.fetchrow("SELECT source, payload FROM events WHERE topic = 'big'")
    assert row is not None
    assert json.loads(row["payload"]) == {"pad": "x" * 400}
    await assert_invariants(pool)


async def test_replay_refusals(
    client: AsyncTestClient[Any],
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
) -> None:
    """Replay answers 404 for an unknown letter, 422 when the stored bytes are still invalid or
    the corrected body is, and 409 when only a prefix of the message was kept."""
    huge = json.dumps({"event_id": "h", "payload": {"pad": "y" * 70_000}}).encode()
    await dead_letter(
        js, settings, pool, [("still", b"not json"), ("huge", huge)], max_event_bytes=1000
    )
    letters = {d["topic"]: d for d in (await client.get("/dead-letters")).json()}
    assert letters["huge"]["truncated"] is True
    assert (await client.post("/dead-letters/999999/replay")).status_code == 404
    assert (await client.post("/dead-letters/0/replay")).status_code == 422
    still = await client.post(f"/dead-letters/{letters['still']['id']}/replay")
    assert still.status_code == 422
    assert "not valid JSON" in still.json()["detail"]
    wrong = await client.post(
        f"/dead-letters/{letters['still']['id']}/replay", json={"event_id": 3}
    )
    assert wrong.status_code == 422
    assert wrong.json()["errors"][0]["field"] == "event_id"
    array = await client.post(f"/dead-letters/{letters['still']['id']}/replay", json=[])
    assert array.status_code == 422
    truncated = await client.post(f"/dead-letters/{letters['huge']['id']}/replay")
    assert truncated.status_code == 409
    assert truncated.json()["status_code"] == 409
    assert (await js.stream_info(settings.stream)).state.messages == 0


async def _refused_as_letter_id(client: AsyncTestClient[Any], segment: str) -> None:
    resp = await client.post(f"/dead-letters/{quote(segment, safe='')}/replay")
    assert resp.status_code == 422, (segment, resp.text)
    body = resp.json()
    assert body["status_code"] == 422
    assert [e["field"] for e in body["errors"]] == ["letter_id"], body


@pytest.mark.parametrize(
    "segment",
    [
        "abc",
        "-1",
        "0",
        "1e3",
        "1.0",
        "+5",
        " 5",
        "5 ",
        "1_0",
        "0x10",
        "9223372036854775808",
        "9" * 400,
        "\u0661\u0662",
        "\uff11",
        "%00",
    ],
)
async def test_a_letter_id_that_is_no_id_is_a_422_naming_it(
    client: AsyncTestClient[Any], segment: str
) -> None:
    """Replay reads its id as digits between 1 and 2^63-1: anything else, including numbers
    Python's int() would take (unicode digits, '1_0', '+5'), is a 422 naming letter_id."""
    await _refused_as_letter_id(client, segment)


async def test_the_largest_letter_id_is_read_and_not_found(client: AsyncTestClient[Any]) -> None:
    """2^63-1 and a zero-padded id are ids: an unknown one is a 404, never a 422 or a 500."""
    for segment in ("9223372036854775807", "00042"):
        resp = await client.post(f"/dead-letters/{segment}/replay")
        assert resp.status_code == 404, resp.text


async def test_an_empty_letter_id_is_no_route(client: AsyncTestClient[Any]) -> None:
    """An empty path segment, or one holding '/', addresses no letter at all: a 404 from
    routing in the one error shape, never a 500."""
    for path in ("/dead-letters//replay", "/dead-letters/1%2F2/replay"):
        resp = await client.post(path)
        assert resp.status_code == 404, resp.text
        assert resp.json()["status_code"] == 404


@hypothesis_settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# A segment holding '/' (even as %2F, which the server decodes before routing) or a dot
# segment ('.', '..', which URLs resolve away) addresses another path: a 404 from routing.
@given(
    segment=(st.text(min_size=1, max_size=30) | st.from_regex(r"\A[0-9]{1,25}\Z")).filter(
        lambda s: "/" not in s and s not in {".", ".."}
    )
)
async def test_any_letter_id_segment_is_an_id_or_a_422_naming_it(
    client: AsyncTestClient[Any], segment: str
) -> None:
    """Whatever the path segment, replay answers 404 (a valid id no letter has) or a 422 naming
    letter_id: never a 404 for a segment that is no id, never a 500."""
    resp = await client.post(f"/dead-letters/{quote(segment, safe='')}/replay")
    is_id = segment.isascii() and segment.isdigit() and 1 <= int(segment) < 2**63
    if is_id:
        assert resp.status_code == 404, (segment, resp.text)
    else:
        assert resp.status_code == 422, (segment, resp.text)
        assert [e["field"] for e in resp.json()["errors"]] == ["letter_id"]
