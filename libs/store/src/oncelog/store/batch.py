"""One fetched batch into PostgreSQL in one transaction: events, duplicates, dead letters, stats."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from oncelog.events import Decoded, Rejected, dead_letter_topic, from_ns, parse_headers
from oncelog.store.schema import Conn
from oncelog.store.stats import RETENTION_SHARD

__all__ = ["DEAD_RAW_LIMIT", "Item", "Outcome", "UnstorableError", "is_data_error", "store_batch"]

# Dead letters keep the whole message up to this size, and its first bytes beyond it.
DEAD_RAW_LIMIT = 64 * 1024

# PostgreSQL error classes caused by a value itself (22: data exception, 54: program limit
# exceeded, such as JSON nested too deeply): such an event is dead-lettered, never retried.
_DATA_ERROR_CLASSES = ("22", "54")
# A CHECK constraint refusing a value (23514) is the value's fault too; other integrity
# violations are not expected and stay the store's.
_CHECK_VIOLATION = "23514"

# A batch travels as one JSON array: msgspec encodes it in C, with each payload embedded as
# the raw bytes it arrived in, which costs far less than binding a dozen typed arrays. The
# broker's receive time travels as microseconds since the epoch: no datetime per message in
# the consumer, and no timestamp text to parse in PostgreSQL.
_INSERT_EVENTS = """
INSERT INTO events (topic, event_id, ts, source, payload, stream_seq, received_at)
SELECT r->>0, r->>1, (r->>2)::timestamptz, r->>3, r->4, (r->>5)::bigint,
       timestamptz 'epoch' + (r->>6)::bigint * interval '1 microsecond'
FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS b(r, n)
ORDER BY n
ON CONFLICT (topic, event_id) DO NOTHING
RETURNING stream_seq
"""

# The dedup horizon, checked for the rows an insert stored: is a row's key remembered as
# expired? A separate statement on purpose: under READ COMMITTED it takes a fresh snapshot, so
# it sees the key that a retention transaction committed while the insert waited on the row it
# deleted (an insert that then succeeds, because the row is gone). A NOT EXISTS inside the
# insert would use the insert's own, older snapshot and miss it. Only topics that retention has
# ever expired anything of are probed (their `expired` on the retention shard, written in the
# transaction that records the keys, so this snapshot sees both or neither); then one index
# probe per inserted row, and nothing at all for the rows that conflicted.
_EXPIRED_KEYS = """
WITH open AS (
    SELECT topic FROM topic_stats WHERE topic = ANY($2::text[]) AND shard = $3 AND expired > 0
)
SELECT (b.r->>0)::bigint AS seq
FROM jsonb_array_elements($1::text::jsonb) AS b(r)
JOIN open ON open.topic = b.r->>1
CROSS JOIN LATERAL (
    SELECT 1 FROM expired_keys WHERE key = event_key(b.r->>1, b.r->>2) OFFSET 0
) k
"""

# Deletes only rows this transaction stored whose key is remembered as expired (migration 0006).
_UNDO_EXPIRED = "SELECT undo_expired_inserts($1::text[], $2::text[])"

# A conflict whose stored row came from the same stream sequence is a redelivery of a message
# already committed (crash between commit and ack): it is neither a duplicate nor counted again.
# A copy whose original expired is judged by the key the horizon keeps instead (its payload is
# gone, so whether it differed is unknown: NULL). A copy found in neither place lost its
# original to retention between the insert and this statement, past the horizon: it is
# reported `missing` and inserted again.
_INSERT_DUPLICATES = """
WITH looked AS (
    SELECT (d.r->>0)::bigint AS seq, d.r->>1 AS topic, d.r->>2 AS event_id,
           timestamptz 'epoch' + (d.r->>3)::bigint * interval '1 microsecond' AS received_at,
           d.r->4 AS payload, e.stream_seq AS e_seq, e.received_at AS e_received,
           e.payload AS e_payload, k.stream_seq AS k_seq, k.stored_at AS k_stored
    FROM jsonb_array_elements($1::text::jsonb) AS d(r)
    -- One primary-key probe per duplicate, whatever the table size or its statistics: OFFSET 0
    -- keeps the planner from flattening the subquery into a join, which on an unanalysed table
    -- it turned into a hash join over a sequential scan of every stored event, once per batch.
    LEFT JOIN LATERAL (
        SELECT received_at, payload, stream_seq FROM events
        WHERE topic = d.r->>1 AND event_id = d.r->>2
        OFFSET 0
    ) e ON true
    LEFT JOIN LATERAL (
        SELECT stream_seq, stored_at FROM expired_keys
        WHERE e.stream_seq IS NULL AND key = event_key(d.r->>1, d.r->>2)
        OFFSET 0
    ) k ON true
), logged AS (
    INSERT INTO duplicates (stream_seq, topic, event_id, received_at, first_received_at,
                            same_payload)
    SELECT seq, topic, event_id, received_at, COALESCE(e_received, k_stored),
           CASE WHEN e_seq IS NOT NULL THEN e_payload = payload END
    FROM looked
    WHERE COALESCE(e_seq, k_seq) <> seq
    ORDER BY seq
    ON CONFLICT (stream_seq) DO NOTHING
    RETURNING topic, same_payload,
              extract(epoch FROM received_at - first_received_at)::float8 AS age, stream_seq
)
SELECT topic, same_payload, age, stream_seq, false AS missing FROM logged
UNION ALL
SELECT topic, NULL, NULL, seq, true FROM looked WHERE e_seq IS NULL AND k_seq IS NULL
"""

_INSERT_DEAD = """
INSERT INTO dead_letters (stream_seq, subject, topic, headers, raw, raw_size, reason, received_at)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::jsonb[], $5::bytea[], $6::int[],
                     $7::text[], $8::timestamptz[])
