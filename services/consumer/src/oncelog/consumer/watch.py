"""The consumer's watcher: the durable's lag, the stream's fill, the dependencies, the pool."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
from nats.js import JetStreamContext

from oncelog.consumer.metrics import ConsumerMetrics
from oncelog.consumer.settings import ConsumerSettings

__all__ = ["INTERVAL_SECONDS", "watch"]

# How often the gauges are refreshed.
INTERVAL_SECONDS = 5.0


async def watch(
    settings: ConsumerSettings,
    js: JetStreamContext,
    pool: asyncpg.Pool,
    metrics: ConsumerMetrics,
    stop: asyncio.Event,
) -> None:
    """Every few seconds until `stop` is set, export what the broker and PostgreSQL report."""
    probe: asyncpg.Connection | None = None
    try:
        while not stop.is_set():
            await _broker(settings, js, metrics)
            probe = await _postgres(settings, probe, metrics)
            size = pool.get_size()
            idle = pool.get_idle_size()
            metrics.pool_connections.labels("in_use").set(size - idle)
            metrics.pool_connections.labels("idle").set(idle)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), INTERVAL_SECONDS)
    finally:
        if probe is not None:
            probe.terminate()


async def _broker(settings: ConsumerSettings, js: JetStreamContext, m: ConsumerMetrics) -> None:
    try:
        info = await js.consumer_info(settings.stream, settings.durable, timeout=2)
        stream = await js.stream_info(settings.stream)
    except Exception:  # any failure of the check means "unreachable" for the gauge
        m.dependency_up.labels("nats").set(0)
        return
    m.dependency_up.labels("nats").set(1)
    m.pending.set(info.num_pending or 0)
    m.ack_pending.set(info.num_ack_pending or 0)
    m.redelivered_pending.set(info.num_redelivered or 0)
    m.stream_messages.set(stream.state.messages)
    m.stream_bytes.set(stream.state.bytes)
    m.stream_max_bytes.set(stream.config.max_bytes or 0)


async def _postgres(
    settings: ConsumerSettings, probe: asyncpg.Connection | None, m: ConsumerMetrics
) -> asyncpg.Connection | None:
    """Probe PostgreSQL; return the probe connection to use next time (None after a failure)."""
    # A connection of its own, not one from the pool: a probe that times out while PostgreSQL
    # is away must never hold (or leak) a connection the commit workers need.
    try:
        if probe is None or probe.is_closed():
            probe = await asyncpg.connect(settings.database_url, timeout=3)
        await probe.fetchval("SELECT 1", timeout=2)
    except Exception:  # likewise
        m.dependency_up.labels("postgres").set(0)
        if probe is not None:
            probe.terminate()
        return None
    m.dependency_up.labels("postgres").set(1)
    return probe
