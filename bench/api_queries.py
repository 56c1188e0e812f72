"""API query speed at 1,000,000 stored events, with the PostgreSQL plans behind it.

    uv run --group bench python bench/api_queries.py [--rows 1000000] [--requests 200]

Starts a scratch embedded PostgreSQL in a temporary directory, migrates it, fills `events` with
a generate_series INSERT (100 topics such as `svc3.prod.login`, timestamps over 30 days) and
`topic_stats` to match, then prints EXPLAIN (ANALYZE, BUFFERS) of the SQL each route runs and
the latency of the routes themselves over HTTP (uvicorn, the app as `just up` serves it).
Nothing here needs NATS: the read routes only touch PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn

from oncelog.api import queries
from oncelog.api.app import create_app
from oncelog.api.settings import ApiSettings
from oncelog.local.embedded import PostgresServer, free_port
from oncelog.platform.settings import load
from oncelog.store import schema, stats

# An event of svc3.prod.login that has store-layer duplicates.
EVENT_ID = "e-500003"


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


FILL = """
INSERT INTO events (topic, event_id, ts, source, payload, stream_seq, received_at)
SELECT 'svc' || (n % 10) || '.' || (ARRAY['prod','dev','test','stage','qa'])[1 + (n / 10) % 5]
           || '.' || (ARRAY['login','logout'])[1 + (n / 50) % 2],
       'e-' || n,
       timestamptz '2026-01-01' + (n % 2592000) * interval '1 second' + (n / 2592000) * interval '1 ms',
       'bench',
       jsonb_build_object('n', n, 'user', n % 9973),
       n,
       now()
FROM generate_series(1, $1) AS n
"""

# A tenth of svc3.prod.login's events got a store-layer duplicate, so the provenance query meets
# a populated duplicates table.
DUPLICATES = """
INSERT INTO duplicates (stream_seq, topic, event_id, received_at, first_received_at, same_payload)
SELECT $1::bigint + row_number() OVER (), topic, event_id, received_at + interval '5 minutes',
       received_at, true
FROM events WHERE topic = 'svc3.prod.login' AND stream_seq % 1000 = 3
"""

STATS = """
INSERT INTO topic_stats (topic, shard, received, stored, first_ts, last_ts, last_stored_at)
SELECT topic, 0, count(*), count(*), min(ts), max(ts), max(stored_at) FROM events GROUP BY topic
"""


async def fill(url: str, rows: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await schema.migrate(conn)
        started = time.monotonic()
        await conn.execute(FILL, rows)
        await conn.execute(DUPLICATES, rows)
        await conn.execute(STATS)
        await conn.execute("VACUUM ANALYZE")
        say(f"filled {rows:,} events in {time.monotonic() - started:.1f}s")
    finally:
        await conn.close()


async def explain(url: str) -> None:
    """Print the plan of each route's SQL, as the API builds it."""
    conn = await asyncpg.connect(url)
    try:
        # The cursor of a page halfway through the topic: a deep page.
        mid = await conn.fetchrow(
            "SELECT ts, topic, event_id FROM events WHERE topic = 'svc3.prod.login'"
            " ORDER BY ts, event_id OFFSET 5000 LIMIT 1"
        )
        assert mid is not None
        cursor = queries.Cursor(mid["ts"], mid["topic"], mid["event_id"])
        cases: list[tuple[str, str, list[Any]]] = []
        routes: list[tuple[str, dict[str, Any]]] = [
            ("GET /events?topic=svc3.prod.login&limit=100", {"topic": "svc3.prod.login"}),
            (
                "GET /events?topic=svc3.prod.login&limit=100&cursor=<mid-stream>",
                {"topic": "svc3.prod.login", "after": cursor},
            ),
            ("GET /events?limit=100 (all topics)", {"topic": None}),
            (
                "GET /events?limit=100&cursor=<mid-stream> (all topics)",
                {"topic": None, "after": cursor},
            ),
            ("GET /events?topic=svc3.>&limit=100", {"topic": "svc3.>"}),
            ("GET /events?topic=*.prod.login&limit=100", {"topic": "*.prod.login"}),
            (
                "GET /events?topic=svc3.prod.login&since=...&until=...&order=desc",
                {
                    "topic": "svc3.prod.login",
                    "since": datetime(2026, 1, 10, tzinfo=UTC),
                    "until": datetime(2026, 1, 11, tzinfo=UTC),
                    "descending": True,
                },
            ),
        ]
        for title, query in routes:
            q: dict[str, Any] = {
                "since": None,
                "until": None,
                "after": None,
                "descending": False,
                "limit": 101,
            } | query
            sql, args = queries.events_query(**q)
            cases.append((title, sql, args))
        cases.append(("GET /stats and GET /topics", stats.PER_TOPIC_SQL.format(where=""), []))
        cases.append(
            (
                "GET /events/{topic}/{event_id}",
                queries.EVENT_SQL,
                ["svc3.prod.login", EVENT_ID],
            )
        )
        for title, sql, args in cases:
            plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, *args)
            say(f"\n-- {title}\n{sql.strip()}\n")
            for row in plan:
                say("  " + row[0])
    finally:
        await conn.close()


def serve(url: str) -> tuple[uvicorn.Server, str]:
    settings = load(
        ApiSettings,
        environ={},
        database_url=url,
        nats_url=f"nats://127.0.0.1:{free_port()}",  # nobody listens: reads need no broker
        rate_limit_per_second=0,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), port=port, log_config=None, access_log=False, lifespan="on"
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(base + "/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    return server, base


def latency(base: str, requests: int) -> None:
    """Print median and p95 latency of the read routes, one request at a time."""
    paths = [
        "/events?topic=svc3.prod.login&limit=100",
        "/events?limit=100",
        "/events?topic=svc3.>&limit=100",
        f"/events/svc3.prod.login/{EVENT_ID}",
        "/stats",
        "/topics",
    ]
    say(f"\n{'route':<45} {'median ms':>10} {'p95 ms':>8}")
    with httpx.Client(base_url=base, timeout=30) as http:
        link = http.get(paths[0]).headers["link"]
        paths.insert(1, link[1 : link.index(">")])
        for path in paths:
            for _ in range(10):
                assert http.get(path).status_code == 200
            times = []
            for _ in range(requests):
                started = time.perf_counter()
                resp = http.get(path)
                times.append((time.perf_counter() - started) * 1000)
                assert resp.status_code == 200, resp.text
            times.sort()
            label = path if "cursor" not in path else "/events?topic=...&limit=100&cursor=<page 2>"
            say(
                f"{label:<45} {statistics.median(times):>10.2f} "
                f"{times[int(len(times) * 0.95) - 1]:>8.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, PostgresServer(Path(tmp) / "pg") as pg:
        admin_url = pg.url()
        asyncio.run(_create(admin_url))
        url = pg.url("bench")
        asyncio.run(fill(url, args.rows))
        asyncio.run(explain(url))
        server, base = serve(url)
        try:
            latency(base, args.requests)
        finally:
            server.should_exit = True


async def _create(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE DATABASE bench")
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
