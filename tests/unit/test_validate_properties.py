"""Properties of the one validator, over the whole input space (Hypothesis)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oncelog.api.ingest import BodyError, _each_event, prepare
from oncelog.events import (
    MAX_PAYLOAD_DEPTH,
    REJECTION_CODES,
    Decoded,
    Rejected,
    decode_message,
    msg_id,
    parse_msg_id,
    subject_for,
    topic_error,
)
from oncelog.events.validate import suspect, text_problem
from oncelog.platform.publish import Outbound, check_frame
from strategies import ANY_CHAR, HOSTILE_TOPIC, TEXT, TOPIC, event_body

NOW = datetime(2026, 12, 1, tzinfo=UTC)
RECEIVED_NS = 1_764_547_200_000_000_000
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _numbers(value: Any) -> list[float | int]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return [value] if ok else []


def assert_storable(event: Decoded) -> None:
    """What PostgreSQL and a NATS header need of an accepted event, checked independently."""
    assert topic_error(event.topic) is None
    for text in (event.event_id, event.source):
        assert 1 <= len(text) <= 255
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)
        text.encode()  # no lone surrogate
    assert event.timestamp.utcoffset() is not None
    assert 1 <= event.timestamp.astimezone(UTC).year <= 9999
    payload = json.loads(event.payload.decode())
    assert isinstance(payload, dict)
    assert _depth(payload) <= MAX_PAYLOAD_DEPTH
    assert not any("\x00" in s for s in _strings(payload))
    for s in _strings(payload):
        s.encode()
    assert all(math.isfinite(n) and abs(n) <= 1.7976931348623157e308 for n in _numbers(payload))
    # The header and subject it travels with are safe for a protocol frame.
    check_frame(Outbound(subject_for(event.topic), b"", msg_id(event.topic, event.event_id)))


@PROPERTY
@given(st.data())
def test_every_nats_message_is_an_event_or_a_precise_rejection(data: st.DataObject) -> None:
    """Any body on any topic decodes to a storable event or a rejection with a known code."""
    topic = data.draw(st.one_of(TOPIC, HOSTILE_TOPIC))
    in_body = data.draw(st.one_of(st.none(), st.just(topic), HOSTILE_TOPIC))
    _, body = data.draw(event_body(topic=in_body))
    subject = "events." + topic
    result = decode_message(subject, body, RECEIVED_NS)
    if isinstance(result, Rejected):
        assert result.code in REJECTION_CODES
        assert result.reason
        assert "truncated" not in result.reason
    else:
        assert isinstance(result, Decoded)
        assert_storable(result)


@PROPERTY
@given(st.data())
def test_http_and_nats_give_the_same_verdict(data: st.DataObject) -> None:
    """An event accepted over HTTP decodes on the NATS path to the same event; one refused
    over HTTP (for its fields, not its size) is refused on the NATS path too."""
    topic = data.draw(TOPIC)
    _, body = data.draw(event_body(topic=topic))
    try:
        (out,) = prepare(body, now=NOW, subject_prefix="events", max_payload=1 << 20)
    except BodyError as exc:
        errors = exc.errors
    else:
        errors = []
    if errors:
        assert all(e.field and e.message for e in errors)
        assert isinstance(decode_message("events." + topic, body, RECEIVED_NS), Rejected)
        return
    assert out.subject == "events." + topic
    decoded = decode_message(out.subject, out.body, RECEIVED_NS)
    assert isinstance(decoded, Decoded), decoded
    assert_storable(decoded)
    assert (decoded.topic, decoded.event_id) == (out.topic, out.event_id)
    assert out.msg_id == msg_id(out.topic, out.event_id)
    direct = decode_message("events." + topic, body, RECEIVED_NS)
    assert isinstance(direct, Decoded)
    assert direct.payload == decoded.payload or json.loads(direct.payload) == json.loads(
        decoded.payload
    )


@PROPERTY
@given(TOPIC, st.text(ANY_CHAR, max_size=300), TOPIC, st.text(ANY_CHAR, max_size=300))
def test_msg_id_is_injective_and_frame_safe(t1: str, e1: str, t2: str, e2: str) -> None:
    """Different (topic, event_id) pairs never share a Msg-Id; every Msg-Id fits a header."""
    a, b = msg_id(t1, e1), msg_id(t2, e2)
    assert parse_msg_id(a) == (t1, e1)
    assert (a == b) == ((t1, e1) == (t2, e2))
    check_frame(Outbound(subject_for(t1), b"", a))


@PROPERTY
@given(TOPIC, st.text(st.sampled_from(" \t\r\n\u3000\u00a0\u2028x1-"), min_size=1, max_size=6))
def test_whitespace_variants_of_an_id_are_distinct(topic: str, suffix: str) -> None:
    """Ids that differ only in whitespace have different Msg-Ids (the reported defect)."""
    assert msg_id(topic, "x-1") != msg_id(topic, "x-1" + suffix)
    assert msg_id(topic, "x-1" + suffix) != msg_id(topic, "x-1" + suffix + " ")


@PROPERTY
@given(TEXT)
def test_topic_grammar_is_one_rule_on_both_paths(topic: str) -> None:
    """A string the topic rule refuses is refused in an HTTP body and as a NATS subject."""
    body = json.dumps({"topic": topic, "event_id": "e"}).encode()
    http_ok = True
    try:
        prepare(body, now=NOW, subject_prefix="events", max_payload=1 << 20)
    except BodyError:
        http_ok = False
    nats = decode_message("events." + topic, b'{"event_id": "e"}', RECEIVED_NS)
    assert http_ok == (topic_error(topic) is None) == isinstance(nats, Decoded)


_OLD_SUSPECT = re.compile(rb"\\u|[0-9]{16}|[eE][+-]?[0-9]{3}")


@PROPERTY
@given(
    st.binary(max_size=80)
    | st.lists(st.sampled_from([b"\\", b"u", b"e", b"E", b"+", b"-", b"0", b"7", b"9", b"x"])).map(
        b"".join
    )
)
def test_the_suspect_test_is_the_regex_it_replaced(raw: bytes) -> None:
    """The substring test that decides whether a payload gets the exact decode gives the
    regex's verdict on any bytes: digits, exponents and escapes in any arrangement."""
    assert suspect(raw) == (_OLD_SUSPECT.search(raw) is not None)


