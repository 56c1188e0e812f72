"""Expiring old rows in bounded transactions that keep the statistics and the dedup horizon exact.

Each call deletes at most `limit` rows in one short transaction of its own: the rows, their
`expired` (or `dead_expired`) count on the retention shard, and, for events, the key that keeps
a later replay a duplicate, commit together, so the invariants hold at every committed instant.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from oncelog.store.schema import Conn, Queryable
from oncelog.store.stats import RETENTION_SHARD
from oncelog.store.topics import topic_filter

__all__ = [
    "LOCK",
    "RETENTION_SHARD",
    "expire_dead_letters",
    "expire_duplicates",
    "expire_events",
    "oldest_events",
    "prune_keys",
    "topics_by_rule",
]

# The advisory lock only one retention worker holds at a time.
LOCK = 0x6F6E63656C6F6772

# The oldest rows of one topic by the (topic, ts, event_id) index, deleted with their count and
# their keys in one statement. A key is kept only for an event stored since the horizon's start
# ($4; NULL keeps every key): older ones would be pruned at once.
_EXPIRE_EVENTS = """
WITH doomed AS (
    SELECT topic, event_id FROM events
    WHERE topic = $1 AND ts < $2
    ORDER BY ts, event_id
    LIMIT $3
), gone AS (
    DELETE FROM events e USING doomed d
    WHERE e.topic = d.topic AND e.event_id = d.event_id
    RETURNING e.topic, e.event_id, e.stream_seq, e.stored_at
), remembered AS (
    INSERT INTO expired_keys AS k (key, stream_seq, stored_at)
    SELECT event_key(topic, event_id), stream_seq, stored_at FROM gone
    WHERE $4::timestamptz IS NULL OR stored_at >= $4
    ON CONFLICT (key) DO UPDATE SET stream_seq = excluded.stream_seq,
                                    stored_at = excluded.stored_at
    RETURNING 1
), counted AS (
    INSERT INTO topic_stats AS s (topic, shard, expired)
    SELECT $1, $5, count(*) FROM gone HAVING count(*) > 0
    ON CONFLICT (topic, shard) DO UPDATE SET expired = s.expired + excluded.expired
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS expired, (SELECT count(*) FROM remembered) AS remembered
"""

# Dead letters and duplicates-log rows have no time index: their keys (identity, stream
# sequence) grow with time, so the oldest keys are taken and those older than the cutoff
# deleted. A batch holding any younger row ends the pass; a row stored out of order goes on a
# later run, once the rows before it are old enough.
_EXPIRE_DEAD = """
WITH batch AS (
    SELECT id, topic, dead_at FROM dead_letters ORDER BY id LIMIT $2
), gone AS (
    DELETE FROM dead_letters d USING batch b
    WHERE d.id = b.id AND b.dead_at < $1
    RETURNING d.topic
), counted AS (
    INSERT INTO topic_stats AS s (topic, shard, dead_expired)
    SELECT topic, $3, count(*) FROM gone GROUP BY topic ORDER BY topic
    ON CONFLICT (topic, shard) DO UPDATE SET dead_expired = s.dead_expired + excluded.dead_expired
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deleted,
       (SELECT count(*) FROM batch WHERE dead_at >= $1) AS younger
"""

# The duplicates log is detail: its rows leave no count behind (store_duplicates stays).
_EXPIRE_DUPLICATES = """
WITH batch AS (
    SELECT stream_seq, recorded_at FROM duplicates ORDER BY stream_seq LIMIT $2
), gone AS (
    DELETE FROM duplicates d USING batch b
    WHERE d.stream_seq = b.stream_seq AND b.recorded_at < $1
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deleted,
       (SELECT count(*) FROM batch WHERE recorded_at >= $1) AS younger
"""

_PRUNE_KEYS = """
WITH gone AS (
    DELETE FROM expired_keys WHERE key IN (
        SELECT key FROM expired_keys WHERE stored_at < $1 ORDER BY stored_at LIMIT $2
    )
    RETURNING 1
)
SELECT count(*) FROM gone
"""

# Topics that still hold rows, with the index of the first rule whose pattern matches (-1:
# none). The patterns become SQL through the same topic_filter as /events' `topic=`.
_TOPICS = """
SELECT topic, {rule} AS rule FROM topic_stats
GROUP BY topic HAVING sum(stored) > sum(expired)
ORDER BY topic
"""

_OLDEST = """
SELECT t.topic, o.ts FROM unnest($1::text[]) AS t(topic)
CROSS JOIN LATERAL (SELECT min(ts) AS ts FROM events WHERE topic = t.topic) o
WHERE o.ts IS NOT NULL
"""


async def expire_events(
    conn: Conn,
    topic: str,
    before: datetime,
    *,
    limit: int,
    keep_keys_since: datetime | None,
) -> tuple[int, int]:
    """Expire up to `limit` of `topic`'s events with a timestamp before `before`.

    Returns (rows expired, keys recorded). The keys of those stored since `keep_keys_since`
    (None: all) go to the horizon table in the same transaction.
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            _EXPIRE_EVENTS, topic, before, limit, keep_keys_since, RETENTION_SHARD
        )
    assert row is not None
    return int(row["expired"]), int(row["remembered"])


async def expire_dead_letters(conn: Conn, before: datetime, *, limit: int) -> tuple[int, bool]:
    """Delete up to `limit` dead letters stored before `before`; return (deleted, more to do)."""
    async with conn.transaction():
        row = await conn.fetchrow(_EXPIRE_DEAD, before, limit, RETENTION_SHARD)
    assert row is not None
    return int(row["deleted"]), row["deleted"] == limit and row["younger"] == 0


async def expire_duplicates(conn: Conn, before: datetime, *, limit: int) -> tuple[int, bool]:
    """Delete up to `limit` duplicates-log rows recorded before `before`; (deleted, more)."""
    row = await conn.fetchrow(_EXPIRE_DUPLICATES, before, limit)
    assert row is not None
    return int(row["deleted"]), row["deleted"] == limit and row["younger"] == 0


async def prune_keys(conn: Conn, before: datetime, *, limit: int) -> int:
    """Forget up to `limit` expired keys of events stored before `before` (past the horizon)."""
    return int(await conn.fetchval(_PRUNE_KEYS, before, limit))


async def topics_by_rule(conn: Queryable, patterns: Sequence[str]) -> dict[str, int]:
    """Map every topic that still holds events to the index of the first pattern matching it.

    -1 means no pattern matches. Patterns are topics or NATS wildcards, validated beforehand.
    """
    params: list[Any] = []
    cases: list[str] = []
    for i, pattern in enumerate(patterns):
        condition, args = topic_filter(pattern, len(params) + 1)
        params += args
        cases.append(f"WHEN {condition} THEN {i}")
    rule = f"CASE {' '.join(cases)} ELSE -1 END" if cases else "-1"
    rows = await conn.fetch(_TOPICS.format(rule=rule), *params)
    return {r["topic"]: r["rule"] for r in rows}


async def oldest_events(conn: Queryable, topics: Sequence[str]) -> dict[str, datetime]:
    """Return the oldest stored event's timestamp of each of `topics` that holds any."""
    rows = await conn.fetch(_OLDEST, list(topics))
    return {r["topic"]: r["ts"] for r in rows}
