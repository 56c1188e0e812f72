"""HTTP bodies into events ready to publish: the three body shapes, and an error per bad field."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import msgspec

from oncelog.api.schemas import FieldError
from oncelog.events import IncomingEvent, encode_event, msg_id, payload_error, subject_for, utc

__all__ = ["HTTP_SOURCE", "MAX_FIELD_ERRORS", "BodyError", "Outgoing", "prepare", "prepare_one"]

# The source of an event posted over HTTP without one, as "nats" is on the NATS path.
HTTP_SOURCE = "http"
# An error body names at most this many fields, so one huge bad batch cannot make a huge answer.
MAX_FIELD_ERRORS = 100

_top = msgspec.json.Decoder(list[msgspec.Raw] | dict[str, msgspec.Raw])
_items = msgspec.json.Decoder(list[msgspec.Raw])
_event = msgspec.json.Decoder(IncomingEvent)
_any = msgspec.json.Decoder()
_MISSING = re.compile(r"^Object missing required field `(?P<name>.+)`$")
_SHAPES = 'expected an event object, a JSON array of events, or {"events": [...]}'


class BodyError(ValueError):
    """A body with invalid events; `errors` names each field at fault."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__(f"{len(errors)} invalid field(s)")
        self.errors = errors


class Outgoing(msgspec.Struct, frozen=True):
    """One validated event, encoded, with its subject and broker dedup id."""

    topic: str
    event_id: str
    subject: str
    msg_id: str
    body: bytes


def _locate(prefix: str, exc: msgspec.ValidationError) -> FieldError:
    text = str(exc)
    message, sep, path = text.rpartition(" - at `$")
    if not sep:
        message, path = text, ""
    path = path.rstrip("`")
    if (missing := _MISSING.match(message)) is not None:
        path += "." + missing["name"]
    return FieldError(field=(prefix + path).lstrip(".") or "body", message=message)


def _nul_error(payload: bytes) -> str | None:
    """Return why PostgreSQL would refuse the payload (a NUL character in a string), or None."""
    if b"\\u0000" not in payload:
        return None
    try:
        stack: list[Any] = [_any.decode(payload)]
    except RecursionError:
        return "payload is nested too deeply"
    # Iterative, so a deeply nested payload cannot exhaust the interpreter's stack.
    while stack:
        value = stack.pop()
        if isinstance(value, str) and "\x00" in value:
            return "strings must not contain \\u0000 (PostgreSQL cannot store it)"
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return None


def _one(
    raw: bytes,
    prefix: str,
    *,
    now: datetime,
    subject_prefix: str,
    max_payload: int,
    default_topic: str | None,
    errors: list[FieldError],
) -> Outgoing | None:
    try:
        event = _event.decode(raw)
    except msgspec.ValidationError as exc:
        errors.append(_locate(prefix, exc))
        return None
    except RecursionError:
        errors.append(FieldError(field=prefix or "body", message="JSON is nested too deeply"))
        return None
    where = prefix + "." if prefix else ""
    topic = event.topic if event.topic is not None else default_topic
    bad = len(errors)
    if topic is None:
        errors.append(FieldError(field=where + "topic", message="required over HTTP"))
    payload = bytes(event.payload)
    if (reason := payload_error(payload) or _nul_error(payload)) is not None:
        errors.append(FieldError(field=where + "payload", message=reason))
    timestamp = now
    if event.timestamp is not None:
        try:
            # PostgreSQL stores instants in UTC; one that cannot be expressed there is refused.
            timestamp = utc(event.timestamp).astimezone(UTC)
        except OverflowError:
            errors.append(FieldError(field=where + "timestamp", message="out of range"))
    if len(errors) > bad or topic is None:
        return None
    body = encode_event(
        msgspec.structs.replace(
            event,
            topic=topic,
            timestamp=timestamp,
            source=event.source if event.source is not None else HTTP_SOURCE,
        )
    )
    # The header and subject travel with the body; the broker refuses the whole beyond max_payload.
    size = len(body) + len(topic) + len(event.event_id) + 64
    if size > max_payload:
        errors.append(
            FieldError(
                field=prefix or "body",
                message=f"event is {size} bytes encoded, the broker's limit is {max_payload}",
            )
        )
        return None
    return Outgoing(
        topic=topic,
        event_id=event.event_id,
        subject=subject_for(topic, subject_prefix),
        msg_id=msg_id(topic, event.event_id),
        body=body,
    )


def prepare(raw: bytes, *, now: datetime, subject_prefix: str, max_payload: int) -> list[Outgoing]:
    """Validate a POST /publish body of any of the three shapes; raise BodyError naming every bad field.

    Nothing is published unless every event is valid, so the caller only ever sees all or none.
    """
    if not raw.strip():
        raise BodyError([FieldError(field="body", message="empty body: " + _SHAPES)])
    try:
        top = _top.decode(raw)
    except msgspec.ValidationError:
        raise BodyError([FieldError(field="body", message=_SHAPES)]) from None
    except msgspec.DecodeError as exc:
        raise BodyError([FieldError(field="body", message=f"not valid JSON: {exc}")]) from None
    if isinstance(top, dict) and "events" in top and "event_id" not in top:
        try:
            items = _items.decode(top["events"])
        except msgspec.ValidationError:
            raise BodyError(
                [FieldError(field="events", message="expected an array of events")]
            ) from None
        prefix = "events"
    elif isinstance(top, list):
        items, prefix = top, "events"
    else:
        items, prefix = [msgspec.Raw(raw)], ""
    errors: list[FieldError] = []
    out: list[Outgoing] = []
    for index, item in enumerate(items):
        event = _one(
            bytes(item),
            f"{prefix}[{index}]" if prefix else "",
            now=now,
            subject_prefix=subject_prefix,
            max_payload=max_payload,
            default_topic=None,
            errors=errors,
        )
        if event is not None:
            out.append(event)
    if errors:
        raise BodyError(errors[:MAX_FIELD_ERRORS])
    return out


def prepare_one(
    raw: bytes, *, now: datetime, subject_prefix: str, max_payload: int, default_topic: str | None
) -> Outgoing:
    """Validate a body holding one event object; `topic` may be left to `default_topic`."""
    try:
        top = _top.decode(raw)
    except msgspec.ValidationError:
        top = None
    except msgspec.DecodeError as exc:
        raise BodyError([FieldError(field="body", message=f"not valid JSON: {exc}")]) from None
    if not isinstance(top, dict):
        raise BodyError([FieldError(field="body", message="expected one event object")])
    errors: list[FieldError] = []
    event = _one(
        raw,
        "",
        now=now,
        subject_prefix=subject_prefix,
        max_payload=max_payload,
        default_topic=default_topic,
        errors=errors,
    )
    if event is None:
        raise BodyError(errors[:MAX_FIELD_ERRORS])
    return event
