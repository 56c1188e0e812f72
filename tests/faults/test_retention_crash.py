"""kill -9 of the retention service inside its delete transactions, while consumers ingest."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from faults.procs import Fleet, fault_settings
from faults.scenario import Scenario
from helpers import totals, wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import msg_id
from oncelog.local.embedded import die_with_parent, free_port
from oncelog.store import stats

pytestmark = pytest.mark.faults

OLD_EVENTS = 20_000
BATCH = 500
APPLICATION = "oncelog-retention"


def retention_env(settings: ConsumerSettings) -> dict[str, str]:
    """Return the environment of `python -m oncelog.retention` on the scenario's database."""
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    return env | {
        "DATABASE_URL": settings.database_url,
        "RETENTION_DAYS": "1",
        "DEDUP_HORIZON_DAYS": "30",
        "RETENTION_BATCH_SIZE": str(BATCH),
        "RETENTION_INTERVAL_SECONDS": "0.5",
        "METRICS_PORT": str(free_port()),
        "LOG_LEVEL": "WARNING",
    }


def spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "oncelog.retention"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: die_with_parent(signal.SIGKILL),  # noqa: PLW1509
        )


async def kill_inside_a_batch(pool: asyncpg.Pool, proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL `proc` while its session runs a delete batch; False if none was seen in time."""
    query = """SELECT count(*) FROM pg_stat_activity
               WHERE application_name = $1 AND state = 'active' AND query LIKE '%WITH doomed%'"""
    landed = False
    async with pool.acquire() as conn:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if await conn.fetchval(query, APPLICATION):
                landed = True
                break
            await asyncio.sleep(0.001)
    proc.kill()
    await asyncio.to_thread(proc.wait, 30)
    return landed


async def snapshot_violations(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        return await stats.invariant_violations(conn)


async def test_kill_9_of_retention_mid_batch_loses_and_double_counts_nothing(
    settings: ConsumerSettings, fleet_factory: Callable[[ConsumerSettings], Fleet], tmp_path: Path
) -> None:
    """Retention killed inside its delete transactions, again and again, while consumers store
    new events: every old event expires exactly once (rows, `expired` and keys agree), replays
    of expired ids stay duplicates, nothing acked is lost and the invariants hold throughout."""
    s = fault_settings(settings)
    fleet = fleet_factory(s)
    async with Scenario("retention kill -9 (mid-batch)", s, fleet, rate=300.0) as scenario:
        await scenario.start(consumers=2)
        assert scenario.pool is not None
        assert scenario.nc is not None
        pool, nc, ledger = scenario.pool, scenario.nc, scenario.ledger
        keys = [("ret.old", f"old-{n}") for n in range(OLD_EVENTS)]
        for key in keys:
            ledger.attempt(key)
            data = {"event_id": key[1], "timestamp": "2020-01-01T00:00:00Z", "payload": {}}
            await nc.publish(
                f"{s.subject_prefix}.{key[0]}",
                json.dumps(data).encode(),
                headers={"Nats-Msg-Id": msg_id(*key)},
            )
        await nc.flush()

        async def all_old_stored() -> bool:
            n = await pool.fetchval("SELECT count(*) FROM events WHERE topic = 'ret.old'")
            return bool(n == OLD_EVENTS)

        await wait_until(all_old_stored, within=120, interval=0.2)
        for key in keys:
            ledger.ack(key, duplicate=False)

        env = retention_env(s)
        log = tmp_path / "retention.log"
        kills = 0
        violations: list[str] = []
        for _ in range(4):
            kills += await kill_inside_a_batch(pool, spawn(env, log))
            violations += await snapshot_violations(pool)
        assert kills >= 2, log.read_text(errors="replace")[-3000:]
        survivor = spawn(env, log)
        try:

            async def all_expired() -> bool:
                return (await totals(pool))["expired"] >= OLD_EVENTS

            await wait_until(all_expired, within=120, interval=0.2)
            # Copies of expired events past the broker's window (no Msg-Id): duplicates.
            for key in keys[:200]:
                ledger.attempt(key)
                await nc.publish(
                    f"{s.subject_prefix}.{key[0]}",
                    json.dumps({"event_id": key[1], "timestamp": "2020-01-01T00:00:00Z"}).encode(),
                )
            await nc.flush()
            verdict = await scenario.verdict(kills)
        finally:
            survivor.terminate()
            await asyncio.to_thread(survivor.wait, 30)
    assert violations == []
    assert verdict.ok, verdict
    async with asyncpg.create_pool(s.database_url, min_size=1, max_size=1) as check_pool:
        counts = await stats.per_topic(check_pool)
        assert counts["ret.old"].expired == OLD_EVENTS
        assert counts["ret.old"].stored == OLD_EVENTS
        assert counts["ret.old"].store_duplicates == 200
        assert await check_pool.fetchval("SELECT count(*) FROM expired_keys") == OLD_EVENTS
        assert await check_pool.fetchval("SELECT count(*) FROM events WHERE topic = 'ret.old'") == 0