ON CONFLICT (stream_seq) DO NOTHING
RETURNING topic, stream_seq
"""

# Rows are sorted by topic so concurrent writers that share a shard lock rows in one order.
# First and last timestamps travel as microseconds since the epoch: asyncpg encodes the first
# and the last instant Python can hold (0001-01-01T00:00:00Z, 9999-12-31T23:59:59.999999Z) as
# -infinity and infinity, which would then read back as naive datetimes. Whole days and the
# rest are added apart: `interval * bigint` computes in double precision, exact only below
# 2^53 microseconds (year 2255), and would turn 9999-12-31T23:59:59.999999 into year 10000.
_UPSERT_STATS = """
INSERT INTO topic_stats AS s (topic, shard, received, stored, store_duplicates, dead_lettered,
                              redelivered, conflicting, first_ts, last_ts, last_stored_at)
SELECT topic, $1, received, stored, dups, dead, redelivered, conflicting,
       timestamptz 'epoch' + (first_us / 86400000000) * interval '1 day'
                          + (first_us % 86400000000) * interval '1 microsecond',
       timestamptz 'epoch' + (last_us / 86400000000) * interval '1 day'
                          + (last_us % 86400000000) * interval '1 microsecond',
       CASE WHEN stored > 0 THEN now() END
FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[],
            $8::bigint[], $9::bigint[], $10::bigint[])
     AS t(topic, received, stored, dups, dead, redelivered, conflicting, first_us, last_us)
ORDER BY topic
ON CONFLICT (topic, shard) DO UPDATE SET
    received = s.received + excluded.received,
    stored = s.stored + excluded.stored,
    store_duplicates = s.store_duplicates + excluded.store_duplicates,
    dead_lettered = s.dead_lettered + excluded.dead_lettered,
    redelivered = s.redelivered + excluded.redelivered,
    conflicting = s.conflicting + excluded.conflicting,
    first_ts = LEAST(s.first_ts, excluded.first_ts),
    last_ts = GREATEST(s.last_ts, excluded.last_ts),
    last_stored_at = COALESCE(excluded.last_stored_at, s.last_stored_at)
