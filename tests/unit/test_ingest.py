"""HTTP bodies into messages to publish: the three shapes, defaults, field paths and limits."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from oncelog.api.ingest import MAX_FIELD_ERRORS, BodyError, prepare, prepare_one
from oncelog.events import msg_id
from oncelog.platform.publish import Outbound

NOW = datetime(2026, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
PREFIX = "ev"
BIG = 1 << 20


def body(value: Any) -> bytes:
    """Return `value` as a JSON body."""
    return json.dumps(value).encode()


def publish(value: Any, max_payload: int = BIG) -> list[Outbound]:
    """Prepare a POST /publish body holding `value`."""
    return prepare(body(value), now=NOW, subject_prefix=PREFIX, max_payload=max_payload)


def errors(value: Any, max_payload: int = BIG) -> list[tuple[str, str]]:
    """Return the (field, message) pairs prepare refuses `value` with."""
    with pytest.raises(BodyError) as caught:
        publish(value, max_payload)
    return [(e.field, e.message) for e in caught.value.errors]


def fields(value: Any) -> list[str]:
    """Return the fields prepare names when it refuses `value`."""
    return [field for field, _ in errors(value)]


def sent(message: Outbound) -> dict[str, Any]:
    """Return the event a message carries, as the consumer will read it."""
    decoded: dict[str, Any] = json.loads(message.body)
    return decoded


E1 = {"topic": "auth.prod", "event_id": "e-1"}
E2 = {"topic": "billing.eu", "event_id": "b-9", "source": "shop", "payload": {"n": 1}}


def test_one_object_is_one_message_with_its_subject_and_msg_id() -> None:
    """A single event object becomes one message on events.<topic> with the contract's Msg-Id."""
    (message,) = publish(E1)
    assert message.subject == "ev.auth.prod"
    assert message.msg_id == msg_id("auth.prod", "e-1") == "auth.prod:e-1"
    assert (message.topic, message.event_id) == ("auth.prod", "e-1")
    assert sent(message)["event_id"] == "e-1"


@pytest.mark.parametrize("shape", ["array", "envelope"])
def test_an_array_and_the_envelope_keep_the_order_given(shape: str) -> None:
    """A bare array and {"events": [...]} both become one message per event, in order."""
    events = [E2, E1, E2]
    messages = publish(events if shape == "array" else {"events": events})
    assert [(m.topic, m.event_id) for m in messages] == [
        ("billing.eu", "b-9"),
        ("auth.prod", "e-1"),
        ("billing.eu", "b-9"),
    ]
    assert [m.subject for m in messages] == ["ev.billing.eu", "ev.auth.prod", "ev.billing.eu"]


def test_an_object_with_an_event_id_is_an_event_even_with_an_events_key() -> None:
    """{"event_id": ..., "events": ...} is one event (its extra key ignored), not an envelope."""
    (message,) = publish({**E1, "events": [E2]})
    assert (message.topic, message.event_id) == ("auth.prod", "e-1")


def test_missing_fields_get_the_gateway_defaults() -> None:
    """Without timestamp an event gets the gateway's clock, without source "http", without
    payload {}."""
    (message,) = publish(E1)
    assert sent(message) == {
        "topic": "auth.prod",
        "event_id": "e-1",
        "timestamp": "2026-05-06T07:08:09.123000Z",
        "source": "http",
        "payload": {},
    }


