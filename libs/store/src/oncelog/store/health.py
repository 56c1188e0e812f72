"""Consumer health in PostgreSQL: replicas report stuck batches, the API's /ready reads them."""

from __future__ import annotations

from datetime import datetime

import msgspec

from oncelog.store.schema import Conn

__all__ = ["FRESH_SECONDS", "Stuck", "report", "stuck"]

# A replica refreshes its row more often than this; an older row is a replica that is gone.
FRESH_SECONDS = 30

_REPORT = """
INSERT INTO consumer_health (consumer_id, stuck_batches, stuck_since, last_error, updated_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (consumer_id) DO UPDATE SET
    stuck_batches = excluded.stuck_batches,
    stuck_since = excluded.stuck_since,
    last_error = excluded.last_error,
    updated_at = excluded.updated_at
"""

_STUCK = f"""
SELECT consumer_id, stuck_batches, stuck_since, last_error FROM consumer_health
WHERE stuck_batches > 0 AND updated_at > now() - interval '{FRESH_SECONDS} seconds'
ORDER BY consumer_id
"""


class Stuck(msgspec.Struct, frozen=True):
    """A replica holding batches that keep failing to commit."""

    consumer_id: str
    stuck_batches: int
    stuck_since: datetime | None
    last_error: str | None


async def report(
    conn: Conn, consumer_id: str, batches: int, since: datetime | None, error: str | None
) -> None:
    """Record how many batches this replica is stuck on (0: none), and since when."""
    await conn.execute(
        _REPORT, consumer_id, batches, since, None if error is None else error[:1000]
    )


async def stuck(conn: Conn) -> list[Stuck]:
    """Return the live replicas that are stuck on at least one batch."""
    return [Stuck(**dict(row)) for row in await conn.fetch(_STUCK, timeout=2)]