"""

# Refusals of a value before it reaches PostgreSQL: asyncpg's encoders (a date out of range,
# say) and text that UTF-8 cannot encode.
_CLIENT_DATA_ERRORS = (asyncpg.DataError, UnicodeError, OverflowError, msgspec.EncodeError)

_headers_encoder = msgspec.json.Encoder()
_encode = msgspec.json.Encoder().encode


class Item(msgspec.Struct):
    """One delivered message with its stream position and what decoding made of it."""

    seq: int
    delivered: int
    subject: str
    # The broker's receive time, in nanoseconds since the epoch.
    received_ns: int
    # The raw header block as it came off the wire; parsed only for a dead letter.
    headers: bytes | None
    data: bytes
    result: Decoded | Rejected

    @property
    def received_at(self) -> datetime:
        """The broker's receive time as a datetime, to the microsecond."""
        return from_ns(self.received_ns)


class Outcome(msgspec.Struct):
    """What a committed batch did, for metrics and logs.

    `stored`, `duplicates` and `dead` hold stream sequences; a message in none of them was a
    redelivery of one already counted. `dead` maps to the rejection code.
    """

    stored: set[int] = msgspec.field(default_factory=set)
    duplicates: set[int] = msgspec.field(default_factory=set)
    dead: dict[int, str] = msgspec.field(default_factory=dict)
    redelivered: int = 0
    conflicting: int = 0
    duplicate_ages: list[float] = msgspec.field(default_factory=list)
    # The store refused the batch as a whole, and it was stored with its culprits isolated.
    isolated: bool = False

    def merge(self, other: Outcome) -> Outcome:
        """Return this outcome with another part of the same batch added."""
        self.stored |= other.stored
        self.duplicates |= other.duplicates
        self.dead.update(other.dead)
        self.redelivered += other.redelivered
        self.conflicting += other.conflicting
        self.duplicate_ages.extend(other.duplicate_ages)
        return self


class _Counts:
    __slots__ = (
        "conflicting",
        "dead",
        "dups",
        "first_ts",
        "last_ts",
        "received",
        "redelivered",
        "stored",
    )

    def __init__(self) -> None:
        self.received = self.stored = self.dups = self.dead = 0
        self.redelivered = self.conflicting = 0
        self.first_ts: datetime | None = None
        self.last_ts: datetime | None = None


def _topic_key(item: Item) -> str:
    if isinstance(item.result, Decoded):
        return item.result.topic
    # Made storable, since a subject may hold any bytes.
    return _storable(dead_letter_topic(item.subject))


def is_data_error(exc: BaseException) -> bool:
    """Whether a failure is caused by a value in the batch rather than by the store itself.

    PostgreSQL's classes 22 and 54 and a CHECK constraint's refusal, and asyncpg's or msgspec's refusal to encode a value on the
    client side. Connection, timeout and permission failures are not: they never make an event
    a dead letter, they make the batch wait for the store.
    """
    if isinstance(exc, asyncpg.PostgresError):
        state = str(exc.sqlstate)
        return state[:2] in _DATA_ERROR_CLASSES or state == _CHECK_VIOLATION
    return isinstance(exc, _CLIENT_DATA_ERRORS)


async def store_batch(conn: Conn, items: list[Item], shard: int) -> Outcome:
    """Store a batch in one transaction and return what it did; ack only after this returns.

    A value the store refuses fails the whole statement without naming its event. The batch is
    then stored again with the culprits isolated: halves in savepoints, split down to the single
    messages at fault, which become dead letters with the store's reason, while the rest is
    stored. The validator makes this path rare; it is what guarantees that no message, however
    it slipped through, can block the ones behind it.
    """
    try:
        async with conn.transaction():
            return await _store(conn, items, shard, {})
    except Exception as exc:
        if not is_data_error(exc):
            raise
    # Copies of one stream sequence (a redelivery while the first copy waited) stay together.
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(item.seq, []).append(item)
    async with conn.transaction():
        outcome = await _isolate(conn, list(groups.values()), shard, {})
    outcome.isolated = True
    return outcome


