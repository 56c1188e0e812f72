"""NATS connection and idempotent provisioning of the EVENTS stream and its durable consumer."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError

from oncelog.platform.settings import BrokerSettings

__all__ = ["connect", "consumer_config", "ensure_consumer", "ensure_stream", "stream_config"]

_log = logging.getLogger("oncelog.broker")

# JetStream's error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


async def connect(
    settings: BrokerSettings,
    name: str,
    on_state: Callable[[str], Awaitable[None]] | None = None,
    **options: Any,
) -> Client:
    """Connect to NATS, reconnecting forever: a broker restart must not end a service."""

    async def report(state: str) -> None:
        _log.warning("nats %s", state, extra={"nats_url": settings.nats_url})
        if on_state is not None:
            await on_state(state)

    async def disconnected() -> None:
        await report("disconnected")

    async def reconnected() -> None:
        await report("reconnected")

    async def error(exc: Exception) -> None:
        _log.warning("nats error: %s", exc)

    return await nats.connect(
        settings.nats_url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
        **options,
    )


def stream_config(settings: BrokerSettings) -> StreamConfig:
    """Return the EVENTS stream's configuration.

    Work-queue retention removes a message once the durable acks it, and discard=new with no
    age limit makes a full stream refuse publishes instead of evicting unconsumed events.
    """
    return StreamConfig(
        name=settings.stream,
        subjects=[f"{settings.subject_prefix}.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_bytes=settings.stream_max_bytes,
        max_msgs=-1,
        max_age=0,
        duplicate_window=settings.duplicate_window_seconds,
        num_replicas=settings.stream_replicas,
    )


def consumer_config(settings: BrokerSettings) -> ConsumerConfig:
    """Return the durable pull consumer's configuration; valid events are never given up on."""
    return ConsumerConfig(
        durable_name=settings.durable,
        name=settings.durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_seconds,
        max_deliver=-1,
        max_ack_pending=settings.max_ack_pending,
        max_waiting=512,
    )


async def ensure_stream(js: JetStreamContext, settings: BrokerSettings) -> StreamInfo:
    """Create the stream, or bring an existing one to the configured limits."""
    config = stream_config(settings)
    try:
        return await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise
    _log.info("updating stream %s to the configured limits", settings.stream)
    return await js.update_stream(config)


async def ensure_consumer(js: JetStreamContext, settings: BrokerSettings) -> ConsumerInfo:
    """Create the durable consumer, or update it to the configured settings."""
    return await js.add_consumer(settings.stream, consumer_config(settings))
