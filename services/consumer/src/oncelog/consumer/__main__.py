"""Run one consumer replica: load settings, connect, migrate, consume, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys

import nats.errors
from nats.aio.client import Client
from prometheus_client import CollectorRegistry, start_http_server

from oncelog.consumer.loop import Consumer
from oncelog.consumer.metrics import ConsumerMetrics
from oncelog.consumer.settings import ConsumerSettings
from oncelog.platform import broker, db, log
from oncelog.platform.settings import SettingsError, load
from oncelog.platform.shutdown import shutdown_event
from oncelog.store import schema, stats

_log = logging.getLogger("oncelog.consumer")


async def _close(nc: Client) -> None:
    """Drain the NATS connection when it is up, else close it; unacked messages are redelivered."""
    if nc.is_connected:
        try:
            await nc.drain()
        except (nats.errors.Error, OSError) as exc:
            # The broker went away while draining.
            reason = repr(exc)
        else:
            return
    else:
        # nats-py refuses to drain a connection that is reconnecting (it raises); there is
        # nothing to drain into anyway.
        reason = "disconnected"
    # Nothing uncommitted was acked, so closing loses nothing: the durable redelivers the
    # messages this replica held after ack_wait, to it or to another replica.
    _log.warning(
        "nats unreachable while stopping; closing without draining, unacked messages will be"
        " redelivered",
        extra={"reason": reason},
    )
    if not nc.is_closed:
        # While reconnecting, nats-py flushes what it buffered (the last acks and NAKs) into the
        # lost socket and raises; the connection is closed all the same: its tasks are
        # cancelled and it never reconnects.
        with contextlib.suppress(OSError):
            await nc.close()


async def serve(settings: ConsumerSettings) -> None:
    """Consume until SIGINT or SIGTERM, then drain."""
    stop = shutdown_event()
    consumer_id = settings.consumer_id or f"{socket.gethostname()}-{os.getpid()}"
    pool = await db.create_pool(settings, f"oncelog-consumer {consumer_id}")
    try:
        async with pool.acquire() as conn:
            await schema.check_durable(conn, allow_unsafe=settings.allow_unsafe_postgres)
            await schema.migrate(conn)
        nc = await broker.connect(settings, f"oncelog-consumer {consumer_id}")
        try:
            js = nc.jetstream()
            await broker.ensure_stream(js, settings)
            await broker.ensure_consumer(js, settings)
            registry = CollectorRegistry()
            consumer = Consumer(
                settings,
                nc,
                pool,
                ConsumerMetrics(registry, settings.topic_label_cap),
                stats.shard_for(consumer_id),
            )
            server, thread = start_http_server(
                settings.metrics_port, settings.metrics_host, registry
            )
            _log.info(
                "consuming",
                extra={
                    "stream": settings.stream,
                    "durable": settings.durable,
                    "metrics_port": settings.metrics_port,
                },
            )
            try:
                await consumer.run(stop)
            finally:
                server.shutdown()
                thread.join()
        finally:
            await _close(nc)
    finally:
        await pool.close()
    _log.info("consumer stopped")


def main() -> None:
    """Entry point of `python -m oncelog.consumer`."""
    try:
        settings = load(ConsumerSettings)
    except SettingsError as exc:
        sys.exit(str(exc))
    log.setup(settings.log_level, "consumer")
    try:
        asyncio.run(serve(settings))
    except schema.UnsafePostgresError as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