async def _isolate(
    conn: Conn, groups: list[list[Item]], shard: int, refused: dict[int, str]
) -> Outcome:
    try:
        async with conn.transaction():
            return await _store(conn, [item for group in groups for item in group], shard, refused)
    except Exception as exc:
        if not is_data_error(exc):
            raise
        error = exc
    if len(groups) > 1:
        middle = len(groups) // 2
        first = await _isolate(conn, groups[:middle], shard, refused)
        return first.merge(await _isolate(conn, groups[middle:], shard, refused))
    item = groups[0][0]
    if item.seq in refused or isinstance(item.result, Rejected):
        # Even its dead letter was refused: nothing can be stored for it, so the batch fails
        # and is retried (and reported stuck) rather than the message being dropped.
        raise UnstorableError(
            f"stream sequence {item.seq} cannot be stored even as a dead letter"
        ) from error
    reason = f"PostgreSQL refused the event: {error}"
    return await _isolate(conn, groups, shard, {**refused, item.seq: _storable(reason)})


class UnstorableError(RuntimeError):
    """A message that the store refuses even as a dead letter."""


async def _store(conn: Conn, items: list[Item], shard: int, unstorable: dict[int, str]) -> Outcome:
    outcome = Outcome()
    counts: defaultdict[str, _Counts] = defaultdict(_Counts)
    valid: list[tuple[Item, Decoded]] = []
    dead: list[tuple[Item, Rejected]] = []
    seen: set[int] = set()
    for item in items:
        if item.delivered > 1:
            counts[_topic_key(item)].redelivered += 1
            outcome.redelivered += 1
        # A message held past ack_wait (the store was down) can be delivered again while its
        # first copy still waits in the buffer: store and count each stream sequence once.
        if item.seq in seen:
            continue
        seen.add(item.seq)
        if isinstance(item.result, Rejected):
            dead.append((item, item.result))
        elif item.seq in unstorable:
            dead.append((item, Rejected(unstorable[item.seq], "store_refused")))
        else:
            valid.append((item, item.result))
    # One key order for every writer, so two consumers racing on the same keys cannot deadlock.
    valid.sort(key=lambda pair: (pair[1].topic, pair[1].event_id, pair[0].seq))

    if valid:
        await _insert_events(conn, valid, counts, outcome)
    if dead:
        await _insert_dead(conn, dead, counts, outcome)
    if counts:
        await _upsert_stats(conn, counts, shard)
    return outcome


# How many times a batch re-inserts copies whose originals expired under it before it gives
# up (and is retried whole): each round needs another expiry to race it, so one nearly always
# suffices.
_MAX_ROUNDS = 5


async def _insert_events(
    conn: Conn,
    valid: list[tuple[Item, Decoded]],
    counts: defaultdict[str, _Counts],
    outcome: Outcome,
    round_: int = 0,
) -> None:
    rows = [
        (
            e.topic,
            e.event_id,
            e.timestamp,
            e.source,
            msgspec.Raw(e.payload),
            i.seq,
            i.received_ns // 1000,
        )
        for i, e in valid
    ]
    inserted = {r[0] for r in await conn.fetch(_INSERT_EVENTS, _encode(rows).decode())}
    if inserted:
        await _undo_expired(conn, [(i, e) for i, e in valid if i.seq in inserted], inserted)
    rest: list[tuple[int, str, str, int, msgspec.Raw]] = []
    by_seq: dict[int, tuple[Item, Decoded]] = {}
    for item, event in valid:
        if item.seq in inserted:
            c = counts[event.topic]
            c.received += 1
            c.stored += 1
            ts = event.timestamp
            if c.first_ts is None or ts < c.first_ts:
                c.first_ts = ts
            if c.last_ts is None or ts > c.last_ts:
                c.last_ts = ts
        else:
            by_seq[item.seq] = (item, event)
            rest.append(
                (
                    item.seq,
                    event.topic,
                    event.event_id,
                    item.received_ns // 1000,
                    msgspec.Raw(event.payload),
                )
            )
    outcome.stored |= inserted
    if not rest:
        return
    missing: list[tuple[Item, Decoded]] = []
    for topic, same_payload, age, seq, lost in await conn.fetch(
        _INSERT_DUPLICATES, _encode(rest).decode()
    ):
        if lost:
            missing.append(by_seq[seq])
            continue
        outcome.duplicates.add(seq)
        c = counts[topic]
        c.received += 1
        c.dups += 1
        # NULL: the original expired, so whether the payloads differ is unknown.
        if same_payload is False:
            c.conflicting += 1
            outcome.conflicting += 1
        outcome.duplicate_ages.append(max(age, 0.0))
    if missing:
        if round_ >= _MAX_ROUNDS:
            raise RuntimeError(
                f"{len(missing)} events lost their stored copies to retention {round_} times"
                " while this batch was stored"
            )
        await _insert_events(conn, missing, counts, outcome, round_ + 1)


