"""The consumer's wire-level parser against nats-py's own: same frames, any read boundaries."""

from __future__ import annotations

import random

import pytest
from nats.aio.client import Client
from nats.protocol.parser import Parser

from oncelog.events import parse_headers
from oncelog.platform.wire import FastParser, Sink, install

Frame = tuple[bytes, bytes, bytes | None, bytes]

SID = 7
OTHER_SID = 9


def _frame(sid: int, subject: bytes, reply: bytes, headers: bytes | None, data: bytes) -> bytes:
    reply_part = b" " + reply if reply else b""
    if headers is None:
        return b"MSG %s %d%s %d\r\n%s\r\n" % (subject, sid, reply_part, len(data), data)
    total = len(headers) + len(data)
    line = b"HMSG %s %d%s %d %d\r\n" % (subject, sid, reply_part, len(headers), total)
    return line + headers + data + b"\r\n"


def _stream(rng: random.Random, n: int) -> tuple[bytes, list[Frame]]:
    """A server byte stream of `n` deliveries to SID, with PINGs and another sid in between."""
    out: list[bytes] = []
    expected: list[Frame] = []
    for i in range(n):
        subject = b"events.t%d" % rng.randrange(5)
        reply = b"$JS.ACK.EVENTS.aggregator.1.%d.%d.1700000000000000000.0" % (i + 1, i + 1)
        headers = b"NATS/1.0\r\nNats-Msg-Id: t:%d\r\n\r\n" % i if rng.random() < 0.5 else None
        # Bodies include CR LF, "MSG " and empty ones: the parser must go by length only.
        data = rng.choice([b"", b"{}", b'{"a":"MSG x 1 2\\r\\n"}', bytes(rng.randrange(400))])
        data = data.replace(b"\x00", b"\r\n")
        out.append(_frame(SID, subject, reply, headers, data))
        expected.append((subject, reply, headers, data))
        if rng.random() < 0.05:
            out.append(b"PING\r\n")
        if rng.random() < 0.05:
            out.append(_frame(OTHER_SID, b"other", b"", None, b"not ours"))
    return b"".join(out), expected


@pytest.fixture
def client() -> Client:
    """A real nats-py client, never connected: its parser and bookkeeping are what we drive."""
    return Client()


def parser_of(client: Client) -> Parser:
    """Return the client's protocol parser, the object under test."""
    return client._ps  # noqa: SLF001 - nats-py keeps its parser in a private slot


async def _feed(client: Client, stream: bytes, cuts: list[int]) -> None:
    start = 0
    for cut in [*cuts, len(stream)]:
        await parser_of(client).parse(stream[start:cut])
        start = cut


@pytest.mark.parametrize("seed", range(5))
async def test_frames_come_out_whole_whatever_the_read_boundaries(
    client: Client, seed: int
) -> None:
    rng = random.Random(seed)
    stream, expected = _stream(rng, 300)
    got: list[Frame] = []
    install(client, SID, _collect(got))
    pongs: list[None] = []

    async def pong() -> None:
        pongs.append(None)

    client._process_ping = pong  # type: ignore[method-assign]  # noqa: SLF001 - PING handling needs a connection; counted instead
    cuts = sorted(rng.sample(range(1, len(stream)), 200))
    await _feed(client, stream, cuts)
    assert got == expected
    assert pongs
    assert len(pongs) == stream.count(b"PING\r\n")
    assert parser_of(client).buf == bytearray()
    assert client.stats["in_msgs"] == len(expected) + stream.count(b"MSG other ")


async def test_byte_by_byte_reads_give_the_same_frames(client: Client) -> None:
    stream, expected = _stream(random.Random(99), 40)
    got: list[Frame] = []
    install(client, SID, _collect(got))
    client._process_ping = _noop  # type: ignore[method-assign]  # noqa: SLF001 - PING handling needs a connection; skipped
    await _feed(client, stream, list(range(1, len(stream))))
    assert got == expected


async def test_frames_a_sink_declines_take_the_standard_path(client: Client) -> None:
    """A status message (headers, no body) goes to nats-py's own processing, not the sink."""
    seen: list[tuple[int, bytes]] = []

    async def process_msg(
        sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        seen.append((sid, headers))

    client._process_msg = process_msg  # type: ignore[method-assign]  # noqa: SLF001 - records what nats-py's path receives
    install(client, SID, lambda subject, reply, headers, data: bool(data))
    status = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 12\r\n\r\n"
    await parser_of(client).parse(_frame(SID, b"_INBOX.x", b"", status, b""))
    assert seen == [(SID, status)]
    assert parse_headers(status) == {
        "Status": "408",
        "Description": "Request Timeout",
        "Nats-Pending-Messages": "12",
    }


async def test_install_keeps_the_parser_and_a_half_read_frame(client: Client) -> None:
    parser = parser_of(client)
    stream, expected = _stream(random.Random(3), 3)
    await parser.parse(stream[:10])  # nats-py's parser holds a partial control line
    got: list[Frame] = []
    uninstall = install(client, SID, _collect(got))
    assert parser_of(client) is parser
    assert isinstance(parser, FastParser)
    await parser.parse(stream[10:])
    assert got == expected
    uninstall()
    assert parser.sinks == {}


async def test_a_malformed_control_line_is_a_protocol_error(client: Client) -> None:
    from nats.errors import ProtocolError

    install(client, SID, lambda *frame: True)
    with pytest.raises(ProtocolError):
        await parser_of(client).parse(b"MSG subject notanumber 3\r\nabc\r\n")


async def _noop() -> None:
    return None


def _collect(frames: list[Frame]) -> Sink:
    def sink(subject: bytes, reply: bytes, headers: bytes | None, data: bytes) -> bool:
        frames.append((subject, reply, headers, data))
        return True

    return sink
