"""The event schema: one frozen msgspec Struct for stored events and the bodies that carry them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from oncelog.events.subjects import MAX_TOKEN_LEN, TOPIC_PATTERN

__all__ = ["Event", "EventId", "IncomingEvent", "Source", "Topic"]

Topic = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_TOKEN_LEN,
        pattern=TOPIC_PATTERN,
        description="Dot-separated tokens of [A-Za-z0-9_-], e.g. service.auth.prod.login",
        examples=["auth.prod"],
    ),
]
EventId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_TOKEN_LEN,
        description="Unique per topic; a UUIDv4 is recommended",
        examples=["e-1"],
    ),
]
Source = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOKEN_LEN, examples=["cli"])]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """An event as oncelog stores and serves it."""

    topic: Topic
    event_id: EventId
    timestamp: datetime
    source: Source
    payload: dict[str, Any] = msgspec.field(default_factory=dict)


class IncomingEvent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """An event as publishers send it; the optional fields get their defaults on the way in.

    On the NATS path `topic` comes from the subject, `timestamp` from the broker's receive time
    and `source` is "nats" when absent. Over HTTP `topic` is required and `timestamp` defaults
    to the gateway's clock.
    """

    event_id: EventId
    topic: Topic | None = None
    timestamp: datetime | None = None
    source: Source | None = None
    payload: msgspec.Raw = msgspec.Raw(b"{}")
