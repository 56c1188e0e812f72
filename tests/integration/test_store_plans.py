"""The consumer's statements keep index plans as the events table grows from empty."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from oncelog.store import batch as store


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(node for child in plan.get("Plans", []) for node in _nodes(child))]


async def test_the_duplicate_probe_stays_an_index_probe_as_the_table_grows(
    pool: asyncpg.Pool,
) -> None:
    """A batch of duplicates costs one index probe each, never a scan of every stored event.

    The statement is prepared while `events` is empty, as when a consumer starts on a new
    database, and used again once the table holds 50,000 rows that were never analysed. A plan
    cached at the start once became a hash join over a sequential scan of `events`, run for
    every batch, so a drain slowed down with every row it stored.
    """
    async with pool.acquire() as conn:
        await conn.execute(f"PREPARE dups(text) AS {store._INSERT_DUPLICATES}")  # noqa: SLF001 - the plan under test is the store's own statement
        for _ in range(8):
            await conn.execute("EXECUTE dups('[]')")
        await conn.execute(
            """
            INSERT INTO events (topic, event_id, ts, source, payload, stream_seq, received_at)
            SELECT 'plan.t' || (n % 8), 'e-' || n, now(), 'test', '{}', n, now()
            FROM generate_series(1, 50000) AS n
            """
        )
        now = datetime.now(UTC)
        batch = [
            (10**6 + n, f"plan.t{n % 8}", f"e-{n}", now, msgspec.Raw(b"{}")) for n in range(300)
        ]
        literal = msgspec.json.encode(batch).decode().replace("'", "''")
        explain = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE dups('{literal}')")
    nodes = _nodes(json.loads(explain)[0]["Plan"])
    scans = {
        (n["Node Type"], n.get("Index Name")) for n in nodes if n.get("Relation Name") == "events"
    }
    assert scans == {("Index Scan", "events_pkey")}, nodes
    assert not [n for n in nodes if n["Node Type"] in {"Hash Join", "Merge Join"}], nodes
