"""The API's SQL: keyset-paginated events and statistics summed over shards."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

import msgspec

from oncelog.platform.db import Conn

__all__ = [
    "Cursor",
    "CursorError",
    "decode_cursor",
    "encode_cursor",
    "fetch_events",
    "fetch_stats",
    "topic_filter",
]


class CursorError(ValueError):
    """A cursor that this API did not issue."""


class Cursor(msgspec.Struct, array_like=True, frozen=True):
    """The position after the last event of a page: its (timestamp, topic, event_id)."""

    ts: datetime
    topic: str
    event_id: str


def encode_cursor(cursor: Cursor) -> str:
    """Return `cursor` as an opaque URL-safe token."""
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode().rstrip("=")


def decode_cursor(token: str) -> Cursor:
    """Read a token made by encode_cursor."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return msgspec.json.decode(raw, type=Cursor)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise CursorError("cursor is not one this API issued") from exc


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def topic_filter(pattern: str, arg: int) -> tuple[str, list[Any]]:
    """Return a SQL condition matching a topic or a NATS wildcard, with its parameters.

    `auth.*` matches exactly one more token, `auth.>` one or more; other topics match exactly.
    Prefix conditions use LIKE on the C-collated column, which the btree indexes serve. Tokens
    are validated before they get here: [A-Za-z0-9_-] needs no escaping in a regex.
    """
    tokens = pattern.split(".")
    if "*" not in tokens and ">" not in tokens:
        return f"topic = ${arg}", [pattern]
    prefix: list[str] = []
    for token in tokens:
        if token in {"*", ">"}:
            break
        prefix.append(token)
    like = _like_escape(".".join(prefix) + ("." if prefix else "")) + "%"
    regex = "^" + r"\.".join("[^.]+" if t == "*" else ".+" if t == ">" else t for t in tokens) + "$"
    return f"topic LIKE ${arg} AND topic ~ ${arg + 1}", [like, regex]


async def fetch_events(
    conn: Conn,
    *,
    topic: str | None,
    since: datetime | None,
    until: datetime | None,
    after: Cursor | None,
    descending: bool,
    limit: int,
) -> list[Any]:
    """Return up to `limit` events in (timestamp, topic, event_id) order."""
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
        args += [after.ts, after.topic, after.event_id]
        n = len(args)
        op = "<" if descending else ">"
        where.append(f"(ts, topic, event_id) {op} (${n - 2}, ${n - 1}, ${n})")
    direction = "DESC" if descending else "ASC"
    args.append(limit)
    sql = (
        "SELECT topic, event_id, ts, source, payload FROM events"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY ts {direction}, topic {direction}, event_id {direction} LIMIT ${len(args)}"
    )
    return await conn.fetch(sql, *args)


_STATS = """
SELECT topic,
       sum(received)::bigint AS received,
       sum(stored)::bigint AS stored,
       sum(store_duplicates)::bigint AS store_duplicates,
       sum(broker_duplicates)::bigint AS broker_duplicates,
       sum(dead_lettered)::bigint AS dead_lettered,
       sum(redelivered)::bigint AS redelivered,
       sum(conflicting)::bigint AS conflicting,
       min(first_ts) AS first_ts,
       max(last_ts) AS last_ts,
       max(last_stored_at) AS last_stored_at
FROM topic_stats
GROUP BY topic
ORDER BY topic
"""


async def fetch_stats(conn: Conn) -> list[Any]:
    """Return per-topic statistics: one row per topic, whatever the number of stored events."""
    return await conn.fetch(_STATS)
