"""The ingest pipeline end to end against a real nats-server and PostgreSQL."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import msgspec
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from helpers import assert_invariants, one, running_consumer, totals, wait_until
from oncelog.consumer.loop import to_item
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import msg_id
from oncelog.platform import broker
from oncelog.platform.wire import Delivery
from oncelog.store.batch import store_batch


def body(event_id: str, **fields: object) -> bytes:
    return json.dumps({"event_id": event_id, **fields}).encode()


async def publish(
    js: JetStreamContext, settings: ConsumerSettings, topic: str, event_id: str, **fields: object
) -> bool:
    """Publish one event with the contract's Msg-Id; return the broker's duplicate flag."""
    ack = await js.publish(
        f"{settings.subject_prefix}.{topic}",
        body(event_id, **fields),
        headers={"Nats-Msg-Id": msg_id(topic, event_id)},
    )
    return bool(ack.duplicate)


async def stored_count(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM events"))


async def test_events_are_stored_with_defaults_from_the_nats_path(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """An event without timestamp and source gets the broker's time and source "nats"."""
    await publish(js, settings, "auth.prod", "e-1", payload={"user": 7})
    await publish(js, settings, "auth.prod", "e-2", source="svc", timestamp="2026-01-02T03:04:05")
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: _count_is(pool, 2))
    rows = {r["event_id"]: r for r in await pool.fetch("SELECT * FROM events")}
    assert rows["e-1"]["source"] == "nats"
    assert json.loads(rows["e-1"]["payload"]) == {"user": 7}
    assert rows["e-1"]["ts"] == rows["e-1"]["received_at"]
    assert rows["e-2"]["source"] == "svc"
    assert rows["e-2"]["ts"].isoformat() == "2026-01-02T03:04:05+00:00"
    assert json.loads(rows["e-2"]["payload"]) == {}


async def _count_is(pool: asyncpg.Pool, n: int) -> bool:
    return await stored_count(pool) == n


async def test_broker_drops_a_retry_inside_the_duplicate_window(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """A second publish with the same Msg-Id inside the window is acked as a duplicate."""
    assert await publish(js, settings, "t", "same") is False
    assert await publish(js, settings, "t", "same") is True
    info = await js.stream_info(settings.stream)
    assert info.state.messages == 1


async def test_store_drops_a_duplicate_the_broker_let_through(
    nc: Client, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """Past the broker's window, the permanent unique key keeps the second copy out."""
    short = msgspec.structs.replace(settings, duplicate_window_seconds=0.5)
    js = nc.jetstream()
    await broker.ensure_stream(js, short)
    await broker.ensure_consumer(js, short)
    assert await publish(js, short, "billing", "late", payload={"n": 1}) is False

    async def published_again() -> bool:
        return not await publish(js, short, "billing", "late", payload={"n": 1})

    # Retries inside the window are dropped; the first one after it passes the broker.
    await wait_until(published_again, within=10, interval=0.1)
    async with running_consumer(short, js, pool):
        await wait_until(lambda: _totals_received(pool, 2))
    stats = await assert_invariants(pool)
    assert stats["stored"] == 1
    assert stats["store_duplicates"] == 1
    assert stats["conflicting"] == 0
    dup = await one(pool, "SELECT * FROM duplicates")
    assert dup["event_id"] == "late"
    assert dup["same_payload"] is True


async def _totals_received(pool: asyncpg.Pool, n: int) -> bool:
    return bool((await totals(pool))["received"] == n)


async def test_a_duplicate_with_another_payload_is_recorded_as_conflicting(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """A copy with the same key but a different payload is dropped and marked conflicting."""
    subject = f"{settings.subject_prefix}.orders"
    await js.publish(subject, body("o-1", payload={"v": 1}))
    await js.publish(subject, body("o-1", payload={"v": 2}))
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: _totals_received(pool, 2))
    stats = await assert_invariants(pool)
    assert (stats["stored"], stats["store_duplicates"], stats["conflicting"]) == (1, 1, 1)
    stored = await pool.fetchval("SELECT payload FROM events WHERE event_id = 'o-1'")
    assert json.loads(stored) == {"v": 1}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "invalid event"),
        (b'"just a string"', "invalid event"),
        (b'{"source": "x"}', "event_id"),
        (b'{"event_id": 7}', "event_id"),
        (b'{"event_id": "x", "payload": [1]}', "payload must be a JSON object"),
        (b'{"event_id": "x", "timestamp": "yesterday"}', "timestamp"),
        (b'{"event_id": "x", "topic": "other.topic"}', "disagrees with subject"),
        (b"", "empty body"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b'{"event_id": "x", "payload": {"s": "\\u0000"}}', "must not contain \\u0000"),
        (b'{"event_id": "x", "payload": {"s": "\\ud800"}}', "lone UTF-16 surrogate"),
        (b'{"event_id": "x", "payload": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "nested"),
        (b'{"event_id": "x", "payload": {"a": ' + b"[" * 150 + b"]" * 150 + b"}}", "nested"),
        # Each of these stalled the consumer before the validator knew PostgreSQL's limits.
        (b'{"event_id": "x", "timestamp": "9999-12-31T23:59:59-01:00"}', "outside years 1-9999"),
        (b'{"event_id": "x", "timestamp": "0001-01-01T00:00:00+01:00"}', "outside years 1-9999"),
        (b'{"event_id": "x\\u0000"}', "event_id: must not contain control characters"),
        (b'{"event_id": "x", "source": "a\\nb"}', "source: must not contain control characters"),
        (b'{"event_id": "x", "payload": {"n": 1e1000000}}', "exponent beyond"),
        (b'{"event_id": "x", "payload": {"n": 2e308}}', "beyond the range of a 64-bit float"),
        (b'{"event_id": "x", "payload": {"n": 0e-20000}}', "exponent beyond"),
    ],
)
async def test_bad_input_is_dead_lettered_and_the_consumer_goes_on(
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
    data: bytes,
    reason: str,
) -> None:
    """Each kind of bad message becomes a dead letter with its reason; the next event is stored."""
    subject = f"{settings.subject_prefix}.poison"
    await js.publish(subject, body("before"))
    await js.publish(subject, data, headers={"X-Test": "1"})
    await js.publish(subject, body("after"))
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: _totals_received(pool, 3))
    letter = await one(pool, "SELECT * FROM dead_letters")
    assert reason in letter["reason"]
    assert bytes(letter["raw"]) == data
    assert letter["subject"] == subject
    assert json.loads(letter["headers"]) == {"X-Test": "1"}
    assert letter["topic"] == "poison"
    assert sorted(r["event_id"] for r in await pool.fetch("SELECT event_id FROM events")) == [
        "after",
        "before",
    ]
    stats = await assert_invariants(pool)
    assert stats["dead_lettered"] == 1
    info = await js.consumer_info(settings.stream, settings.durable)
    assert info.num_ack_pending == 0
    assert info.num_pending == 0


