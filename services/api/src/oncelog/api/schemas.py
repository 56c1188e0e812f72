"""The API's response and request bodies, as msgspec Structs that feed the OpenAPI schema."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from oncelog.events import Event

__all__ = [
    "ConsumerState",
    "DeadLetter",
    "DuplicatesByLayer",
    "ErrorBody",
    "EventDetail",
    "FieldError",
    "Health",
    "Provenance",
    "PublishResult",
    "QueueStats",
    "Readiness",
    "ReplayResult",
    "Stats",
    "StreamState",
    "TopicInfo",
    "TopicStats",
]


class FieldError(msgspec.Struct, kw_only=True):
    """One invalid field: where it is and what is wrong with it."""

    field: str
    message: str


class ErrorBody(msgspec.Struct, kw_only=True):
    """The one shape of every error response."""

    status_code: int
    detail: str
    errors: list[FieldError] = msgspec.field(default_factory=list)


class Health(msgspec.Struct, kw_only=True):
    """Liveness."""

    status: str


class Readiness(msgspec.Struct, kw_only=True):
    """Whether the API can reach what it depends on."""

    status: str
    nats: str
    postgres: str


class DuplicatesByLayer(msgspec.Struct, kw_only=True):
    """Duplicates dropped, by the layer that dropped them."""

    broker: int
    store: int


class TopicStats(msgspec.Struct, kw_only=True):
    """Counters of one topic."""

    received: int
    unique_processed: int
    duplicate_dropped: int
    duplicates_by_layer: DuplicatesByLayer
    dead_lettered: int
    redelivered: int
    conflicting_duplicates: int
    # Events and dead letters deleted by retention: stored rows == unique_processed - expired.
    expired: int
    dead_letters_expired: int
    first_timestamp: datetime | None
    last_timestamp: datetime | None


class Stats(msgspec.Struct, kw_only=True):
    """Exact, persistent statistics; received == unique_processed + duplicate_dropped + dead_lettered.

    unique_processed counts every event ever stored; the events table holds unique_processed -
    expired of them.
    """

    received: int
    unique_processed: int
    duplicate_dropped: int
    dedup_rate_percent: float
    topics: list[str]
    topic_count: int
    uptime_seconds: float
    duplicates_by_layer: DuplicatesByLayer
    dead_lettered: int
    redelivered: int
    conflicting_duplicates: int
    expired: int
    dead_letters_expired: int
    per_topic: dict[str, TopicStats]


class TopicInfo(TopicStats, kw_only=True):
    """One topic with its counters and the time range of its events."""

    topic: str
    last_stored_at: datetime | None


class Provenance(msgspec.Struct, kw_only=True):
    """Where a stored event came from and what happened to its copies."""

    stream_seq: int
    received_at: datetime
    first_stored_at: datetime
    store_duplicates: int
    last_duplicate_at: datetime | None


class EventDetail(msgspec.Struct, kw_only=True):
    """One stored event with its provenance."""

    event: Event
    provenance: Provenance


class PublishResult(msgspec.Struct, kw_only=True):
    """What POST /publish made durable: every accepted event is in the stream."""

    accepted: int
    duplicates: int
    published: int


class DeadLetter(msgspec.Struct, kw_only=True):
    """A message that could not become an event, with the reason."""

    id: int
    stream_seq: int | None
    subject: str
    topic: str
    headers: dict[str, Any]
    reason: str
    raw: bytes
    raw_size: int
    truncated: bool
    text: str | None
    received_at: datetime
    dead_at: datetime
    replayed_at: datetime | None


class ReplayResult(msgspec.Struct, kw_only=True):
    """A dead letter published again as an event."""

    dead_letter_id: int
    topic: str
    event_id: str
    stream_seq: int
    duplicate: bool
    replayed_at: datetime


class StreamState(msgspec.Struct, kw_only=True):
    """The JetStream stream holding events not yet stored."""

    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumer_count: int
    max_bytes: int


class ConsumerState(msgspec.Struct, kw_only=True):
    """The durable consumer that stores events."""

    name: str
    pending: int
    ack_pending: int
    redelivered: int
    waiting: int
    last_delivered_at: datetime | None
    last_acked_at: datetime | None


class QueueStats(msgspec.Struct, kw_only=True):
    """Broker-side state: what waits in the stream and how far the consumer is."""

    stream: StreamState
    consumer: ConsumerState | None
