"""The one validator of the event contract, called by both ingest paths.

The HTTP gateway calls it before it publishes and turns each `Problem` into a 422 naming the
field; the consumer calls it before it stores and turns the first `Problem` into a dead letter.
Whatever it accepts is storable by PostgreSQL and fits a NATS subject and header, so the same
input gets the same verdict on both paths and an accepted event can never fail in the store.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import msgspec

from oncelog.events.schema import IncomingEvent
from oncelog.events.subjects import topic_error

__all__ = [
    "MAX_PAYLOAD_DEPTH",
    "Problem",
    "decode_event",
    "decode_problem",
    "event_problems",
    "payload_problem",
    "text_problem",
    "timestamp_problem",
    "to_utc",
]

# A payload object counts as depth 1; PostgreSQL would take more, but no log event needs it and
# every reader of the JSON (and the interpreter's stack) is safer with a bound.
MAX_PAYLOAD_DEPTH: Final = 100

_event = msgspec.json.Decoder(IncomingEvent)
# C0 and C1 control characters and DEL: they cannot travel in a NATS header, show as nothing
# in a terminal, and NUL cannot be stored in a PostgreSQL text column at all.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A JSON string escape of a UTF-16 surrogate; only a well-formed pair encodes a character.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# Every digit as 0 and E as e, so that substring searches (C speed, unlike a regex that tries
# its alternatives at every byte) find runs of digits and exponents.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789E", b"000000000e")


def suspect(raw: bytes) -> bool:
    """Whether a payload may hide something PostgreSQL refuses: any \\u escape (\\u0000, a
    lone surrogate), a run of 16 digits or an exponent of 3 digits (a number out of range).

    The same verdict as the regex `\\\\u|[0-9]{16}|[eE][+-]?[0-9]{3}`, three times faster.
    A payload with none of these, and fewer brackets than the depth limit, needs no closer look.
    """
    if b"\\u" in raw:
        return True
    mapped = raw.translate(_DIGITS_AS_ZERO)
    return b"0" * 16 in mapped or b"e000" in mapped or b"e+000" in mapped or b"e-000" in mapped


_MISSING = re.compile(r"^Object missing required field `(?P<name>.+)`$")
_FLOAT_MAX: Final = 1.7976931348623157e308
# The longest number literal, and the largest written exponent, a payload may hold.
MAX_NUMBER_CHARS: Final = 400


class Problem(NamedTuple):
    """Why an event is refused: the field at fault (a dotted path, or "body"), the reason in
    words, and a code from REJECTION_CODES for metrics."""

    field: str
    message: str
    code: str


def text_problem(value: str) -> str | None:
    """Return why a string field (event_id, source) cannot be carried and stored, or None."""
    if value.isprintable():
        return None  # every control character is unprintable: nothing for the search to find
    found = _CONTROL.search(value)
    if found is None:
        return None
    return (
        f"must not contain control characters (U+{ord(found.group()):04X} at position "
        f"{found.start()})"
    )


def to_utc(value: datetime) -> datetime:
    """Return `value` in UTC, reading a value without zone as UTC; OverflowError if out of range."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def timestamp_problem(value: datetime) -> str | None:
    """Return why a timestamp is outside the storable range (years 1-9999 in UTC), or None."""
    try:
        to_utc(value)
    except OverflowError:
        return f"{value.isoformat()} is outside years 1-9999 once converted to UTC"
    return None


def _number(literal: str) -> float:
    mantissa, _, exponent = literal.lower().partition("e")
    # PostgreSQL's numeric refuses a literal whose scale passes 16383 digits even when it is
    # zero (0e-20000); these bounds keep every literal far inside that.
    if len(literal) > MAX_NUMBER_CHARS or abs(int(exponent or 0)) > MAX_NUMBER_CHARS:
        raise ValueError(
            f"number {literal[:40]} is over {MAX_NUMBER_CHARS} characters long or has an"
            f" exponent beyond +-{MAX_NUMBER_CHARS}"
        )
    value = float(literal)
    if math.isinf(value):
        raise ValueError(f"number {literal[:40]} is beyond the range of a 64-bit float")
    if value == 0.0 and mantissa.strip("-+0.") != "":
        raise ValueError(f"number {literal[:40]} is below the range of a 64-bit float")
    return value


_exact = msgspec.json.Decoder(float_hook=_number)