async def test_the_nats_cli_sample_from_the_contract_is_stored(
    nc: Client, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """`nats pub events.auth.prod '{...}' -H Nats-Msg-Id:auth.prod:e-1` ends up stored."""
    cli = msgspec.structs.replace(settings, subject_prefix="events")
    js = nc.jetstream()
    await broker.ensure_stream(js, cli)
    await broker.ensure_consumer(js, cli)
    await nc.publish(
        "events.auth.prod",
        b'{"event_id":"e-1","source":"cli","payload":{"user":7}}',
        headers={"Nats-Msg-Id": "auth.prod:e-1"},
    )
    async with running_consumer(cli, js, pool):
        await wait_until(lambda: _count_is(pool, 1))
    row = await one(pool, "SELECT * FROM events")
    assert (row["topic"], row["event_id"], row["source"]) == ("auth.prod", "e-1", "cli")
    assert json.loads(row["payload"]) == {"user": 7}


async def test_redelivery_after_commit_before_ack_stores_nothing_twice(
    nc: Client, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """Messages committed but never acked come back, and are recognised as already stored."""
    quick = msgspec.structs.replace(settings, ack_wait_seconds=1.0)
    js = nc.jetstream()
    await broker.ensure_stream(js, quick)
    await broker.ensure_consumer(js, quick)
    subject = f"{quick.subject_prefix}.crash"
    for i in range(20):
        await js.publish(
            subject, body(f"c-{i}"), headers={"Nats-Msg-Id": msg_id("crash", f"c-{i}")}
        )
    # A duplicate (outside any Msg-Id) in the same batch, to show it is counted once too.
    await js.publish(subject, body("c-0"))
    # Commit like a replica that then dies before acking: nothing is acked.
    sub = await js.pull_subscribe_bind(durable=quick.durable, stream=quick.stream)
    first = await sub.fetch(21, timeout=5)
    await sub.unsubscribe()
    async with pool.acquire() as conn:
        await store_batch(
            conn, [to_item(Delivery.from_msg(m), quick.subject_prefix, 1 << 20) for m in first], 5
        )
    assert await stored_count(pool) == 20
    before = await totals(pool)
    async with running_consumer(quick, js, pool):
        await wait_until(lambda: _redelivered(pool, 21), within=20)
    after = await assert_invariants(pool)
    assert await stored_count(pool) == 20
    assert after["received"] == before["received"] == 21
    assert after["store_duplicates"] == 1
    assert after["redelivered"] == 21


async def _redelivered(pool: asyncpg.Pool, n: int) -> bool:
    return bool((await totals(pool))["redelivered"] == n)


async def test_two_consumers_racing_on_duplicates_store_each_key_once(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool, servers: object
) -> None:
    """Two replicas on one durable, fed the same keys many times, store each key exactly once."""
    subject = f"{settings.subject_prefix}.race"
    keys = 300
    copies = 4
    small = msgspec.structs.replace(settings, batch_size=37)
    pool2 = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        async with (
            running_consumer(small, js, pool, shard=1),
            running_consumer(small, js, pool2, shard=10),
        ):
            for copy in range(copies):
                await asyncio.gather(
                    *(
                        js.publish(subject, body(f"k-{k}", payload={"copy": copy}))
                        for k in range(keys)
                    )
                )
            await wait_until(lambda: _totals_received(pool, keys * copies), within=60)
    finally:
        await pool2.close()
    stats = await assert_invariants(pool)
    assert stats["stored"] == keys
    assert stats["store_duplicates"] == keys * (copies - 1)
    # Each replica (and each of its commit workers) counts on its own shard rows.
    assert await pool.fetchval("SELECT count(DISTINCT shard) FROM topic_stats") >= 2


async def test_a_message_delivered_twice_in_one_batch_is_counted_once(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """A redelivery that lands in the same batch as its first copy is stored and counted once."""
    subject = f"{settings.subject_prefix}.twice"
    await js.publish(subject, body("t-1"))
    await js.publish(subject, b"{bad")
    sub = await js.pull_subscribe_bind(durable=settings.durable, stream=settings.stream)
    msgs = await sub.fetch(2, timeout=5)
    await sub.unsubscribe()
    items = [to_item(Delivery.from_msg(m), settings.subject_prefix, 1 << 20) for m in msgs]
    async with pool.acquire() as conn:
        await store_batch(conn, items + items, 3)
    stats = await assert_invariants(pool)
    assert (stats["received"], stats["stored"], stats["dead_lettered"]) == (2, 1, 1)


async def test_a_nul_in_the_event_id_and_its_msg_id_is_dead_lettered(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """An event id with NUL is refused by the validator: the event is a dead letter, and the
    letter itself, headers included, is stored rather than retried forever."""
    subject = f"{settings.subject_prefix}.nul"
    data = body("a\u0000b")
    await js.publish(subject, data, headers={"Nats-Msg-Id": "nul:a\u0000b"})
    await js.publish(subject, body("after"))
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: _totals_received(pool, 2))
    letter = await one(pool, "SELECT * FROM dead_letters")
    assert letter["reason"].startswith("event_id: must not contain control characters")
    assert bytes(letter["raw"]) == data
    assert json.loads(letter["headers"]) == {"Nats-Msg-Id": "nul:a\ufffdb"}
    assert [r["event_id"] for r in await pool.fetch("SELECT event_id FROM events")] == ["after"]
    await assert_invariants(pool)


async def test_subjects_of_any_bytes_are_dead_letters_and_block_nothing(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """NATS takes any bytes in a subject: one that is not UTF-8, or holds controls or NUL,
    becomes a dead letter (bad_subject) instead of breaking the consumer's read loop."""
    prefix = settings.subject_prefix.encode()
    subjects = [prefix + b".\xff\xfe", prefix + b".a\x01b", prefix + b".a\x00b", prefix + b".\xc3"]
    host, _, port = settings.nats_url.removeprefix("nats://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readline()
    frames = b'CONNECT {"verbose":false,"headers":true}\r\n'
    for subject in subjects:
        frames += b"PUB %s 2\r\n{}\r\n" % subject
        # With headers and an empty body, as a status message looks.
        frames += b"HPUB %s 12 12\r\nNATS/1.0\r\n\r\n\r\n" % subject
    writer.write(frames + b"PING\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"PONG")
    writer.close()
    await writer.wait_closed()
    await js.publish(f"{settings.subject_prefix}.ok", body("after"))
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: _totals_received(pool, 2 * len(subjects) + 1))
    reasons = [r["reason"] for r in await pool.fetch("SELECT reason FROM dead_letters")]
    assert len(reasons) == 2 * len(subjects)
    assert all("is not" in r or "must be dot-separated" in r for r in reasons), reasons
    assert [r["event_id"] for r in await pool.fetch("SELECT event_id FROM events")] == ["after"]
    await assert_invariants(pool)
