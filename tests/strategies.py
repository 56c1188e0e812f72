"""Hypothesis strategies over the whole input space of an event, valid and hostile alike."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

# Any code point, surrogates and controls included: what a hostile client can put in JSON.
ANY_CHAR = st.characters(codec=None, exclude_categories=())
# Characters chosen to hit the rules: controls, NUL, look-alike spaces, separators of the
# Msg-Id, line breaks, a lone surrogate, non-ASCII letters.
TRICKY = st.sampled_from(
    list(
        "\x00\t\n\r\x0b\x0c\x1f\x7f\x85\xa0\u1680\u2028\u2029\u3000\ufeff\u200b :~.*>é\ud800\udfff"
    )
)
TEXT = st.text(st.one_of(ANY_CHAR, TRICKY), max_size=40) | st.text(
    ANY_CHAR, min_size=250, max_size=260
)
PLAIN_ID = st.uuids().map(str)
TOKEN = st.text(st.sampled_from("abcXYZ09_-"), min_size=1, max_size=8)
TOPIC = st.lists(TOKEN, min_size=1, max_size=4).map(".".join)
HOSTILE_TOPIC = st.one_of(TOPIC.map(lambda t: t + "\n"), TOPIC.map(lambda t: t + ".*"), TEXT)
# Number literals at and past the limits of a 64-bit float and of PostgreSQL's numeric.
NUMBER = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(
        [
            "1e400",
            "-1e400",
            "1e-400",
            "5e-324",
            "4e-324",
            "2e-324",
            "1.7976931348623157e308",
            "1.7976931348623159e308",
            "0e-20000",
            "0e20000",
            "-0",
            "0.0",
            "1E+308",
            "9" * 309,
            "9" * 400,
            "1" + "0" * 308,
            "0." + "0" * 500 + "1",
            "123456789012345678901234567890",
        ]
    ),
)


class Literal(str):
    """A JSON fragment written into the document as it is (a number literal)."""


def _scalar() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), TEXT, NUMBER.map(Literal))


JSON_VALUE = st.recursive(
    _scalar(),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)


def nested(depth: int) -> str:
    """Return an array nested `depth` deep."""
    return "[" * depth + "]" * depth


def dumps(value: Any) -> str:
    """Encode like json.dumps (ASCII, so lone surrogates become escapes), literals as they are."""
    if isinstance(value, Literal):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=True)


OFFSET = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda m: timezone(timedelta(minutes=m))
)
TIMESTAMP = st.one_of(
    st.builds(
        lambda d, tz: d.replace(tzinfo=tz).isoformat(),
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
        st.one_of(st.none(), st.just(UTC), OFFSET),
    ),
    st.sampled_from(
        [
            "9999-12-31T23:59:59-01:00",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "yesterday",
        ]
    ),
)
PAYLOAD = st.one_of(
    st.dictionaries(TEXT, JSON_VALUE, max_size=5).map(dumps),
    st.integers(min_value=95, max_value=105).map(lambda d: f'{{"deep": {nested(d)}}}'),
    JSON_VALUE.map(dumps),
)


@st.composite
def event_body(draw: st.DrawFn, *, topic: str | None) -> tuple[dict[str, str], bytes]:
    """Draw an event as JSON text: its fields (as written) and the whole body's bytes.

    `topic`, when given, is written into the body; each other field may be absent, valid,
    hostile or of the wrong type.
    """
    fields: dict[str, str] = {}
    if topic is not None:
        fields["topic"] = json.dumps(topic)
    fields["event_id"] = draw(
        st.one_of(PLAIN_ID.map(json.dumps), TEXT.map(json.dumps), st.sampled_from(["7", "null"]))
    )
    if draw(st.booleans()):
        fields["source"] = draw(st.one_of(TEXT.map(json.dumps), st.just("null")))
    if draw(st.booleans()):
        fields["timestamp"] = json.dumps(draw(TIMESTAMP))
    if draw(st.booleans()):
        fields["payload"] = draw(PAYLOAD)
    text = "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    return fields, text.encode("utf-8", "surrogatepass")


# Unremarkable events, which the stack must store: any text but controls and NUL, ordinary
# numbers and times, moderate nesting.
CLEAN_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=30)
CLEAN_VALUE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63),
        st.floats(allow_nan=False, allow_infinity=False),
        CLEAN_TEXT,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(CLEAN_TEXT, inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def clean_body(draw: st.DrawFn, *, topic: str | None) -> tuple[dict[str, str], bytes]:
    """Draw a valid event as JSON text: its fields (as written) and the body's bytes."""
    fields: dict[str, str] = {}
    if topic is not None:
        fields["topic"] = json.dumps(topic)
    fields["event_id"] = json.dumps(
        draw(st.one_of(PLAIN_ID, CLEAN_TEXT.filter(lambda t: 0 < len(t) <= 255)))
    )
    if draw(st.booleans()):
        fields["source"] = json.dumps(draw(CLEAN_TEXT.filter(bool)))
    if draw(st.booleans()):
        moment = draw(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1)))
        fields["timestamp"] = json.dumps(
            moment.replace(tzinfo=draw(st.one_of(st.just(UTC), OFFSET))).isoformat()
        )
    fields["payload"] = json.dumps(draw(st.dictionaries(CLEAN_TEXT, CLEAN_VALUE, max_size=4)))
    text = "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    return fields, text.encode()
