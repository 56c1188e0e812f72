"""Run the retention service: load settings, connect, expire on schedule, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from prometheus_client import CollectorRegistry, start_http_server

from oncelog.platform import db, log
from oncelog.platform.settings import SettingsError, load
from oncelog.platform.shutdown import shutdown_event
from oncelog.retention.job import Retention
from oncelog.retention.metrics import RetentionMetrics
from oncelog.retention.settings import RetentionSettings, environ
from oncelog.store import schema

_log = logging.getLogger("oncelog.retention")


async def serve(settings: RetentionSettings) -> None:
    """Expire on schedule until SIGINT or SIGTERM."""
    stop = shutdown_event()
    pool = await db.create_pool(settings, "oncelog-retention")
    try:
        async with pool.acquire() as conn:
            # Reads alone when the schema is current, as this least-privileged role needs.
            await schema.migrate(conn)
        registry = CollectorRegistry()
        job = Retention(settings, pool, RetentionMetrics(registry, settings.topic_label_cap))
        server, thread = start_http_server(settings.metrics_port, settings.metrics_host, registry)
        _log.info(
            "retention running",
            extra={
                "interval_seconds": settings.retention_interval_seconds,
                "retention_days": settings.retention_days,
                "retention_topics": settings.retention_topics,
                "dedup_horizon_days": settings.dedup_horizon_days,
                "metrics_port": settings.metrics_port,
            },
        )
        try:
            await job.run(stop)
        finally:
            server.shutdown()
            thread.join()
    finally:
        await pool.close()
    _log.info("retention stopped")


def main() -> None:
    """Entry point of `python -m oncelog.retention`."""
    try:
        settings = load(RetentionSettings, environ(os.environ))
    except SettingsError as exc:
        sys.exit(str(exc))
    log.setup(settings.log_level, "retention")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
