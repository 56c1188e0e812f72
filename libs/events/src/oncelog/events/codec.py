"""Turning NATS messages into events (or precise rejections) and events into bytes."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Final

import msgspec

from oncelog.events.schema import Event, IncomingEvent
from oncelog.events.subjects import DEFAULT_PREFIX, topic_error, topic_from_subject
from oncelog.events.validate import Problem, decode_event, event_problems, to_utc

__all__ = [
    "DEFAULT_SOURCE",
    "MAX_EVENT_BYTES",
    "REJECTION_CODES",
    "Decoded",
    "Rejected",
    "decode_message",
    "encode_event",
    "from_ns",
]

DEFAULT_SOURCE: Final = "nats"
REJECTION_CODES: Final = (
    "bad_subject",
    "too_large",
    "empty",
    "not_json",
    "too_deep",
    "invalid_event",
    "topic_mismatch",
    "payload_not_object",
    "bad_timestamp",
    "unstorable",
    "store_refused",
)
MAX_EVENT_BYTES: Final = 1024 * 1024

_encoder = msgspec.json.Encoder()


class Decoded(msgspec.Struct, frozen=True):
    """A message that became a valid event; `payload` is its JSON object, still encoded."""

    topic: str
    event_id: str
    timestamp: datetime
    source: str
    payload: bytes


class Rejected(msgspec.Struct, frozen=True):
    """A message that cannot become an event: the reason in words, and a short code from a
    fixed set (see REJECTION_CODES) that metrics can use as a label."""

    reason: str
    code: str = "invalid_event"


@functools.lru_cache(maxsize=4096)
def _subject_topic(subject: str, prefix: str) -> str | Rejected:
    """Return the valid topic a subject carries; cached, since a stream repeats its subjects."""
    topic = topic_from_subject(subject, prefix)
    if topic is None:
        return Rejected(f"subject {subject!r} is not under {prefix}.>", "bad_subject")
    if (bad := topic_error(topic)) is not None:
        return Rejected(f"subject {subject!r}: {bad}", "bad_subject")
    return topic


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def from_ns(ns: int) -> datetime:
    """Return nanoseconds since the epoch (JetStream's timestamps) as a UTC datetime, to the µs."""
    return _EPOCH + timedelta(microseconds=ns // 1000)


def decode_message(
    subject: str,
    data: bytes,
    received_at: datetime | int,
    prefix: str = DEFAULT_PREFIX,
    max_bytes: int = MAX_EVENT_BYTES,
) -> Decoded | Rejected:
    """Decode one message of the NATS path into an event, or say exactly why it is not one.

    `received_at` is the broker's receive time, as a datetime or in nanoseconds since the epoch;
    it becomes the timestamp of an event that carries none. The rules are the validator's
    (`oncelog.events.validate`), the same that the HTTP gateway applies.
    """
    topic = _subject_topic(subject, prefix)
    if isinstance(topic, Rejected):
        return topic
    if len(data) > max_bytes:
        return Rejected(f"message is {len(data)} bytes, the limit is {max_bytes}", "too_large")
    if not data.strip():
        return Rejected("empty body: expected a JSON object with at least event_id", "empty")
    body = decode_event(data)
    if isinstance(body, Problem):
        if body.code == "invalid_event":
            return Rejected(f"invalid event: {body.message} (at {body.field})", body.code)
        return Rejected(body.message, body.code)
    if body.topic is not None and body.topic != topic:
        return Rejected(
            f"topic {body.topic!r} in the body disagrees with subject topic {topic!r}",
            "topic_mismatch",
        )
    problems = event_problems(body)
    if problems:
        first = problems[0]
        return Rejected(f"{first.field}: {first.message}", first.code)
    if body.timestamp is not None:
        timestamp = to_utc(body.timestamp)
    elif isinstance(received_at, int):
        timestamp = from_ns(received_at)
    else:
        timestamp = received_at
    return Decoded(
        topic=topic,
        event_id=body.event_id,
        timestamp=timestamp,
        source=body.source if body.source is not None else DEFAULT_SOURCE,
        payload=bytes(body.payload),
    )


def encode_event(event: Event | IncomingEvent) -> bytes:
    """Encode an event as the JSON body publishers send."""
    return _encoder.encode(event)
