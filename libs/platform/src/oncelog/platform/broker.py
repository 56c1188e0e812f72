"""NATS connection and idempotent provisioning of oncelog's streams and durable consumers.

EVENTS (with its durable "aggregator") carries the events. EVENTS_TALLY (durable
"aggregator_tally") carries the HTTP gateway's counts of broker duplicates to PostgreSQL; the
names follow STREAM and DURABLE.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
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
from nats.js.errors import BadRequestError, NotFoundError

from oncelog.platform.settings import BrokerSettings

__all__ = [
    "connect",
    "connect_options",
    "consumer_config",
    "ensure_consumer",
    "ensure_stream",
    "ensure_tally",
    "stream_config",
    "tally_consumer_config",
    "tally_stream_config",
    "tally_subject",
]

_log = logging.getLogger("oncelog.broker")

# JetStream's error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


def connect_options(settings: BrokerSettings) -> dict[str, Any]:
    """Return nats-py's authentication, inbox and TLS options for the configured credentials."""
    options: dict[str, Any] = {}
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
    if settings.nats_token:
        options["token"] = settings.nats_token
    if settings.nats_nkey_seed:
        options["nkeys_seed"] = settings.nats_nkey_seed
    if settings.nats_creds:
        options["user_credentials"] = settings.nats_creds
    if settings.nats_inbox_prefix != "_INBOX":
        # Every inbox nats-py makes (new_inbox, request and JetStream replies, pull
        # subscriptions) starts with this prefix, and auth.conf lets each user subscribe to its
        # own prefix only, so no user can read another's deliveries or replies. nats-py's own
        # default is "_INBOX", so the option is passed only when it differs.
        options["inbox_prefix"] = settings.nats_inbox_prefix
    if settings.nats_tls_ca or settings.nats_tls_cert or settings.nats_url.startswith("tls://"):
        # Verification stays on: with no CA file given, the system's trust store is used.
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=settings.nats_tls_ca or None
        )
        if settings.nats_tls_cert:
            context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key or None)
        options["tls"] = context
    return options


async def connect(
    settings: BrokerSettings,
    name: str,
    on_state: Callable[[str], Awaitable[None]] | None = None,
    **options: Any,
) -> Client:
    """Connect to NATS, reconnecting forever: a broker restart must not end a service."""

    client: list[Client] = []

    async def report(state: str) -> None:
        # A connection the service closes itself (drain at a stop, a one-shot's close) also
        # "disconnects": that is no news for an operator, so it is not a warning.
        closing = bool(client) and (client[0].is_closed or client[0].is_draining)
        level = logging.INFO if closing else logging.WARNING
        _log.log(
            level, "nats %s", "closed" if closing else state, extra={"nats_url": settings.nats_url}
        )
        if on_state is not None:
            await on_state(state)

    async def disconnected() -> None:
        await report("disconnected")

    async def reconnected() -> None:
        await report("reconnected")

    async def error(exc: Exception) -> None:
        _log.warning("nats error: %s", exc)

    nc = await nats.connect(
        # A cluster is given as a comma-separated list, so a replica can start (and reconnect)
        # while any one node is down; nats-py takes a list, not a comma-joined string.
        [url.strip() for url in settings.nats_url.split(",") if url.strip()],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
        **(connect_options(settings) | options),
    )
    client.append(nc)
    return nc


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


def tally_subject(settings: BrokerSettings) -> str:
    """Return the subject of the gateway's duplicate counts: outside every event subject."""
    return f"_ONCELOG.tally.{settings.stream}"


def tally_stream_config(settings: BrokerSettings) -> StreamConfig:
    """Return the stream of the gateway's duplicate counts, shaped like EVENTS.

    A work queue: the API's applier acks a count once PostgreSQL has it. A count is about 100
    bytes per request with duplicates, so a sixteenth of the events' limit outlasts them.
    """
    return StreamConfig(
        name=f"{settings.stream}_TALLY",
        subjects=[tally_subject(settings)],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_bytes=max(settings.stream_max_bytes // 16, 1024**2),
        max_msgs=-1,
        max_age=0,
        duplicate_window=settings.duplicate_window_seconds,
        num_replicas=settings.stream_replicas,
    )


def tally_consumer_config(settings: BrokerSettings) -> ConsumerConfig:
    """Return the durable the API's appliers share on the tally stream."""
    return ConsumerConfig(
        durable_name=f"{settings.durable}_tally",
        name=f"{settings.durable}_tally",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_seconds,
        max_deliver=-1,
        max_ack_pending=10_000,
        max_waiting=512,
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


def _stream_matches(current: StreamConfig, wanted: StreamConfig) -> bool:
    return (
        sorted(current.subjects or []) == sorted(wanted.subjects or [])
        and current.retention == wanted.retention
        and current.storage == wanted.storage
        and current.discard == wanted.discard
        and current.max_bytes == wanted.max_bytes
        and (current.num_replicas or 1) == wanted.num_replicas
        and math.isclose(current.duplicate_window or 0, wanted.duplicate_window or 0)
    )


def _consumer_matches(current: ConsumerConfig, wanted: ConsumerConfig) -> bool:
    return (
        current.ack_policy == wanted.ack_policy
        and current.max_deliver == wanted.max_deliver
        and current.max_ack_pending == wanted.max_ack_pending
        and current.max_waiting == wanted.max_waiting
        and math.isclose(current.ack_wait or 0, wanted.ack_wait or 0)
    )


async def ensure_stream(js: JetStreamContext, settings: BrokerSettings) -> StreamInfo:
    """Create the EVENTS stream, or bring an existing one to the configured limits.

    A least-privileged service may not create or update streams: when the stream exists but
    the change is refused (the server drops the request, so it times out), the existing stream
    is used as it is and the difference is logged for the operator.
    """
    return await _ensure_stream(js, stream_config(settings))


async def ensure_consumer(js: JetStreamContext, settings: BrokerSettings) -> ConsumerInfo:
    """Create the durable consumer, or update it to the configured settings.

    As with the stream, a service that may not change the durable uses it as provisioned.
    """
    return await _ensure_consumer(js, settings.stream, consumer_config(settings))


async def ensure_tally(js: JetStreamContext, settings: BrokerSettings) -> ConsumerInfo:
    """Create or update the tally stream and its durable, as ensure_stream and ensure_consumer."""
    stream = tally_stream_config(settings)
    await _ensure_stream(js, stream)
    assert stream.name is not None
    return await _ensure_consumer(js, stream.name, tally_consumer_config(settings))


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    name = config.name
    assert name is not None
    try:
        current: StreamInfo | None = await js.stream_info(name)
    except NotFoundError:
        current = None
    if current is not None and _stream_matches(current.config, config):
        return current
    try:
        try:
            return await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
        _log.info("updating stream %s to the configured limits", name)
        return await js.update_stream(config)
    except nats.errors.TimeoutError:
        if current is None:
            raise
        _log.warning("not allowed to update stream %s; using it as provisioned", name)
        return current


async def _ensure_consumer(
    js: JetStreamContext, stream: str, config: ConsumerConfig
) -> ConsumerInfo:
    durable = config.durable_name
    assert durable is not None
    try:
        current: ConsumerInfo | None = await js.consumer_info(stream, durable)
    except NotFoundError:
        current = None
    if current is not None and _consumer_matches(current.config, config):
        return current
    try:
        return await js.add_consumer(stream, config)
    except nats.errors.TimeoutError:
        if current is None:
            raise
        _log.warning("not allowed to update consumer %s; using it as provisioned", durable)
        return current
