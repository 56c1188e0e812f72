"""HTTP bodies into events ready to publish: the three body shapes, and an error per bad field."""

from __future__ import annotations

from datetime import datetime

import msgspec

from oncelog.api.schemas import FieldError
from oncelog.events import (
    IncomingEvent,
    Problem,
    decode_event,
    decode_problem,
    encode_event,
    event_problems,
    msg_id,
    subject_for,
    to_utc,
)
from oncelog.platform.publish import Outbound

__all__ = ["HTTP_SOURCE", "MAX_FIELD_ERRORS", "BodyError", "prepare", "prepare_one"]

# The source of an event posted over HTTP without one, as "nats" is on the NATS path.
HTTP_SOURCE = "http"
# An error body names at most this many fields, so one huge bad batch cannot make a huge answer.
MAX_FIELD_ERRORS = 100

_top = msgspec.json.Decoder(list[msgspec.Raw] | dict[str, msgspec.Raw])
_items = msgspec.json.Decoder(list[msgspec.Raw])


class _Batch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """{"events": [...]} with no other member; one that has others takes the general path."""

    events: list[IncomingEvent]


_batch = msgspec.json.Decoder(_Batch)
_event_list = msgspec.json.Decoder(list[IncomingEvent])
_SHAPES = 'expected an event object, a JSON array of events, or {"events": [...]}'


class BodyError(ValueError):
    """A body with invalid events; `errors` names each field at fault."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__(f"{len(errors)} invalid field(s)")
        self.errors = errors


def _one(
    raw: bytes,
    prefix: str,
    *,
    now: datetime,
    subject_prefix: str,
    max_payload: int,
    default_topic: str | None,
    errors: list[FieldError],
) -> Outbound | None:
    where = prefix + "." if prefix else ""
    event = decode_event(raw)
    if isinstance(event, Problem):
        field = where + event.field if event.field != "body" else (prefix or "body")
        errors.append(FieldError(field=field, message=event.message))
        return None
    topic = event.topic if event.topic is not None else default_topic
    problems = event_problems(event)
    for problem in problems:
        errors.append(FieldError(field=where + problem.field, message=problem.message))
    if topic is None:
        errors.append(FieldError(field=where + "topic", message="required over HTTP"))
    if problems or topic is None:
        return None
    out = _outbound(event, topic, now, subject_prefix)
    if (size := _size(out)) > max_payload:
        errors.append(
            FieldError(
                field=prefix or "body",
                message=f"event is {size} bytes encoded, the broker's limit is {max_payload}",
            )
        )
        return None
    return out


def _outbound(event: IncomingEvent, topic: str, now: datetime, subject_prefix: str) -> Outbound:
    """The message that carries a valid event, with the defaults of the HTTP path filled in."""
    body = encode_event(
        msgspec.structs.replace(
            event,
            topic=topic,
            # Sent in UTC, so the consumer decodes exactly the instant validated here.
            timestamp=now if event.timestamp is None else to_utc(event.timestamp),
            source=event.source if event.source is not None else HTTP_SOURCE,
        )
    )
    return Outbound(
        subject_for(topic, subject_prefix),
        body,
        msg_id(topic, event.event_id),
        topic,
        event.event_id,
    )


def _size(message: Outbound) -> int:
    """What an event costs of the broker's max_payload: the header and subject travel with it."""
    return len(message.body) + len(message.topic) + len(message.msg_id) + 64


def _valid_batch(
    raw: bytes, *, now: datetime, subject_prefix: str, max_payload: int
) -> list[Outbound] | None:
    """The messages of a batch body whose every event is valid, decoded in one pass; else None.

    An array of events or {"events": [...]} and nothing else; any other body, and any batch with
    one bad event, is left to the event-by-event path, which names every field at fault. Both
    apply the same rules, so what this returns is what that path would have returned.
    """
    try:
        events = (_event_list if raw.lstrip()[:1] == b"[" else _batch).decode(raw)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None
    if isinstance(events, _Batch):
        events = events.events
    out: list[Outbound] = []
    for event in events:
        if event.topic is None or event_problems(event):
            return None
        message = _outbound(event, event.topic, now, subject_prefix)
        if _size(message) > max_payload:
            return None
        out.append(message)
    return out


def _outer(raw: bytes, field: str, shapes: str) -> list[msgspec.Raw] | dict[str, msgspec.Raw]:
    """Split a body (or its `events` member) into raw events, or raise BodyError saying why."""
    decoder = _top if field == "body" else _items
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError:
        message = shapes
    except msgspec.DecodeError as exc:
        message = decode_problem(raw, exc)
    except RecursionError:
        message = "JSON is nested too deeply"
    raise BodyError([FieldError(field=field, message=message)])


def prepare(raw: bytes, *, now: datetime, subject_prefix: str, max_payload: int) -> list[Outbound]:
    """Validate a POST /publish body of any of the three shapes; raise BodyError naming every bad field.

    Nothing is published unless every event is valid, so the caller only ever sees all or none.
    """
    fast = _valid_batch(raw, now=now, subject_prefix=subject_prefix, max_payload=max_payload)
    if fast is not None:
        return fast
    return _each_event(raw, now=now, subject_prefix=subject_prefix, max_payload=max_payload)


def _each_event(
    raw: bytes, *, now: datetime, subject_prefix: str, max_payload: int
) -> list[Outbound]:
    """`prepare` one event at a time: every shape, and an error for each bad field."""
    if not raw.strip():
        raise BodyError([FieldError(field="body", message="empty body: " + _SHAPES)])
    top = _outer(raw, "body", _SHAPES)
    if isinstance(top, dict) and "events" in top and "event_id" not in top:
        items = _outer(bytes(top["events"]), "events", "expected an array of events")
        assert isinstance(items, list)
        prefix = "events"
    elif isinstance(top, list):
        items, prefix = top, "events"
    else:
        items, prefix = [msgspec.Raw(raw)], ""
    errors: list[FieldError] = []
    out: list[Outbound] = []
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
) -> Outbound:
    """Validate a body holding one event object; `topic` may be left to `default_topic`."""
    top = _outer(raw, "body", "expected one event object")
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
