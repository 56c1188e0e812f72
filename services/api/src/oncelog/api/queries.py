"""The API's SQL: keyset-paginated events and statistics summed over shards."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any, TypeVar

import msgspec

from oncelog.events import Event
from oncelog.store import stats
from oncelog.store.schema import Conn
from oncelog.store.topics import is_exact, topic_filter

__all__ = [
    "EVENT_SQL",
    "Cursor",
    "CursorError",
    "DeadCursor",
    "decode_cursor",
    "encode_cursor",
    "event_of",
    "events_query",
    "fetch_dead_letter",
    "fetch_dead_letters",
    "fetch_event",
    "fetch_events",
    "fetch_stats",
    "mark_replayed",
    "topic_filter",
]


C = TypeVar("C", bound=msgspec.Struct)

_decode_payload = msgspec.json.Decoder(dict[str, Any])


def event_of(row: Any) -> Event:
    """Return a stored row (topic, event_id, ts, source, payload) as the event the API sends."""
    return Event(
        topic=row["topic"],
        event_id=row["event_id"],
        timestamp=row["ts"],
        source=row["source"],
        payload=_decode_payload.decode(row["payload"]),
    )


class CursorError(ValueError):
    """A cursor that this API did not issue."""


class Cursor(msgspec.Struct, array_like=True, frozen=True):
    """The position after the last event of a page: its (timestamp, topic, event_id).

    It remembers the order it was made for, so a cursor cannot be walked the wrong way.
    """

    ts: datetime
    topic: str
    event_id: str
    descending: bool = False


def encode_cursor(cursor: msgspec.Struct) -> str:
    """Return `cursor` as an opaque URL-safe token."""
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode().rstrip("=")


def decode_cursor(token: str, kind: type[C]) -> C:
    """Read a token made by encode_cursor."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return msgspec.json.decode(raw, type=kind)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise CursorError("cursor is not one this API issued") from exc


def events_query(
    *,
    topic: str | None,
    since: datetime | None,
    until: datetime | None,
    after: Cursor | None,
    descending: bool,
    limit: int,
) -> tuple[str, list[Any]]:
    """Return the SQL and parameters of a page of events in (timestamp, topic, event_id) order."""
    where: list[str] = []
    args: list[Any] = []
    if topic is not None:
        condition, params = topic_filter(topic, len(args) + 1)
        where.append(condition)
        args += params
    if since is not None:
        args.append(since)
        where.append(f"ts >= ${len(args)}")
    if until is not None:
        args.append(until)
        where.append(f"ts < ${len(args)}")
    if after is not None:
        op = "<" if descending else ">"
        if topic is not None and is_exact(topic):
            # With the topic fixed, the row comparison on (ts, event_id) follows the equality in
            # events_topic_ts, so a deep page starts with an index seek instead of a scan.
            args += [after.ts, after.event_id]
            where.append(f"(ts, event_id) {op} (${len(args) - 1}, ${len(args)})")
        else:
            args += [after.ts, after.topic, after.event_id]
            n = len(args)
            where.append(f"(ts, topic, event_id) {op} (${n - 2}, ${n - 1}, ${n})")
    direction = "DESC" if descending else "ASC"
    args.append(limit)
    sql = (
        "SELECT topic, event_id, ts, source, payload FROM events"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY ts {direction}, topic {direction}, event_id {direction} LIMIT ${len(args)}"
    )
    return sql, args


async def fetch_events(conn: Conn, *, max_bytes: int, **query: Any) -> tuple[list[Any], bool]:
    """Return up to `limit` events in (timestamp, topic, event_id) order (see events_query), and
    whether the page was cut short to stay within `max_bytes` of payload text.

    Events may be up to MAX_EVENT_BYTES each, so a page of 1,000 could hold a gigabyte: the rows
    after the first whose payloads would pass `max_bytes` in all are left to the next page (the
    first row always comes, whatever its size).
    """
    sql, args = events_query(**query)
    direction = "DESC" if query["descending"] else "ASC"
    order = f"ts {direction}, topic {direction}, event_id {direction}"
    args.append(max_bytes)
    # Each payload is converted to text once, in `texts` (OFFSET 0 keeps the planner from
    # pulling it up and converting again for every use); its size is then its length.
    budgeted = f"""
SELECT topic, event_id, ts, source, payload, fetched FROM (
    SELECT *, octet_length(payload) AS size,
           sum(octet_length(payload)) OVER (ORDER BY {order} ROWS UNBOUNDED PRECEDING) AS upto,
           count(*) OVER () AS fetched
    FROM (SELECT topic, event_id, ts, source, payload::text AS payload
          FROM ({sql}) page OFFSET 0) texts
) summed
WHERE upto - size < ${len(args)}
ORDER BY {order}"""
    rows = await conn.fetch(budgeted, *args)
    return rows, bool(rows) and len(rows) < rows[0]["fetched"]


async def fetch_stats(conn: Conn, topic: str | None = None) -> dict[str, stats.Counts]:
    """Return per-topic statistics (those matching `topic`), whatever the number of events."""
    if topic is None:
        return await stats.per_topic(conn)
    condition, params = topic_filter(topic, 1)
    return await stats.per_topic(conn, condition, tuple(params))


EVENT_SQL = """
SELECT e.topic, e.event_id, e.ts, e.source, e.payload, e.stream_seq, e.received_at, e.stored_at,
       d.n AS duplicates, d.last AS last_duplicate_at
FROM events e,
     LATERAL (SELECT count(*) AS n, max(received_at) AS last FROM duplicates
              WHERE topic = e.topic AND event_id = e.event_id) d
WHERE e.topic = $1 AND e.event_id = $2
"""


async def fetch_event(conn: Conn, topic: str, event_id: str) -> Any:
    """Return one stored event with its store-layer duplicates, or None."""
    return await conn.fetchrow(EVENT_SQL, topic, event_id)


class DeadCursor(msgspec.Struct, array_like=True, frozen=True):
    """The position after the last dead letter of a page (newest first)."""

    id: int


async def fetch_dead_letters(
    conn: Conn, *, topic: str | None, before: int | None, limit: int
) -> list[Any]:
    """Return up to `limit` dead letters, newest first."""
    where: list[str] = []
    args: list[Any] = []
    if topic is not None:
        condition, params = topic_filter(topic, 1)
        where.append(condition)
        args += params
    if before is not None:
        args.append(before)
        where.append(f"id < ${len(args)}")
    args.append(limit)
    sql = (
        "SELECT id, stream_seq, subject, topic, headers, raw, raw_size, reason, received_at,"
        " dead_at, replayed_at FROM dead_letters"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY id DESC LIMIT ${len(args)}"
    )
    return await conn.fetch(sql, *args)


async def fetch_dead_letter(conn: Conn, letter_id: int) -> Any:
    """Return one dead letter, or None."""
    return await conn.fetchrow(
        "SELECT id, subject, topic, raw, raw_size, reason FROM dead_letters WHERE id = $1",
        letter_id,
    )


async def mark_replayed(conn: Conn, letter_id: int) -> datetime:
    """Record that a dead letter was published again; return when."""
    value: datetime = await conn.fetchval(
        "UPDATE dead_letters SET replayed_at = now() WHERE id = $1 RETURNING replayed_at",
        letter_id,
    )
    return value
