"""The statistics: every read and write of topic_stats outside a batch, and the invariants.

Counters are spread over STATS_SHARDS rows per topic (see the migrations) so that writers do
not queue on one hot row; every reader here sums the shards. The batch store
(`oncelog.store.batch`) writes its shard rows in the transaction of the rows they count.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from oncelog.store.schema import Conn, Queryable

__all__ = [
    "COUNTERS",
    "PER_TOPIC_SQL",
    "RETENTION_SHARD",
    "STATS_SHARDS",
    "Counts",
    "add_broker_duplicates",
    "apply_tallies",
    "forget_tallies",
    "invariant_violations",
    "per_topic",
    "shard_for",
    "totals",
]

# Writers spread each topic's counters over this many rows (see topic_stats), so replicas
# and gateways do not queue on one hot row; readers sum the shards.
STATS_SHARDS = 32
# The retention job's own shard, outside the writers' 0..STATS_SHARDS-1: it never waits on a
# consumer's row, and its `expired` > 0 tells the batch writer which topics have expired keys.
RETENTION_SHARD = STATS_SHARDS

_ADD_BROKER_DUPLICATES = """
INSERT INTO topic_stats AS s (topic, shard, received, broker_duplicates)
SELECT topic, $1, n, n FROM unnest($2::text[], $3::bigint[]) AS t(topic, n)
ORDER BY topic
ON CONFLICT (topic, shard) DO UPDATE SET
    received = s.received + excluded.received,
    broker_duplicates = s.broker_duplicates + excluded.broker_duplicates
"""


def shard_for(identity: str = "") -> int:
    """Return the stats shard of a writer named `identity` (default: this process)."""
    return zlib.crc32((identity or f"{os.uname().nodename}-{os.getpid()}").encode()) % STATS_SHARDS


async def add_broker_duplicates(conn: Conn, counts: Mapping[str, int], shard: int) -> None:
    """Count messages the broker dropped as duplicates (PubAck duplicate=true) per topic."""
    topics = sorted(t for t, n in counts.items() if n)
    if topics:
        await conn.execute(_ADD_BROKER_DUPLICATES, shard, topics, [counts[t] for t in topics])


# Each tally's id is recorded once; only the counts of tallies new here are added, so a
# redelivered tally adds nothing. One statement: the CTE's insert is what the sum joins.
_APPLY_TALLIES = """
WITH fresh AS (
    INSERT INTO tally_applied (id, stream_seq)
    SELECT id, seq FROM unnest($2::uuid[], $3::bigint[]) AS t(id, seq)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
)
INSERT INTO topic_stats AS s (topic, shard, received, broker_duplicates)
SELECT c.topic, $1, sum(c.n), sum(c.n)
FROM unnest($4::uuid[], $5::text[], $6::bigint[]) AS c(id, topic, n)
JOIN fresh USING (id)
GROUP BY c.topic
ORDER BY c.topic
ON CONFLICT (topic, shard) DO UPDATE SET
    received = s.received + excluded.received,
    broker_duplicates = s.broker_duplicates + excluded.broker_duplicates
"""


async def apply_tallies(
    conn: Conn, tallies: Sequence[tuple[UUID, int, Mapping[str, int]]], shard: int
) -> None:
    """Add each (id, stream sequence, counts per topic) tally once, however often it comes.

    Call it in the transaction whose commit comes before the tallies are acked. Of tallies
    that share an id, the first is the one.
    """
    unique = list({t[0]: t for t in reversed(tallies)}.values())
    ids, seqs = [t[0] for t in unique], [t[1] for t in unique]
    rows = [(i, topic, n) for i, _, counts in unique for topic, n in counts.items() if n]
    await conn.execute(
        _APPLY_TALLIES,
        shard,
        ids,
        seqs,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
    )


async def forget_tallies(conn: Conn, below_seq: int, older_than_seconds: float = 0.0) -> int:
    """Forget the ids of tallies below the stream's first sequence; return how many went.

    The stream holds no message below its first sequence, so none of them can come again;
    only a copy already delivered before its ack could still be on its way to a statement,
    which `older_than_seconds` (since the id was applied) leaves time for.
    """
    status = await conn.execute(
        "DELETE FROM tally_applied WHERE stream_seq < $1"
        " AND applied_at < now() - make_interval(secs => $2)",
        below_seq,
        older_than_seconds,
    )
    return int(status.rsplit(" ", 1)[-1])


PER_TOPIC_SQL = """
SELECT topic,
       sum(received)::bigint AS received,
       sum(stored)::bigint AS stored,
       sum(store_duplicates)::bigint AS store_duplicates,
       sum(broker_duplicates)::bigint AS broker_duplicates,
       sum(dead_lettered)::bigint AS dead_lettered,
       sum(redelivered)::bigint AS redelivered,
       sum(conflicting)::bigint AS conflicting,
       sum(expired)::bigint AS expired,
       sum(dead_expired)::bigint AS dead_expired,
       min(first_ts) AS first_ts,
       max(last_ts) AS last_ts,
       max(last_stored_at) AS last_stored_at