def _prepared(
    fn: Callable[..., list[Outbound]], raw: bytes, max_payload: int
) -> list[Outbound] | list[tuple[str, str]]:
    try:
        return fn(raw, now=NOW, subject_prefix="events", max_payload=max_payload)
    except BodyError as exc:
        return [(e.field, e.message) for e in exc.errors]


@st.composite
def batch_body(draw: st.DrawFn) -> bytes:
    """A body of any shape holding a few events, valid or not, with or without a topic."""
    topics = st.one_of(TOPIC, HOSTILE_TOPIC, st.none())
    events = draw(st.lists(topics.flatmap(lambda t: event_body(topic=t)), max_size=4))
    inner = b"[" + b",".join(body for _, body in events) + b"]"
    shape = draw(st.sampled_from(["array", "envelope", "extra member", "event_id too", "one"]))
    if shape == "array":
        return inner
    if shape == "envelope":
        return b'{"events": ' + inner + b"}"
    if shape == "extra member":
        return b'{"events": ' + inner + b', "note": 1}'
    if shape == "event_id too":
        return b'{"event_id": "e", "events": ' + inner + b"}"
    return events[0][1] if events else b"{}"


@PROPERTY
@given(batch_body() | st.binary(max_size=60), st.sampled_from([1 << 20, 400, 150]))
def test_the_one_pass_batch_path_answers_as_the_event_by_event_path(
    raw: bytes, max_payload: int
) -> None:
    """A body decoded in one pass gives exactly the messages the event-by-event path gives,
    and a body it leaves to that path gets that path's errors: the two never disagree."""
    assert _prepared(prepare, raw, max_payload) == _prepared(_each_event, raw, max_payload)


_OLD_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_OLD_PLAIN_ID = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


@PROPERTY
@given(
    st.text(ANY_CHAR, max_size=40) | st.text(st.sampled_from(" \t\x7f\x9f\xa0a~\u2028"), max_size=5)
)
def test_the_string_tests_are_the_regexes_they_replaced(text: str) -> None:
    """The C-speed tests of an event id or source give their regexes' verdicts on any text,
    in `msg_id` and in `parse_msg_id` alike."""
    assert (text_problem(text) is None) == (_OLD_CONTROL.search(text) is None)
    plain = _OLD_PLAIN_ID.fullmatch(text) is not None
    assert (msg_id("t", text) == "t:" + text) == plain
    assert parse_msg_id("t:" + text) == (("t", text) if plain else None)