def _walk(value: Any) -> str | None:
    """Return the first unstorable string or too-deep nesting inside a decoded payload."""
    # Iterative, so a deeply nested payload cannot exhaust the interpreter's stack.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > MAX_PAYLOAD_DEPTH:
                return f"payload is nested more than {MAX_PAYLOAD_DEPTH} levels deep"
            for key, item in node.items():
                if "\x00" in key:
                    return "strings must not contain \\u0000 (PostgreSQL cannot store it)"
                stack.append((item, depth + 1))
        elif isinstance(node, list):
            if depth > MAX_PAYLOAD_DEPTH:
                return f"payload is nested more than {MAX_PAYLOAD_DEPTH} levels deep"
            stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str):
            if "\x00" in node:
                return "strings must not contain \\u0000 (PostgreSQL cannot store it)"
        elif isinstance(node, int) and abs(node) > _FLOAT_MAX:
            return f"integer {str(node)[:40]}... is beyond the range of a 64-bit float"
    return None


def payload_problem(raw: bytes) -> str | None:
    """Return why an encoded payload cannot be stored, or None when it can.

    It must be a UTF-8 JSON object, nested at most MAX_PAYLOAD_DEPTH deep, with no \\u0000 in
    any string, and every number within the range of a 64-bit float (|x| <= 1.8e308, and a
    non-zero |x| >= 4.9e-324), written in at most 400 characters with an exponent within
    +-400: what every JSON reader and PostgreSQL's jsonb can hold.
    """
    if not raw.lstrip().startswith(b"{"):
        return "payload must be a JSON object"
    if not raw.isascii():
        try:
            raw.decode()
        except UnicodeDecodeError as exc:
            return f"payload is not UTF-8 ({exc})"
    if raw.count(b"{") + raw.count(b"[") <= MAX_PAYLOAD_DEPTH and not suspect(raw):
        return None
    try:
        value = _exact.decode(raw)
    except RecursionError:
        return f"payload is nested more than {MAX_PAYLOAD_DEPTH} levels deep"
    except msgspec.ValidationError as exc:
        message = str(exc).partition(" - at `$")[0]
        if message == "Integer value out of range":
            return "an integer is beyond the range of a 64-bit float"
        return message
    except msgspec.DecodeError as exc:
        return decode_problem(raw, exc)
    return _walk(value)


def decode_problem(raw: bytes, exc: msgspec.DecodeError) -> str:
    """Return msgspec's reason a document is not JSON, in words a publisher can act on."""
    if _SURROGATE_ESCAPE.search(raw) is not None and "surrogate" not in str(exc):
        # msgspec reports a lone surrogate escape as "Input data was truncated".
        return "a string holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF unpaired)"
    return f"not valid JSON: {exc}"


def _locate(exc: msgspec.ValidationError) -> tuple[str, str]:
    """Split msgspec's "message - at `$.a.b`" into the field path and the message."""
    text = str(exc)
    message, sep, path = text.rpartition(" - at `$")
    if not sep:
        message, path = text, ""
    path = path.rstrip("`").lstrip(".")
    if (missing := _MISSING.match(message)) is not None:
        path = f"{path}.{missing['name']}".lstrip(".")
    return path or "body", message


def decode_event(data: bytes) -> IncomingEvent | Problem:
    """Decode one event body against the schema, or name the field that breaks it."""
    try:
        return _event.decode(data)
    except msgspec.ValidationError as exc:
        field, message = _locate(exc)
        return Problem(field, message, "invalid_event")
    except msgspec.DecodeError as exc:
        return Problem("body", decode_problem(data, exc), "not_json")
    except UnicodeDecodeError as exc:
        return Problem("body", f"not valid JSON: {exc}", "not_json")
    except RecursionError:
        return Problem("body", "JSON is nested too deeply", "too_deep")


def event_problems(event: IncomingEvent) -> list[Problem]:
    """Return every rule the decoded event breaks beyond the schema (none: it is storable)."""
    problems: list[Problem] = []
    if event.topic is not None and (bad := topic_error(event.topic)) is not None:
        problems.append(Problem("topic", bad, "invalid_event"))
    if (bad := text_problem(event.event_id)) is not None:
        problems.append(Problem("event_id", bad, "invalid_event"))
    if event.source is not None and (bad := text_problem(event.source)) is not None:
        problems.append(Problem("source", bad, "invalid_event"))
    if event.timestamp is not None and (bad := timestamp_problem(event.timestamp)) is not None:
        problems.append(Problem("timestamp", bad, "bad_timestamp"))
    payload = bytes(event.payload)
    if (bad := payload_problem(payload)) is not None:
        code = "payload_not_object" if bad == "payload must be a JSON object" else "unstorable"
        problems.append(Problem("payload", bad, code))
    return problems
