"""Retention in the store: expiry in bounded transactions, exact statistics, the dedup horizon,
and the replay race closed, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from helpers import assert_invariants, batch_items, one, stream_seqs, totals, wait_until
from oncelog.events import decode_message
from oncelog.store import retention
from oncelog.store.batch import Item, store_batch

OLD = "2020-01-01T00:00:00Z"


def items(
    topic: str, ids: list[str], *, ts: str = OLD, seqs: list[int] | None = None, delivered: int = 1
) -> list[Item]:
    """Messages of old events (timestamp OLD unless told) as store_batch takes them."""
    return batch_items(topic, ids, timestamp=ts, seqs=seqs, delivered=delivered)


def cutoff(days: int = 1) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


async def expire_all(
    pool: asyncpg.Pool, topic: str, keep_keys_since: datetime | None = None
) -> int:
    """Expire every event of `topic` older than a day, in batches of 2; return how many."""
    total = 0
    async with pool.acquire() as conn:
        while True:
            n, _ = await retention.expire_events(
                conn, topic, cutoff(), limit=2, keep_keys_since=keep_keys_since
            )
            total += n
            if n < 2:
                return total


async def test_old_events_expire_with_their_count_and_keys(pool: asyncpg.Pool) -> None:
    """Events older than the cutoff leave the table in batches; `expired` counts them in the
    same transactions, their keys are remembered, and recent events stay."""
    async with pool.acquire() as conn:
        await store_batch(conn, items("r.a", ["1", "2", "3", "4", "5"]), shard=0)
        await store_batch(conn, items("r.a", ["new"], ts=datetime.now(UTC).isoformat()), shard=1)
    assert await expire_all(pool, "r.a") == 5
    stats = await assert_invariants(pool)
    assert (stats["stored"], stats["expired"], stats["received"]) == (6, 5, 6)
    assert await pool.fetchval("SELECT count(*) FROM events") == 1
    assert await pool.fetchval("SELECT count(*) FROM expired_keys") == 5
    shard = await one(pool, "SELECT shard, expired FROM topic_stats WHERE expired > 0")
    assert tuple(shard) == (retention.RETENTION_SHARD, 5)


async def test_a_replay_inside_the_horizon_is_a_duplicate_and_past_it_a_new_row(
    pool: asyncpg.Pool,
) -> None:
    """A copy of an expired event whose key is remembered is a store-layer duplicate (its
    payload unknown, never `conflicting`); once the key is pruned, a copy is a new row."""
    async with pool.acquire() as conn:
        await store_batch(conn, items("r.h", ["k1", "k2"]), shard=0)
        await expire_all(pool, "r.h")
        outcome = await store_batch(conn, items("r.h", ["k1", "k2", "fresh"]), shard=0)
        assert len(outcome.stored) == 1
        assert len(outcome.duplicates) == 2
        assert outcome.conflicting == 0
        logged = await conn.fetch("SELECT same_payload FROM duplicates")
        assert [r["same_payload"] for r in logged] == [None, None]
        stats = await assert_invariants(pool)
        assert (stats["stored"], stats["store_duplicates"], stats["expired"]) == (3, 2, 2)
        # Past the horizon: every key stored before now is forgotten.
        assert await retention.prune_keys(conn, datetime.now(UTC), limit=1) == 1
        assert await retention.prune_keys(conn, datetime.now(UTC), limit=10) == 1
        outcome = await store_batch(conn, items("r.h", ["k1"]), shard=0)
        assert len(outcome.stored) == 1
    stats = await assert_invariants(pool)
    assert (stats["stored"], stats["store_duplicates"]) == (4, 2)


async def test_keys_of_events_stored_before_the_horizon_are_not_kept(pool: asyncpg.Pool) -> None:
    """The horizon counts from when an event was stored: one stored before it leaves no key."""
    async with pool.acquire() as conn:
        await store_batch(conn, items("r.k", ["a", "b"]), shard=0)
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert await expire_all(pool, "r.k", keep_keys_since=later) == 2
    assert await pool.fetchval("SELECT count(*) FROM expired_keys") == 0
    await assert_invariants(pool)


async def test_a_redelivery_of_an_expired_message_is_not_a_duplicate(pool: asyncpg.Pool) -> None:
    """The very message that stored an expired event, delivered again (crash before its ack), is
    recognised by its stream sequence: counted only as redelivered."""
    first = items("r.d", ["x"])
    async with pool.acquire() as conn:
        await store_batch(conn, first, shard=0)
        await expire_all(pool, "r.d")
        again = items("r.d", ["x"], seqs=[first[0].seq], delivered=2)
        outcome = await store_batch(conn, again, shard=0)
    assert not outcome.stored
    assert not outcome.duplicates
    assert outcome.redelivered == 1
    stats = await assert_invariants(pool)
    assert (stats["received"], stats["stored"], stats["redelivered"]) == (1, 1, 1)


async def test_a_replay_racing_its_expiry_is_a_duplicate(pool: asyncpg.Pool) -> None:
    """The replay race, forced: retention has deleted K's row and recorded K but not committed;
    a replay of K is stored meanwhile. Its INSERT waits on the deleted row and succeeds once
    retention commits, though its snapshot never saw K's key; the batch still ends with K as a
    duplicate and no row."""
    async with pool.acquire() as conn:
        await store_batch(conn, items("r.race", ["K", "other"]), shard=0)
    async with pool.acquire() as r_conn, pool.acquire() as c_conn:
        held = r_conn.transaction()
        await held.start()
        n, _ = await retention.expire_events(
            r_conn, "r.race", cutoff(), limit=10, keep_keys_since=None
        )
        assert n == 2
        c_pid = c_conn.get_server_pid()
        replay = asyncio.create_task(store_batch(c_conn, items("r.race", ["K", "new"]), shard=3))

        async def waiting_on_the_deleted_row() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", c_pid
                )
            )

        await wait_until(waiting_on_the_deleted_row, within=10)
        assert not replay.done()
        await held.commit()
        outcome = await asyncio.wait_for(replay, 10)
    assert len(outcome.duplicates) == 1
    assert len(outcome.stored) == 1
    rows = await pool.fetch("SELECT event_id FROM events WHERE topic = 'r.race'")
    assert [r["event_id"] for r in rows] == ["new"]
    stats = await assert_invariants(pool)
    assert (stats["received"], stats["stored"], stats["expired"]) == (4, 3, 2)
    assert stats["store_duplicates"] == 1


async def test_a_conflict_whose_original_expires_before_it_is_logged_is_still_counted(
    pool: asyncpg.Pool,
) -> None:
    """A copy that conflicted with a stored row, whose row then expired before the duplicate was
    looked up, is judged by the remembered key: still one duplicate, never lost."""
    async with pool.acquire() as conn:
        await store_batch(conn, items("r.late", ["K"]), shard=0)
    async with pool.acquire() as c_conn:
        held = c_conn.transaction()
        await held.start()
        # A consumer transaction that inserted K (conflict: nothing inserted), then another
        # expires K and commits before this one reaches its duplicates statement.
        await c_conn.execute(
            "INSERT INTO events (topic, event_id, ts, source, payload, stream_seq, received_at)"
            " VALUES ('r.late', 'K', now(), 's', '{}', 999999, now()) ON CONFLICT DO NOTHING"
        )
        await expire_all(pool, "r.late")
        outcome = await store_batch(c_conn, items("r.late", ["K"]), shard=0)
        await held.commit()
    assert len(outcome.duplicates) == 1
    await assert_invariants(pool)


async def test_dead_letters_and_the_duplicates_log_have_their_own_retention(
    pool: asyncpg.Pool,
) -> None:
    """Old dead letters leave with a `dead_expired` count; old duplicates-log rows leave no trace
    in the statistics (store_duplicates stays); younger rows of both stay."""
    bad = items("r.dl", ["x"])
    bad = [
        Item(
            seq=b.seq,
            delivered=1,
            subject=b.subject,
            received_ns=b.received_ns,
            headers=None,
            data=b"not json",
            result=decode_message(b.subject, b"not json", b.received_ns, "events"),
        )
        for b in bad * 3
    ]
    bad = [
        Item(
            seq=next(stream_seqs),
            delivered=1,
            subject=b.subject,
            received_ns=b.received_ns,
            headers=None,
            data=b.data,
            result=b.result,
        )
        for b in bad
    ]
    async with pool.acquire() as conn:
        await store_batch(conn, bad, shard=0)
        await store_batch(conn, items("r.dl", ["a", "b"]), shard=0)
        await store_batch(conn, items("r.dl", ["a", "b"]), shard=0)
        await conn.execute("UPDATE dead_letters SET dead_at = now() - interval '10 days'")
        await conn.execute(
            "UPDATE duplicates SET recorded_at = now() - interval '10 days' WHERE event_id = 'a'"
        )
        before = await totals(pool)
        deleted, more = await retention.expire_dead_letters(conn, cutoff(5), limit=2)
        assert (deleted, more) == (2, True)
        assert await retention.expire_dead_letters(conn, cutoff(5), limit=2) == (1, False)
        assert await retention.expire_duplicates(conn, cutoff(5), limit=10) == (1, False)
    after = await assert_invariants(pool)
    assert after["dead_expired"] == 3
    assert after["dead_lettered"] == 3
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert [r["event_id"] for r in await pool.fetch("SELECT event_id FROM duplicates")] == ["b"]
    assert {k: v for k, v in after.items() if k != "dead_expired"} == {
        k: v for k, v in before.items() if k != "dead_expired"
    }


async def test_topics_take_the_first_rule_that_matches(pool: asyncpg.Pool) -> None:
    """Patterns match as in /events' `topic=`; the first matching one decides, else -1."""
    async with pool.acquire() as conn:
        for topic in ("auth.prod.login", "auth.dev", "debug.x", "other"):
            await store_batch(conn, items(topic, ["1"]), shard=0)
        rules = await retention.topics_by_rule(conn, ["auth.prod.>", "auth.*", "debug.>", ">"])
        assert rules == {"auth.prod.login": 0, "auth.dev": 1, "debug.x": 2, "other": 3}
        assert await retention.topics_by_rule(conn, ["auth.>"]) == {
            "auth.prod.login": 0,
            "auth.dev": 0,
            "debug.x": -1,
            "other": -1,
        }
        oldest = await retention.oldest_events(conn, ["auth.dev", "none"])
    assert list(oldest) == ["auth.dev"]


