"""Stored events in commit order: the positions the live tail exposes, and the reads behind it.

A position is (tx, pos): the storing transaction's id, then a sequence number (migration 0005
says why). Only rows whose transaction id is below the current snapshot's xmin are exposed: all
their transactions have ended, so nothing can still appear below the last position a reader
saw, and resuming after it misses nothing and repeats nothing.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from oncelog.store.schema import Conn

__all__ = [
    "NOTIFY_CHANNEL",
    "NOTIFY_SQL",
    "ORIGIN",
    "POSITION_PATTERN",
    "READ_BYTES",
    "Position",
    "PositionError",
    "head",
    "more_after",
    "read_after",
]

# The consumer notifies this channel after a commit that stored events; the API listens.
NOTIFY_CHANNEL = "oncelog_stored"
NOTIFY_SQL = f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"

# Two whole numbers of at most 18 digits (below 2^63, so PostgreSQL's bigint holds them), with
# no sign, no leading zero and ASCII digits only: one text per position.
POSITION_PATTERN = r"^(0|[1-9][0-9]{0,17})-(0|[1-9][0-9]{0,17})$"
_TEXT = re.compile(POSITION_PATTERN.removeprefix("^").removesuffix("$"))

# Everything below this transaction id has committed or rolled back, for good.
_HORIZON = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
_KEYS = "tx, pos, topic, event_id, ts, source"


class PositionError(ValueError):
    """Text that is not a position this store issued."""


class Position(msgspec.Struct, frozen=True, order=True):
    """A place in the store's commit order; compares in that order."""

    tx: int
    pos: int

    def __str__(self) -> str:
        return f"{self.tx}-{self.pos}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """Read a position written by str(); anything else raises PositionError."""
        match = _TEXT.fullmatch(text)
        if match is None:
            raise PositionError("must be a position from an SSE id: two whole numbers, like 812-5")
        return cls(int(match[1]), int(match[2]))


# Before every stored event.
ORIGIN = Position(0, 0)


async def head(conn: Conn) -> Position:
    """Return the position of the last exposed event (ORIGIN when there is none)."""
    row = await conn.fetchrow(
        f"SELECT tx, pos FROM events WHERE tx < {_HORIZON} ORDER BY tx DESC, pos DESC LIMIT 1"
    )
    return Position(row["tx"], row["pos"]) if row is not None else ORIGIN


# What one read may hold of payload text past its first row: events may be up to
# MAX_EVENT_BYTES each, and a read of 500 of them must not hold half a gigabyte.
READ_BYTES = 8 * 1024 * 1024


async def read_after(
    conn: Conn,
    after: Position,
    limit: int,
    *,
    until: Position | None = None,
    condition: str | None = None,
    params: tuple[Any, ...] = (),
    max_bytes: int = READ_BYTES,
) -> list[Any]:
    """Return up to `limit` exposed events after `after` (and at or before `until`), in order,
    with no more than `max_bytes` of payload text past the first row.

    Each row carries `upto`, the payload text of the rows up to and including it. A read that
    stops short of `limit` with its last `upto` at `max_bytes` or more may have been cut: read
    on after its last row (`more_after`). `condition` is an extra SQL condition on the row
    whose parameters are `params`, numbered from $1; the position parameters follow them.
    """
    args: list[Any] = list(params)
    where = [condition] if condition else []
    args += [after.tx, after.pos]
    where.append(f"(tx, pos) > (${len(args) - 1}, ${len(args)})")
    if until is not None:
        args += [until.tx, until.pos]
        where.append(f"(tx, pos) <= (${len(args) - 1}, ${len(args)})")
    else:
        where.append(f"tx < {_HORIZON}")
    args += [limit, max_bytes]
    # Each payload becomes text once, in the page, which keeps its index order, so the running
    # sum needs no sort; PostgreSQL prints a jsonb as this same text when it sends it.
    sql = f"""
SELECT * FROM (
    SELECT page.*, sum(octet_length(payload)) OVER (ORDER BY tx, pos ROWS UNBOUNDED PRECEDING)
           AS upto
    FROM (SELECT {_KEYS}, payload::text AS payload FROM events
          WHERE {" AND ".join(where)} ORDER BY tx, pos LIMIT ${len(args) - 1}) page
) summed
WHERE upto - octet_length(payload) < ${len(args)}
ORDER BY tx, pos"""
    return await conn.fetch(sql, *args)


def more_after(rows: list[Any], limit: int, max_bytes: int = READ_BYTES) -> bool:
    """Whether more rows may follow a read of `limit` rows and `max_bytes`: it was full, in rows
    or in bytes. A read whose last row filled the budget exactly says so too; the next read
    then finds nothing, which costs a query and nothing else."""
    return len(rows) == limit or (bool(rows) and rows[-1]["upto"] >= max_bytes)