async def _undo_expired(conn: Conn, stored: list[tuple[Item, Decoded]], inserted: set[int]) -> None:
    """Undo this transaction's inserts of keys the dedup horizon remembers as expired.

    They leave `inserted`, so the duplicates statement that follows judges them by their key.
    """
    probe = [(i.seq, e.topic, e.event_id) for i, e in stored]
    topics = sorted({e.topic for _, e in stored})
    hits = {
        r[0]
        for r in await conn.fetch(_EXPIRED_KEYS, _encode(probe).decode(), topics, RETENTION_SHARD)
    }
    if not hits:
        return
    undo = [(e.topic, e.event_id) for i, e in stored if i.seq in hits]
    undone = await conn.fetchval(_UNDO_EXPIRED, [t for t, _ in undo], [k for _, k in undo])
    if undone != len(undo):
        raise RuntimeError(f"undid {undone} of {len(undo)} inserts of expired keys")
    inserted -= hits


async def _insert_dead(
    conn: Conn,
    dead: list[tuple[Item, Rejected]],
    counts: defaultdict[str, _Counts],
    outcome: Outcome,
) -> None:
    topics = [_topic_key(item) for item, _ in dead]
    # A dead letter must always be storable: text PostgreSQL refuses (a NUL character, say in
    # a Msg-Id header) is made visible instead, while `raw` keeps the exact bytes.
    rows = await conn.fetch(
        _INSERT_DEAD,
        [item.seq for item, _ in dead],
        [_storable(item.subject) for item, _ in dead],
        [_storable(topic) for topic in topics],
        [_headers_encoder.encode(_headers(item)).decode() for item, _ in dead],
        [item.data[:DEAD_RAW_LIMIT] for item, _ in dead],
        [len(item.data) for item, _ in dead],
        [_storable(rejected.reason) for _, rejected in dead],
        [item.received_at for item, _ in dead],
    )
    codes = {item.seq: rejected.code for item, rejected in dead}
    for topic, seq in rows:
        c = counts[topic]
        c.received += 1
        c.dead += 1
        outcome.dead[seq] = codes[seq]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(instant: datetime | None) -> int | None:
    """Return an instant as microseconds since the epoch, exactly (None stays None)."""
    return None if instant is None else (instant - _EPOCH) // _MICROSECOND


def _storable(text: str) -> str:
    """Return text PostgreSQL can store: NUL made visible, a lone surrogate escaped."""
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode()
    return text.replace("\x00", "\ufffd")


def _headers(item: Item) -> dict[str, str]:
    headers = parse_headers(item.headers) if item.headers else {}
    return {_storable(k): _storable(v) for k, v in headers.items()}


async def _upsert_stats(conn: Conn, counts: dict[str, _Counts], shard: int) -> None:
    topics = sorted(counts)
    columns: list[list[Any]] = [[] for _ in range(8)]
    for topic in topics:
        c = counts[topic]
        for column, value in zip(
            columns,
            (
                c.received,
                c.stored,
                c.dups,
                c.dead,
                c.redelivered,
                c.conflicting,
                _micros(c.first_ts),
                _micros(c.last_ts),
            ),
            strict=True,
        ):
            column.append(value)
    await conn.execute(_UPSERT_STATS, shard, topics, *columns)
