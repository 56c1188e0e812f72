"""Subjects, topics and broker message ids: how an event's identity maps onto NATS."""

from __future__ import annotations

import re

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_TOKEN_LEN",
    "TOPIC_PATTERN",
    "msg_id",
    "subject_for",
    "topic_error",
    "topic_from_subject",
]

DEFAULT_PREFIX = "events"
MAX_TOKEN_LEN = 255
TOPIC_PATTERN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
_TOPIC_RE = re.compile(TOPIC_PATTERN)


def topic_error(topic: str) -> str | None:
    """Return why `topic` is not a valid topic, or None when it is."""
    if not topic:
        return "topic must not be empty"
    if len(topic) > MAX_TOKEN_LEN:
        return f"topic is {len(topic)} characters long, the limit is {MAX_TOKEN_LEN}"
    if _TOPIC_RE.fullmatch(topic) is None:
        return (
            f"topic {topic[:80]!r} must be dot-separated tokens of letters, digits, '_' and '-'"
            " (no wildcards, no empty tokens)"
        )
    return None


def subject_for(topic: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Return the NATS subject that carries events of `topic`."""
    return f"{prefix}.{topic}"


def topic_from_subject(subject: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """Return the topic part of `subject`, or None when it is not under `prefix`."""
    head = prefix + "."
    if not subject.startswith(head) or len(subject) == len(head):
        return None
    return subject[len(head) :]


def msg_id(topic: str, event_id: str) -> str:
    """Return the `Nats-Msg-Id` of an event.

    JetStream's duplicate window is per stream, not per subject, so the id carries the topic.
    """
    return f"{topic}:{event_id}"