FROM topic_stats
{where}
GROUP BY topic
ORDER BY topic
"""


class Counts(msgspec.Struct, kw_only=True):
    """The counters of one topic, or of all topics summed."""

    received: int = 0
    stored: int = 0
    store_duplicates: int = 0
    broker_duplicates: int = 0
    dead_lettered: int = 0
    redelivered: int = 0
    conflicting: int = 0
    # Events and dead letters that retention deleted; `stored` and `dead_lettered` keep
    # counting everything ever stored, so rows == stored - expired.
    expired: int = 0
    dead_expired: int = 0
    first_ts: datetime | None = None
    last_ts: datetime | None = None
    last_stored_at: datetime | None = None

    @property
    def duplicates(self) -> int:
        """Duplicates dropped by either layer."""
        return self.store_duplicates + self.broker_duplicates

    @property
    def rows(self) -> int:
        """Events stored and not expired: the rows the events table holds."""
        return self.stored - self.expired


# The counters of Counts that add up over shards and topics (the timestamps do not).
COUNTERS = (
    "received",
    "stored",
    "store_duplicates",
    "broker_duplicates",
    "dead_lettered",
    "redelivered",
    "conflicting",
    "expired",
    "dead_expired",
)


async def per_topic(
    conn: Queryable, condition: str = "", params: tuple[Any, ...] = ()
) -> dict[str, Counts]:
    """Return each topic's counters, summed over its shards; `condition` filters topics.

    `condition` is SQL over the `topic` column with `$1...` placeholders for `params` (the
    API's topic filter); it is built from fixed text only, never from user input.
    """
    where = f"WHERE {condition}" if condition else ""
    rows = await conn.fetch(PER_TOPIC_SQL.format(where=where), *params)
    return {r["topic"]: Counts(**{k: v for k, v in dict(r).items() if k != "topic"}) for r in rows}


def totals(topics: Mapping[str, Counts]) -> Counts:
    """Return the counters of all `topics` summed."""
    total = Counts()
    for counts in topics.values():
        for name in COUNTERS:
            setattr(total, name, getattr(total, name) + getattr(counts, name))
    return total


_INVARIANTS = """
SELECT s.topic, s.received, s.stored, s.dups, s.dead, s.expired, s.dead_expired,
       (SELECT count(*) FROM events e WHERE e.topic = s.topic) AS rows,
       (SELECT count(*) FROM dead_letters d WHERE d.topic = s.topic) AS dead_rows
FROM (SELECT topic, sum(received) AS received, sum(stored) AS stored,
             sum(store_duplicates + broker_duplicates) AS dups, sum(dead_lettered) AS dead,
             sum(expired) AS expired, sum(dead_expired) AS dead_expired
      FROM topic_stats GROUP BY topic) s
"""

# An event row whose key is recorded as expired: a replay stored again as new (the race the
# batch writer closes), or a row retention deleted and counted without removing it.
_STORED_AND_EXPIRED = """
SELECT count(*) FROM events e JOIN expired_keys k ON k.key = event_key(e.topic, e.event_id)
"""


async def invariant_violations(conn: Queryable, stream_messages: int | None = None) -> list[str]:
    """Return the statistics invariants that do not hold, globally and per topic (none: []).

    Per topic and globally: rows == `stored` - `expired`, `received` == `stored` + duplicates
    + `dead_lettered`, dead letter rows == `dead_lettered` - `dead_expired`; no stream message
    counted both as stored and as a duplicate; no stored event whose key is remembered as
    expired. With `stream_messages` (how many messages the stream ever took), `received` less
    broker duplicates must equal it: a redelivery counted twice would exceed it, a message
    never counted fall short. Run it in one REPEATABLE READ transaction while writers work, so
    that every query sees the same committed instant.
    """
    found: list[str] = []
    for r in await conn.fetch(_INVARIANTS):
        if r["stored"] - r["expired"] != r["rows"]:
            found.append(
                f"{r['topic']}: stored {r['stored']} - expired {r['expired']} != rows {r['rows']}"
            )
        if r["received"] != r["stored"] + r["dups"] + r["dead"]:
            found.append(f"{r['topic']}: received {r['received']} != stored + dups + dead")
        if r["dead"] - r["dead_expired"] != r["dead_rows"]:
            found.append(
                f"{r['topic']}: dead_lettered {r['dead']} - dead_expired {r['dead_expired']}"
                f" != rows {r['dead_rows']}"
            )
    total = totals(await per_topic(conn))
    rows = await conn.fetchval("SELECT count(*) FROM events")
    if total.rows != rows:
        found.append(f"unique_processed {total.stored} - expired {total.expired} != {rows} rows")
    dead_rows = await conn.fetchval("SELECT count(*) FROM dead_letters")
    if total.dead_lettered - total.dead_expired != dead_rows:
        found.append(
            f"dead_lettered {total.dead_lettered} - dead_expired {total.dead_expired}"
            f" != {dead_rows} dead letter rows"
        )
    if total.received != total.stored + total.duplicates + total.dead_lettered:
        found.append(f"received {total.received} != stored + duplicates + dead_lettered")
    both = await conn.fetchval(
        "SELECT count(*) FROM duplicates d JOIN events e ON e.stream_seq = d.stream_seq"
    )
    if both:
        found.append(f"{both} stream messages counted both as stored and as duplicates")
    if again := await conn.fetchval(_STORED_AND_EXPIRED):
        found.append(f"{again} stored events whose keys are remembered as expired")
    if stream_messages is not None and total.received - total.broker_duplicates != stream_messages:
        found.append(
            f"received (without broker duplicates) {total.received - total.broker_duplicates} "
            f"!= {stream_messages} messages the stream took"
        )
    return found
