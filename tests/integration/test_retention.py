"""The retention service on real servers: expiry on schedule while ingestion runs, statistics
exact at every committed instant, one worker at a time, its metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import msgspec
import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from helpers import assert_invariants, running_consumer, totals, wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import msg_id
from oncelog.platform.settings import SettingsError, load
from oncelog.retention.job import Retention
from oncelog.retention.metrics import RetentionMetrics
from oncelog.retention.settings import RetentionSettings
from oncelog.store import retention, stats

OLD = "2020-01-01T00:00:00Z"


def retention_settings(settings: ConsumerSettings, **overrides: Any) -> RetentionSettings:
    """Retention settings on the test's database, with `overrides`."""
    shared = {
        f: getattr(settings, f)
        for f in RetentionSettings.__struct_fields__
        if hasattr(settings, f) and f != "metrics_port"
    }
    return msgspec.convert(shared | overrides, RetentionSettings)


async def publish(
    js: JetStreamContext,
    settings: ConsumerSettings,
    topic: str,
    event_id: str,
    ts: str,
    *,
    msg_id_header: bool = True,
) -> None:
    body = json.dumps({"event_id": event_id, "timestamp": ts, "payload": {"id": event_id}})
    headers = {"Nats-Msg-Id": msg_id(topic, event_id)} if msg_id_header else None
    await js.publish(f"{settings.subject_prefix}.{topic}", body.encode(), headers=headers)


async def sample_invariants(pool: asyncpg.Pool, stop: asyncio.Event) -> tuple[int, list[str]]:
    """Check the invariants in one snapshot after another until `stop`; (samples, violations)."""
    samples, found = 0, []
    async with pool.acquire() as conn:
        while not stop.is_set():
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                found += await stats.invariant_violations(conn)
            samples += 1
            await asyncio.sleep(0.01)
    return samples, found


async def test_old_events_expire_on_schedule_while_ingestion_runs(
    js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """With RETENTION_DAYS=1 and `keep.> = forever`, events with old timestamps expire run after
    run while the consumer stores more and replays of expired ids arrive; every snapshot taken
    meanwhile satisfies the invariants, every replay is a duplicate, and nothing recent goes."""
    config = retention_settings(
        settings,
        retention_days=1,
        retention_topics="keep.> = forever",
        dedup_horizon_days=30,
        retention_interval_seconds=0.2,
        retention_batch_size=25,
    )
    registry = CollectorRegistry()
    job = Retention(config, pool, RetentionMetrics(registry))
    stop, stop_sampling = asyncio.Event(), asyncio.Event()
    now = "2999-01-01T00:00:00Z"
    async with running_consumer(settings, js, pool):
        runner = asyncio.create_task(job.run(stop))
        sampler = asyncio.create_task(sample_invariants(pool, stop_sampling))
        for n in range(400):
            await publish(js, settings, "old.a", f"o-{n}", OLD)
        for n in range(50):
            await publish(js, settings, "old.a", f"r-{n}", now)
            await publish(js, settings, "keep.x", f"k-{n}", OLD)

        async def expired(n: int) -> bool:
            return (await totals(pool))["expired"] >= n

        await wait_until(lambda: expired(100), within=30)
        # Copies past the broker's window (no Msg-Id): before, during or after their expiry.
        for n in range(0, 400, 4):
            await publish(js, settings, "old.a", f"o-{n}", OLD, msg_id_header=False)

        async def settled() -> bool:
            t = await totals(pool)
            return t["received"] == 600 and t["expired"] == 400

        await wait_until(settled, within=60)

        # The gauges describe the last whole run; the one that expired the last rows may still
        # be pausing after its last full batch, and a stop now would interrupt it.
        async def reported() -> bool:
            age = registry.get_sample_value(
                "oncelog_retention_oldest_event_age_seconds", {"topic": "keep.x"}
            )
            return age is not None

        await wait_until(reported, within=30)
        stop_sampling.set()
        samples, violations = await sampler
        stop.set()
        await asyncio.wait_for(runner, 10)
    assert violations == []
    assert samples > 10
    t = await assert_invariants(pool)
    assert (t["stored"], t["store_duplicates"], t["expired"]) == (500, 100, 400)
    rows = await pool.fetch("SELECT topic, count(*) AS n FROM events GROUP BY topic ORDER BY 1")
    assert [(r["topic"], r["n"]) for r in rows] == [("keep.x", 50), ("old.a", 50)]
    assert registry.get_sample_value("oncelog_retention_expired_total", {"kind": "events"}) == 400
    assert (registry.get_sample_value("oncelog_retention_last_success_timestamp_seconds") or 0) > 0
    age = registry.get_sample_value(
        "oncelog_retention_oldest_event_age_seconds", {"topic": "keep.x"}
    )
    assert age is not None
    assert age > 5 * 365 * 86400


async def test_only_one_instance_works_at_a_time(
    settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """While another session holds the retention lock, a run stands by and deletes nothing."""
    registry = CollectorRegistry()
    job = Retention(
        retention_settings(settings, retention_days=1), pool, RetentionMetrics(registry)
    )
    async with pool.acquire() as other:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", retention.LOCK)
        assert await job.run_once() is None
        await other.execute("SELECT pg_advisory_unlock($1)", retention.LOCK)
    assert await job.run_once() is not None
    assert registry.get_sample_value("oncelog_retention_runs_total", {"result": "standby"}) == 1
    assert registry.get_sample_value("oncelog_retention_runs_total", {"result": "ok"}) == 1


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"RETENTION_DAYS": "0"}, "RETENTION_DAYS"),
        ({"RETENTION_DAYS": "-3"}, "RETENTION_DAYS"),
        ({"RETENTION_DAYS": "٣"}, "RETENTION_DAYS"),
        ({"RETENTION_DAYS": "99999999"}, "RETENTION_DAYS"),
        ({"DEAD_LETTER_RETENTION_DAYS": "1.5"}, "DEAD_LETTER_RETENTION_DAYS"),
        ({"RETENTION_TOPICS": "auth.> = 90"}, "RETENTION_TOPICS"),
        ({"RETENTION_TOPICS": "auth.>> = 9d"}, "RETENTION_TOPICS"),
        ({"RETENTION_TOPICS": "auth.> = 9d, auth.x = 3d"}, "RETENTION_TOPICS"),
        ({"RETENTION_TOPICS": "a = 9d,"}, "RETENTION_TOPICS"),
        ({"RETENTION_DAYS": "30", "DEDUP_HORIZON_DAYS": "7"}, "DEDUP_HORIZON_DAYS"),
        ({"RETENTION_TOPICS": "a.> = 90d", "DEDUP_HORIZON_DAYS": "30"}, "DEDUP_HORIZON_DAYS"),
    ],
)
def test_hostile_settings_are_refused_naming_the_variable(
    environ: dict[str, str], named: str
) -> None:
    """A value retention cannot use is a SettingsError that names its variable."""
    with pytest.raises(SettingsError, match=named):
        load(RetentionSettings, environ)
