"""Subjects, topics and broker message ids: how an event's identity maps onto NATS."""

from __future__ import annotations

import base64
import re

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_TOKEN_LEN",
    "TOPIC_PATTERN",
    "dead_letter_topic",
    "msg_id",
    "parse_msg_id",
    "pattern_error",
    "subject_for",
    "topic_error",
    "topic_from_subject",
]

DEFAULT_PREFIX = "events"
MAX_TOKEN_LEN = 255
TOPIC_PATTERN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
_TOPIC_RE = re.compile(TOPIC_PATTERN)
# A topic, or a NATS pattern over topics: '*' for one token, a final '>' for one or more.
_PATTERN_RE = re.compile(r"([A-Za-z0-9_-]+|\*)(\.([A-Za-z0-9_-]+|\*))*(\.>)?|>")


def _plain_id(event_id: str) -> bool:
    """Whether an event id is carried in a Msg-Id as it is: printable ASCII (0x20-0x7e), not
    empty, no space at either end. Both nats-py and the server trim a header value's
    surrounding whitespace, and a line break would end the header, so anything else is carried
    encoded (see `msg_id`)."""
    return (
        event_id.isascii()
        and event_id.isprintable()
        and event_id != ""
        and event_id.strip(" ") == event_id
    )


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


def pattern_error(pattern: str) -> str | None:
    """Return why `pattern` is neither a topic nor a NATS wildcard over topics, or None."""
    if len(pattern) > MAX_TOKEN_LEN or _PATTERN_RE.fullmatch(pattern) is None:
        return (
            "must be a topic or a NATS pattern of tokens [A-Za-z0-9_-], '*' and a final '>'"
            f" (at most {MAX_TOKEN_LEN} characters)"
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


def dead_letter_topic(subject: str) -> str:
    """Return the topic a message that is no event counts against: its subject after the first
    token (the prefix), cut to MAX_TOKEN_LEN; the whole subject when it has a single token.

    It need not be a valid topic: a dead letter's subject may hold any bytes.
    """
    _, _, rest = subject.partition(".")
    return (rest or subject)[:MAX_TOKEN_LEN]


def msg_id(topic: str, event_id: str) -> str:
    """Return the `Nats-Msg-Id` of an event: `<topic>:<event_id>`, or `<topic>~<base64url>`.

    JetStream's duplicate window is per stream, not per subject, so the id carries the topic.
    An event id of printable ASCII with no space at either end (a UUID, say) follows the colon
    as it is; any other id follows a tilde as the unpadded base64url of its UTF-8 bytes, since
    a header cannot carry it unchanged. A topic holds neither ':' nor '~', so the character
    after the topic tells the two forms apart, and the mapping is injective: two different
    (topic, event_id) pairs never share a Msg-Id.
    """
    if _plain_id(event_id):
        return f"{topic}:{event_id}"
    encoded = base64.urlsafe_b64encode(event_id.encode("utf-8", "surrogatepass"))
    return f"{topic}~{encoded.rstrip(b'=').decode()}"


def parse_msg_id(value: str) -> tuple[str, str] | None:
    """Return the (topic, event_id) a Msg-Id of `msg_id`'s form names, or None if none."""
    cut = min((i for i in (value.find(":"), value.find("~")) if i >= 0), default=-1)
    if cut <= 0:
        return None
    topic, form, rest = value[:cut], value[cut], value[cut + 1 :]
    if topic_error(topic) is not None:
        return None
    if form == ":":
        return (topic, rest) if _plain_id(rest) else None
    try:
        raw = base64.urlsafe_b64decode(rest + "=" * (-len(rest) % 4))
        event_id = raw.decode("utf-8", "surrogatepass")
    except ValueError:
        return None
    return (topic, event_id) if msg_id(topic, event_id) == value else None
