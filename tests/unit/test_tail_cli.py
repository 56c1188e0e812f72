"""The live tail's SSE frames and the `just tail` client that reads them, without a server."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from oncelog.api.tail import frame
from oncelog.local.tail import parse_sse, stream_url


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[0-9]{1,19}-[0-9]{1,19}", fullmatch=True),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3)
                ),
                max_leaves=8,
            ),
        ),
        max_size=5,
    )
)
def test_frames_read_back_as_their_id_and_json(messages: list[tuple[str, object]]) -> None:
    """Whatever JSON an event holds (any Unicode, separators, U+2028), its SSE frame reads back
    as exactly its id and value, between comments and keep-alives."""
    wire = b"retry: 1000\n\n: keep-alive\n\n"
    for ident, value in messages:
        wire += b"id: %s\ndata: %s\n\n" % (
            ident.encode(),
            json.dumps(value, ensure_ascii=False).encode(),
        )
    lines = iter(wire.splitlines(keepends=True))
    assert [(i, json.loads(d)) for i, d in parse_sse(lines)] == messages


def test_the_url_follows_the_stack_settings() -> None:
    """API_URL wins; else API_HOST and API_PORT as `just up` uses them; the topic is escaped."""
    assert stream_url({}, None, None) == "http://127.0.0.1:8080/events/stream"
    assert (
        stream_url({"API_PORT": "18080"}, "auth.>", "0-0")
        == "http://127.0.0.1:18080/events/stream?topic=auth.%3E&after=0-0"
    )
    assert stream_url({"API_URL": "http://h:1/"}, None, None) == "http://h:1/events/stream"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(
    st.dictionaries(st.text(), _json, max_size=4),
    st.text(min_size=1),
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**63 - 1),
)
def test_a_frame_is_one_id_line_and_one_data_line_whatever_the_event_holds(
    payload: dict[str, object], text: str, tx: int, pos: int
) -> None:
    """No payload, id or source (CR, LF, NEL, U+2028, NUL-free text of any kind) can add a line
    to a frame or end it early: it is always `id`, `data`, blank, and the data is the event."""
    row = {
        "tx": tx,
        "pos": pos,
        "topic": "a.b",
        "event_id": text,
        "ts": datetime(2026, 12, 1, tzinfo=UTC),
        "source": text,
        "payload": json.dumps(payload),
    }
    wire = frame(row)
    assert wire.count(b"\n") == 3
    assert b"\r" not in wire
    assert wire.endswith(b"\n\n")
    [(ident, data)] = list(parse_sse(iter(wire.splitlines(keepends=True))))
    assert ident == f"{tx}-{pos}"
    event = json.loads(data)
    assert event["payload"] == payload
    assert event["event_id"] == event["source"] == text
