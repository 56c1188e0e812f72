"""Liveness: no message blocks the ones behind it, and a batch that cannot commit is visible."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
from nats.js import JetStreamContext
from prometheus_client.metrics import MetricWrapperBase as Metric

from helpers import api_client, assert_invariants, running_consumer, wait_until
from oncelog.consumer.loop import STUCK_AFTER
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import Decoded, decode_message
from oncelog.store import stats
from oncelog.store.batch import Item, store_batch


def _value(metric: Metric) -> float:
    """Return the value of an unlabelled counter or gauge."""
    return next(
        s.value for m in metric.collect() for s in m.samples if not s.name.endswith("_created")
    )


def _item(seq: int, event: Decoded) -> Item:
    return Item(
        seq=seq,
        delivered=1,
        subject=f"events.{event.topic}",
        received_ns=time.time_ns(),
        headers=None,
        data=b"{}",
        result=event,
    )


def _event(event_id: str, **changes: object) -> Decoded:
    fields: dict[str, object] = {
        "topic": "iso",
        "event_id": event_id,
        "timestamp": datetime(2026, 1, 1, tzinfo=UTC),
        "source": "test",
        "payload": b"{}",
    }
    return Decoded(**(fields | changes))  # type: ignore[arg-type]


async def test_store_isolates_what_it_refuses_and_stores_the_rest(pool: asyncpg.Pool) -> None:
    """Values no validator stopped but the store refuses become dead letters; the batch commits."""
    # Built by hand, past the validator: the shapes that used to stall the consumer forever.
    late = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(-timedelta(hours=1)))
    items = [_item(seq, _event(f"ok-{seq}")) for seq in range(1, 41)]
    items[7] = _item(8, _event("late", timestamp=late))
    items[23] = _item(24, _event("nul", payload=b'{"s": "\\u0000"}'))
    items[31] = _item(32, _event("deep", payload=b'{"n": 1e-20000}'))
    async with pool.acquire() as conn:
        outcome = await store_batch(conn, items, shard=0)
    assert outcome.isolated
    assert set(outcome.dead) == {8, 24, 32}
    assert set(outcome.dead.values()) == {"store_refused"}
    assert len(outcome.stored) == 37
    reasons = [r["reason"] for r in await pool.fetch("SELECT reason FROM dead_letters")]
    assert all(reason.startswith("PostgreSQL refused the event") for reason in reasons)
    stats = await assert_invariants(pool)
    assert (stats["stored"], stats["dead_lettered"], stats["received"]) == (37, 3, 40)


async def test_redelivered_copies_stay_one_message_while_isolating(pool: asyncpg.Pool) -> None:
    """Two copies of one stream sequence in a batch being isolated are stored and counted once."""
    bad = _item(2, _event("bad", payload=b'{"s": "\\u0000"}'))
    first = _item(1, _event("twice"))
    again = Item(**{f: getattr(first, f) for f in Item.__struct_fields__} | {"delivered": 2})
    async with pool.acquire() as conn:
        outcome = await store_batch(conn, [first, bad, again], shard=0)
    assert outcome.stored == {1}
    assert outcome.dead == {2: "store_refused"}
    stats = await assert_invariants(pool)
    assert (stats["received"], stats["redelivered"]) == (2, 1)


async def test_timestamp_stall_is_gone_end_to_end(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """A timestamp past 9999 in UTC no longer stops the consumer: it is a dead letter."""
    subject = f"{settings.subject_prefix}.stall"
    await js.publish(subject, b'{"event_id": "late", "timestamp": "9999-12-31T23:59:59-01:00"}')
    for n in range(20):
        await js.publish(subject, json.dumps({"event_id": f"after-{n}"}).encode())
    async with running_consumer(settings, js, pool):
        await wait_until(lambda: pool.fetchval("SELECT count(*) = 20 FROM events"), within=20)
    stats = await assert_invariants(pool)
    assert stats["dead_lettered"] == 1


async def test_a_batch_that_keeps_failing_shows_in_metrics_and_ready(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """A batch failing STUCK_AFTER times is counted stuck and /ready says so; it recovers after."""
    # A failure that is the store's, not any value's (so nothing may be dead-lettered): a
    # trigger that refuses every insert, as a broken constraint or permission would.
    await pool.execute(
        """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'store broken for the test' USING ERRCODE = 'P0001'; END $$;
           CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse();"""
    )
    quick = settings.__class__(
        **{f: getattr(settings, f) for f in settings.__struct_fields__} | {"retry_max_seconds": 0.3}
    )
    subject = f"{settings.subject_prefix}.stuck"
    for n in range(5):
        await js.publish(subject, json.dumps({"event_id": f"s-{n}"}).encode())
    async with (
        api_client(settings, ready=False) as client,
        running_consumer(quick, js, pool) as consumer,
    ):

        async def stuck() -> bool:
            return _value(consumer.metrics.stuck_batches) >= 1

        await wait_until(stuck, within=30)
        assert _value(consumer.metrics.commit_failures) >= STUCK_AFTER

        async def not_ready() -> dict[str, object] | None:
            resp = await client.get("/ready")
            return resp.json() if resp.status_code == 503 else None

        body = await wait_until(not_ready, within=15)
        assert any(
            str(e["field"]).startswith("consumer ") and "store broken" in str(e["message"])
            for e in body["errors"]
        ), body
        await pool.execute("DROP TRIGGER refuse ON events")
        await wait_until(lambda: pool.fetchval("SELECT count(*) = 5 FROM events"), within=30)

        async def ready() -> bool:
            return (await client.get("/ready")).status_code == 200

        await wait_until(ready, within=15)
        assert _value(consumer.metrics.stuck_batches) == 0
    assert (await assert_invariants(pool))["dead_lettered"] == 0


def test_decoder_and_store_agree_on_the_refused_timestamp() -> None:
    """The validator refuses on the NATS path exactly the timestamp the store would refuse."""
    result = decode_message(
        "events.t", b'{"event_id": "x", "timestamp": "9999-12-31T23:59:59-01:00"}', 0
    )
    assert not isinstance(result, Decoded)
    assert result.code == "bad_timestamp"


async def test_the_first_and_last_instants_keep_their_value_in_the_statistics(
    pool: asyncpg.Pool,
) -> None:
    """Events at 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z are the topic's first
    and last timestamps as they are, not -infinity and infinity."""
    first = datetime(1, 1, 1, tzinfo=UTC)
    last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    items = [_item(1, _event("first", timestamp=first)), _item(2, _event("last", timestamp=last))]
    async with pool.acquire() as conn:
        await store_batch(conn, items, shard=0)
    counts = (await stats.per_topic(pool))["iso"]
    assert (counts.first_ts, counts.last_ts) == (first, last)
    assert await pool.fetchval("SELECT bool_and(isfinite(first_ts)) FROM topic_stats")
