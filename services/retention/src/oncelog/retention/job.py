"""The retention job: one visible loop that expires old rows in bounded batches, one worker at
a time across instances."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec

from oncelog.retention.metrics import RetentionMetrics
from oncelog.retention.settings import RetentionSettings
from oncelog.store import retention
from oncelog.store.schema import Conn

__all__ = ["Report", "Retention"]

_log = logging.getLogger("oncelog.retention")


class Report(msgspec.Struct, kw_only=True):
    """What one run deleted."""

    events: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    dedup_keys: int = 0
    # The run stopped early, because shutdown was asked for.
    interrupted: bool = False


class Retention:
    """Runs the retention policy every RETENTION_INTERVAL_SECONDS until stopped."""

    def __init__(
        self,
        settings: RetentionSettings,
        pool: asyncpg.Pool,
        metrics: RetentionMetrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.clock = clock
        self.rules = settings.rules()
        metrics.interval.set(settings.retention_interval_seconds)
        # When the batch now running began: the pause after it keeps the duty cycle.
        self._batch_started = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        """Run now, then every interval, until `stop` is set; a failed run is logged and retried."""
        while not stop.is_set():
            try:
                await self.run_once(stop)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.metrics.runs.labels("failed").inc()
                _log.warning("retention run failed; retrying at the next interval", exc_info=exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.retention_interval_seconds)

    async def run_once(self, stop: asyncio.Event | None = None) -> Report | None:
        """Run the policy once; None when another instance holds the lock (this one stands by)."""
        stop = stop or asyncio.Event()
        started = time.monotonic()
        async with self.pool.acquire() as conn:
            # A session lock: it ends with the session, so a killed worker frees it at once.
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", retention.LOCK):
                self.metrics.runs.labels("standby").inc()
                _log.info("another instance is running retention; standing by")
                return None
            try:
                report = await self._work(conn, stop)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", retention.LOCK)
        if not report.interrupted:
            self.metrics.runs.labels("ok").inc()
            self.metrics.last_success.set(time.time())
            self.metrics.last_duration.set(time.monotonic() - started)
        _log.info("retention run", extra=msgspec.structs.asdict(report))
        return report

    async def _pause(self, stop: asyncio.Event) -> bool:
        """Wait between two batches; whether to go on.

        The wait keeps the job to RETENTION_DUTY_CYCLE of the time it runs (a batch that took
        0.2 s is followed by 0.6 s of rest at 0.25), and is at least RETENTION_PAUSE_SECONDS:
        the store's CPU and disk are left to ingestion, which a backlog of expiring rows would
        otherwise compete with for as long as it lasts.
        """
        s = self.settings
        worked = time.monotonic() - self._batch_started
        wait = max(s.retention_pause_seconds, worked * (1 / s.retention_duty_cycle - 1))
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
        self._batch_started = time.monotonic()
        return not stop.is_set()

    async def _work(self, conn: Conn, stop: asyncio.Event) -> Report:
        s = self.settings
        self._batch_started = time.monotonic()
        now = self.clock()
        report = Report()
        limit = s.retention_batch_size
        horizon = None if s.dedup_horizon_days is None else now - timedelta(s.dedup_horizon_days)
        topics = await retention.topics_by_rule(conn, [rule.pattern for rule in self.rules])
        for topic, index in topics.items():
            days = s.retention_days if index < 0 else self.rules[index].days
            if days is None:
                continue
            before = now - timedelta(days)
            while True:
                n, _ = await retention.expire_events(
                    conn, topic, before, limit=limit, keep_keys_since=horizon
                )
                report.events += n
                self.metrics.expired.labels("events").inc(n)
                if n < limit:
                    break
                if not await self._pause(stop):
                    report.interrupted = True
                    return report
        for days, kind, expire in (
            (s.dead_letter_retention_days, "dead_letters", retention.expire_dead_letters),
            (s.duplicates_retention_days, "duplicates", retention.expire_duplicates),
        ):
            more = days is not None
            while more and days is not None:
                n, more = await expire(conn, now - timedelta(days), limit=limit)
                setattr(report, kind, getattr(report, kind) + n)
                self.metrics.expired.labels(kind).inc(n)
                if more and not await self._pause(stop):
                    report.interrupted = True
                    return report
        while horizon is not None:
            n = await retention.prune_keys(conn, horizon, limit=limit)
            report.dedup_keys += n
            self.metrics.expired.labels("dedup_keys").inc(n)
            if n < limit:
                break
            if not await self._pause(stop):
                report.interrupted = True
                return report
        oldest = await retention.oldest_events(conn, list(topics))
        at = self.clock()
        self.metrics.set_oldest({t: (at - ts).total_seconds() for t, ts in oldest.items()})
        return report
