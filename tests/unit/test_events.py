"""The wire contract: subjects, message ids, topic rules and the NATS-path decoder."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from oncelog.events import (
    REJECTION_CODES,
    Decoded,
    Rejected,
    dead_letter_topic,
    decode_message,
    from_ns,
    msg_id,
    subject_for,
    topic_error,
    topic_from_subject,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def test_subject_and_msg_id_follow_the_contract() -> None:
    """Events of topic T travel on events.T with Msg-Id T:event_id."""
    assert subject_for("auth.prod") == "events.auth.prod"
    assert subject_for("auth.prod", "ev1") == "ev1.auth.prod"
    assert topic_from_subject("events.auth.prod") == "auth.prod"
    assert topic_from_subject("other.auth") is None
    assert topic_from_subject("events.") is None
    assert msg_id("auth.prod", "e-1") == "auth.prod:e-1"


@pytest.mark.parametrize("topic", ["a", "service.auth.prod.login", "A_b-9.x", "x" * 255])
def test_valid_topics(topic: str) -> None:
    """Dot-separated tokens of [A-Za-z0-9_-] up to 255 characters are topics."""
    assert topic_error(topic) is None


@pytest.mark.parametrize("topic", ["", "a..b", ".a", "a.", "a.*", "a.>", "a b", "ü", "x" * 256])
def test_invalid_topics(topic: str) -> None:
    """Empty tokens, wildcards, spaces, non-ASCII and overlong topics are refused with a reason."""
    assert topic_error(topic)


def test_decoder_fills_the_nats_path_defaults() -> None:
    """Without topic, timestamp and source, the subject, broker time and "nats" are used."""
    result = decode_message("events.auth.prod", b'{"event_id": "e-1"}', NOW)
    assert result == Decoded("auth.prod", "e-1", NOW, "nats", b"{}")


def test_broker_time_in_nanoseconds_becomes_the_default_timestamp_to_the_microsecond() -> None:
    """JetStream reports receive times in nanoseconds; they are cut (not rounded) to µs, exactly,
    as PostgreSQL stores them, however far from the epoch."""
    ns = 1_795_334_400_123_456_999  # 2026-11-22T08:00:00.123456999Z
    expected = datetime(2026, 11, 22, 8, 0, 0, 123456, tzinfo=UTC)
    assert from_ns(ns) == expected
    result = decode_message("events.auth.prod", b'{"event_id": "e-1"}', ns)
    assert result == Decoded("auth.prod", "e-1", expected, "nats", b"{}")
    assert from_ns(253_402_300_799_999_999_000) == datetime(9999, 12, 31, 23, 59, 59, 999999, UTC)


def test_decoder_reads_a_zoneless_timestamp_as_utc() -> None:
    """A timestamp without zone is UTC; one with a zone keeps its instant."""
    naive = decode_message(
        "events.t", b'{"event_id": "1", "timestamp": "2026-01-01T00:00:00"}', NOW
    )
    zoned = decode_message(
        "events.t", b'{"event_id": "1", "timestamp": "2026-01-01T02:00:00+02:00"}', NOW
    )
    assert isinstance(naive, Decoded)
    assert isinstance(zoned, Decoded)
    assert naive.timestamp == zoned.timestamp == datetime(2026, 1, 1, tzinfo=UTC)


def test_decoder_keeps_the_payload_bytes() -> None:
    """The payload object passes through undecoded, so it is stored exactly as sent."""
    result = decode_message(
        "events.t", b'{"event_id": "1", "payload": {"a": [1, {"b": null}]}}', NOW
    )
    assert isinstance(result, Decoded)
    assert result.payload == b'{"a": [1, {"b": null}]}'


def test_decoder_accepts_a_matching_topic_and_ignores_unknown_fields() -> None:
    """A body topic equal to the subject's is fine; fields added later do not break old readers."""
    result = decode_message("events.a.b", b'{"event_id": "1", "topic": "a.b", "extra": 1}', NOW)
    assert isinstance(result, Decoded)


@pytest.mark.parametrize(
    ("subject", "data", "reason", "code"),
    [
        ("events.t", b"nope", "not valid JSON", "not_json"),
        ("events.t", b"[]", "invalid event", "invalid_event"),
        ("events.t", b"{}", "event_id", "invalid_event"),
        ("events.t", b'{"event_id": ""}', "event_id", "invalid_event"),
        ("events.t", b'{"event_id": "' + b"x" * 256 + b'"}', "event_id", "invalid_event"),
        ("events.t", b'{"event_id": "1", "source": 5}', "source", "invalid_event"),
        ("events.t", b'{"event_id": "1", "payload": "x"}', "payload must be", "payload_not_object"),
        ("events.t", b'{"event_id": "1", "topic": "u"}', "disagrees", "topic_mismatch"),
        ("events.t", b'{"event_id": "1", "topic": "a..b"}', "topic", "invalid_event"),
        ("events.t", b"   ", "empty body", "empty"),
        ("events.bad$topic", b'{"event_id": "1"}', "subject", "bad_subject"),
        ("elsewhere.t", b'{"event_id": "1"}', "not under events", "bad_subject"),
    ],
)
def test_decoder_rejects_with_a_reason(subject: str, data: bytes, reason: str, code: str) -> None:
    """Every way a message can fail to be an event yields a rejection that says which."""
    result = decode_message(subject, data, NOW)
    assert isinstance(result, Rejected)
    assert reason in result.reason
    assert result.code == code
    assert code in REJECTION_CODES


def test_decoder_rejects_oversize_messages() -> None:
    """A message over the configured limit is refused before it is parsed."""
    result = decode_message("events.t", b'{"event_id": "1"}', NOW, max_bytes=10)
    assert isinstance(result, Rejected)
    assert "limit is 10" in result.reason


@pytest.mark.parametrize(
    ("subject", "topic"),
    [
        ("events.auth.prod", "auth.prod"),
        ("ev1.a", "a"),
        ("lonely", "lonely"),
        ("events." + "x" * 300, "x" * 255),
        ("events.\udcff", "\udcff"),
    ],
)
def test_a_dead_letter_counts_against_the_subject_after_its_prefix(
    subject: str, topic: str
) -> None:
    """A message that is no event counts against its subject less the prefix, cut to 255."""
    assert dead_letter_topic(subject) == topic
