"""The API's response and request bodies, as msgspec Structs that feed the OpenAPI schema."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

__all__ = [
    "ErrorBody",
    "FieldError",
    "Health",
    "Readiness",
    "Stats",
    "StoredEvent",
    "TopicStats",
]


class StoredEvent(msgspec.Struct, kw_only=True):
    """An event as stored."""

    topic: str
    event_id: str
    timestamp: datetime
    source: str
    payload: dict[str, Any]


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
    first_timestamp: datetime | None
    last_timestamp: datetime | None


class Stats(msgspec.Struct, kw_only=True):
    """Exact, persistent statistics; received == unique_processed + duplicate_dropped + dead_lettered."""

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
    per_topic: dict[str, TopicStats]