DENIED = asyncpg.exceptions.InsufficientPrivilegeError


async def test_the_consumer_role_can_undo_only_its_own_inserts_of_expired_keys(
    pool: asyncpg.Pool,
) -> None:
    """oncelog_ingest still cannot delete stored rows; the undo function removes nothing that
    another transaction stored, and nothing whose key is not remembered as expired; the
    retention role can expire."""
    async with pool.acquire() as conn:
        await store_batch(conn, items("r.role", ["a", "b"]), shard=0)
        as_ingest = conn.transaction()
        await as_ingest.start()
        try:
            # Committed by another transaction: untouchable, even with its key remembered.
            await conn.execute(
                "INSERT INTO expired_keys VALUES (event_key('r.role', 'a'), 1, now())"
            )
            await conn.execute("SET LOCAL ROLE oncelog_ingest")
            assert (
                await conn.fetchval("SELECT undo_expired_inserts(ARRAY['r.role'], ARRAY['a'])") == 0
            )
            # Its own insert whose key is not expired: kept.
            await conn.execute(
                "INSERT INTO events (topic, event_id, ts, source, payload, stream_seq,"
                " received_at) VALUES ('r.role', 'c', now(), 's', '{}', 77, now())"
            )
            assert (
                await conn.fetchval("SELECT undo_expired_inserts(ARRAY['r.role'], ARRAY['c'])") == 0
            )
            with pytest.raises(DENIED):
                async with conn.transaction():
                    await conn.execute("DELETE FROM events")
        finally:
            await as_ingest.rollback()
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE oncelog_retention")
            n, kept = await retention.expire_events(
                conn, "r.role", cutoff(), limit=10, keep_keys_since=None
            )
            assert (n, kept) == (2, 2)
            assert await retention.prune_keys(conn, datetime.now(UTC), limit=10) == 2
            with pytest.raises(DENIED):
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO events (topic, event_id, ts, source, payload, stream_seq,"
                        " received_at) VALUES ('r.role', 'd', now(), 's', '{}', 78, now())"
                    )
    await assert_invariants(pool)