def test_given_fields_are_kept_and_the_timestamp_sent_in_utc() -> None:
    """A given source and payload travel unchanged; a timestamp with an offset (or without a
    zone) is sent as the same instant in UTC."""
    (offset, naive) = publish(
        [
            {**E2, "timestamp": "2026-01-01T02:30:00+02:00"},
            {**E1, "timestamp": "2026-01-01T00:30:00"},
        ]
    )
    assert sent(offset)["timestamp"] == sent(naive)["timestamp"] == "2026-01-01T00:30:00Z"
    assert sent(offset)["source"] == "shop"
    assert sent(offset)["payload"] == {"n": 1}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"event_id": "x"}, ["topic"]),
        ({"topic": "t", "event_id": 1}, ["event_id"]),
        ([E1, {"topic": "t"}, {"event_id": "x"}], ["events[1].event_id", "events[2].topic"]),
        ({"events": [E1, {**E1, "payload": [1]}]}, ["events[1].payload"]),
        ({"events": [{"topic": "a..b", "event_id": "x"}]}, ["events[0].topic"]),
        ({"events": "many"}, ["events"]),
        ({"events": [1]}, ["events[0]"]),
        ([5, "x"], ["events[0]", "events[1]"]),
        (5, ["body"]),
        ("text", ["body"]),
    ],
)
def test_each_bad_field_is_named_by_its_path(value: Any, expected: list[str]) -> None:
    """A refusal names each field at fault: plain for one object, events[i].<field> in an array
    or the envelope, the container itself when it is no event at all."""
    refused = errors(value)
    assert [field for field, _ in refused] == expected
    assert all(message for _, message in refused)


@pytest.mark.parametrize("raw", [b"", b"  \n", b"{", b"[1,", b"\xff\xfe"])
def test_an_unreadable_body_names_the_body(raw: bytes) -> None:
    """An empty body or one that is not JSON is refused as `body`."""
    with pytest.raises(BodyError) as caught:
        prepare(raw, now=NOW, subject_prefix=PREFIX, max_payload=BIG)
    assert [e.field for e in caught.value.errors] == ["body"]


def test_one_bad_event_refuses_the_whole_body() -> None:
    """Nothing is returned when any event is invalid: the caller publishes all or none."""
    assert fields([E1, E2, {**E1, "event_id": ""}]) == ["events[2].event_id"]


def test_an_answer_names_at_most_max_field_errors_fields() -> None:
    """A body with more bad fields than MAX_FIELD_ERRORS names only the first ones, in order."""
    named = fields([{"topic": "t", "event_id": i} for i in range(MAX_FIELD_ERRORS + 50)])
    assert len(named) == MAX_FIELD_ERRORS
    assert named[0] == "events[0].event_id"
    assert named[-1] == f"events[{MAX_FIELD_ERRORS - 1}].event_id"


def test_an_event_over_the_broker_limit_is_refused_by_one_byte() -> None:
    """An event whose body, subject and Msg-Id fit max_payload (with 64 bytes for the header) is
    accepted; one byte less room and it is refused, naming its sizes."""
    event = {**E2, "payload": {"pad": "x" * 500}}
    (message,) = publish(event)
    size = len(message.body) + len(message.topic) + len(message.msg_id) + 64
    assert len(publish([E1, event], max_payload=size)) == 2
    assert errors([E1, event], max_payload=size - 1) == [
        ("events[1]", f"event is {size} bytes encoded, the broker's limit is {size - 1}")
    ]
    assert [f for f, _ in errors(event, max_payload=size - 1)] == ["body"]


def test_prepare_one_takes_the_default_topic_only_when_none_is_given() -> None:
    """A replayed body without topic gets the dead letter's; a topic in the body wins."""
    without = prepare_one(
        body({"event_id": "7"}),
        now=NOW,
        subject_prefix=PREFIX,
        max_payload=BIG,
        default_topic="orders",
    )
    assert (without.subject, without.topic, without.msg_id) == ("ev.orders", "orders", "orders:7")
    given = prepare_one(
        body({"topic": "orders.eu", "event_id": "7"}),
        now=NOW,
        subject_prefix=PREFIX,
        max_payload=BIG,
        default_topic="orders",
    )
    assert given.topic == "orders.eu"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"event_id": "7"}, [("topic", "required over HTTP")]),
        ([{"topic": "t", "event_id": "7"}], [("body", "expected one event object")]),
        ({"events": [E1]}, [("event_id", "Object missing required field `event_id`")]),
    ],
)
def test_prepare_one_refuses_all_but_one_event_object(
    value: Any, expected: list[tuple[str, str]]
) -> None:
    """prepare_one wants exactly one event: an array, an envelope, or an event without a topic
    and no default are refused naming the field."""
    with pytest.raises(BodyError) as caught:
        prepare_one(
            body(value), now=NOW, subject_prefix=PREFIX, max_payload=BIG, default_topic=None
        )
    assert [(e.field, e.message) for e in caught.value.errors] == expected
