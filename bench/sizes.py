"""Disk per stored event and per remembered key, for docs/operations.md's sizing.

    uv run --group bench python bench/sizes.py [--rows 1000000]

Starts a scratch embedded PostgreSQL, stores `--rows` events of the bench's shape (the payload
of bench/run.py, UUID event ids, eight topics) with one INSERT, measures the events table with
its indexes, then expires them all through the retention job's own statement and measures the
keys it remembers for the dedup horizon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from oncelog.local.embedded import PostgresServer
from oncelog.store import retention, schema

PAYLOAD = {"user": 1234, "action": "login", "ok": True, "ip": "10.0.0.1", "agent": "bench/1.0"}


async def measure(url: str, rows: int) -> dict[str, float]:
    """Store, measure, expire, measure; return bytes per event and per key."""
    conn = await asyncpg.connect(url)
    try:
        await schema.migrate(conn)
        await conn.execute(
            """INSERT INTO events (topic, event_id, ts, source, payload, stream_seq, received_at)
               SELECT 'bench.t' || (i % 8), md5(i::text)::uuid::text,
                      now() - interval '30 days', 'bench', $2::jsonb || jsonb_build_object('n', i),
                      i, now() - interval '30 days'
               FROM generate_series(1, $1) AS i""",
            rows,
            json.dumps(PAYLOAD),
        )
        await conn.execute(
            """INSERT INTO topic_stats (topic, shard, received, stored)
               SELECT topic, 0, count(*), count(*) FROM events GROUP BY topic"""
        )
        await conn.execute("VACUUM ANALYZE events")
        total = await conn.fetchval("SELECT pg_total_relation_size('events')")
        heap = await conn.fetchval("SELECT pg_relation_size('events')")
        before = datetime.now(UTC) - timedelta(days=7)
        for record in await conn.fetch("SELECT DISTINCT topic FROM events"):
            while (
                await retention.expire_events(
                    conn, record["topic"], before, limit=50_000, keep_keys_since=None
                )
            )[0]:
                pass
        await conn.execute("VACUUM ANALYZE expired_keys")
        keys = await conn.fetchval("SELECT pg_total_relation_size('expired_keys')")
        remembered = await conn.fetchval("SELECT count(*) FROM expired_keys")
    finally:
        await conn.close()
    return {
        "bytes_per_event": round(total / rows, 1),
        "row_bytes_per_event": round(heap / rows, 1),
        "bytes_per_key": round(keys / remembered, 1),
    }


async def _run(pg: PostgresServer, rows: int) -> dict[str, float]:
    admin = await asyncpg.connect(pg.url())
    try:
        await admin.execute("CREATE DATABASE sizes")
    finally:
        await admin.close()
    return await measure(pg.url("sizes"), rows)


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, PostgresServer(Path(tmp) / "pg") as pg:
        result = asyncio.run(_run(pg, args.rows))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
