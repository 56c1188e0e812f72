"""The wire-level fast path: the parser against nats-py's own at any read boundaries, the
start-up check of nats-py's internals, and the public path it falls back to."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.protocol import parser as nats_parser
from nats.protocol.parser import Parser

from helpers import running_consumer, wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import msg_id, parse_headers
from oncelog.platform import broker
from oncelog.platform.publish import Outbound, publish_many
from oncelog.platform.wire import (
    Delivery,
    FastParser,
    Sink,
    fast_path,
    fast_path_problem,
    install,
)

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


async def test_the_pinned_nats_py_has_every_internal_the_fast_path_needs() -> None:
    """On the nats-py release in uv.lock the start-up check finds nothing missing."""
    assert await fast_path_problem(Client()) is None


class _OpaqueParser:
    """A parser as a later nats-py might keep one: the same parse and reset, other insides."""

    def __init__(self, nc: Client) -> None:
        self.inner = Parser(nc)

    async def parse(self, data: bytes = b"") -> None:
        await self.inner.parse(data)

    def reset(self) -> None:
        self.inner.reset()


async def _other_process_msg(
    sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes, origin: str
) -> None:
    return None


def _renamed_keys(parse: Callable[..., Any]) -> Callable[..., Any]:
    async def renamed(self: Parser, data: bytes = b"") -> None:
        await parse(self, data)
        if "sid" in self.msg_arg:
            self.msg_arg["id"] = self.msg_arg.pop("sid")

    return renamed


# Each: what a later nats-py release might change, and the words the check must report.
CHANGES: dict[str, tuple[Callable[[Client, pytest.MonkeyPatch], None], str]] = {
    "send_command_gone": (
        lambda c, mp: mp.setattr(c, "_send_command", None),
        "Client._send_command is missing",
    ),
    "process_msg_signature": (
        lambda c, mp: mp.setattr(c, "_process_msg", _other_process_msg),
        "Client._process_msg takes other arguments",
    ),
    "stats_renamed": (lambda c, mp: mp.setattr(c, "stats", {}), "Client.stats lacks"),
    "parser_of_another_class": (
        lambda c, mp: mp.setattr(c, "_ps", _OpaqueParser(c)),
        "Client._ps is _OpaqueParser",
    ),
    "msg_arg_gone": (lambda c, mp: mp.delattr(parser_of(c), "msg_arg"), "Parser.msg_arg"),
    "state_renamed": (
        lambda c, mp: mp.delattr(nats_parser, "AWAITING_MSG_PAYLOAD"),
        "AWAITING_MSG_PAYLOAD is missing",
    ),
    "msg_arg_keys_renamed": (
        lambda c, mp: mp.setattr(Parser, "parse", _renamed_keys(Parser.parse)),
        "'id': 7",
    ),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
async def test_a_changed_internal_is_named_in_one_warning_and_keeps_the_public_path(
    change: tuple[Callable[[Client, pytest.MonkeyPatch], None], str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each internal the fast path uses, missing or changed, is reported by name, once."""
    simulate, words = change
    client = Client()
    simulate(client, monkeypatch)
    problem = await fast_path_problem(client)
    assert problem is not None
    assert words in problem
    with caplog.at_level(logging.WARNING, "oncelog.wire"):
        assert not await fast_path(client)
        assert not await fast_path(client)
    assert [vars(r).get("problem") for r in caplog.records if r.name == "oncelog.wire"] == [problem]


class _RenamingParser(Parser):
    """nats-py's parser as a release that renamed Client._process_msg would call it."""

    async def parse(self, data: bytes = b"") -> None:
        client = self.nc
        self.nc = _Renamed(client)
        try:
            await super().parse(data)
        finally:
            self.nc = client


class _Renamed:
    """The client as that parser sees it: `_process_msg` reaches `_dispatch_msg`."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, "_dispatch_msg" if name == "_process_msg" else name)


class _RenamingClient(Client):
    """A client of a (simulated) nats-py release in which `_process_msg` is `_dispatch_msg`."""

    def __init__(self) -> None:
        super().__init__()
        self._ps = _RenamingParser(self)

    def __getattribute__(self, name: str) -> Any:
        if name == "_process_msg":
            raise AttributeError(name)
        return super().__getattribute__(name)

    async def _dispatch_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        await Client._process_msg(self, sid, subject, reply, data, headers)  # noqa: SLF001 - the simulated release's body is nats-py's own


async def _stored(pool: asyncpg.Pool, n: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM events") == n)


def _events(settings: ConsumerSettings, ids: range) -> list[Outbound]:
    subject = f"{settings.subject_prefix}.wire"
    return [
        Outbound(subject, json.dumps({"event_id": f"w-{i}"}).encode(), msg_id("wire", f"w-{i}"))
        for i in ids
    ]


async def test_a_renamed_internal_falls_back_and_the_read_loop_survives(
    settings: ConsumerSettings, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """With Client._process_msg renamed, the check names it in one warning and nats-py's public
    path publishes, delivers, stores and acks; the pull statuses that would have broken the
    read loop on the fast path are read, and the connection never drops."""
    nc = _RenamingClient()
    await nc.connect(servers=[settings.nats_url], **broker.connect_options(settings))
    try:
        js = nc.jetstream()
        await broker.ensure_stream(js, settings)
        await broker.ensure_consumer(js, settings)
        with caplog.at_level(logging.WARNING, "oncelog.wire"):
            acks = await publish_many(
                js, _events(settings, range(20)), deadline=time.monotonic() + 10
            )
            assert len(acks) == 20
            async with running_consumer(settings, js, pool):
                await wait_until(lambda: _stored(pool, 20))
                # A pull request ending (a status message) is read by nats-py, not dropped.
                seen = nc.stats["in_msgs"]

                async def status_read() -> bool:
                    return nc.stats["in_msgs"] > seen

                await wait_until(status_read, within=10)
                await publish_many(
                    js, _events(settings, range(20, 40)), deadline=time.monotonic() + 10
                )
                await wait_until(lambda: _stored(pool, 40))

            async def all_acked() -> bool:
                return (await js.stream_info(settings.stream)).state.messages == 0

            await wait_until(all_acked, within=10)
        assert type(parser_of(nc)) is _RenamingParser
        assert nc.stats["reconnects"] == 0
        problems = [vars(r).get("problem") for r in caplog.records if r.name == "oncelog.wire"]
        assert problems == ["Client._process_msg is missing or not a coroutine function"]
    finally:
        await nc.close()


async def test_the_switch_keeps_receiving_and_publishing_on_nats_pys_public_path(
    nc: Client, js: JetStreamContext, settings: ConsumerSettings, pool: asyncpg.Pool
) -> None:
    """With ONCELOG_FAST_WIRE=0 nothing of nats-py is touched: its parser stays its own, and
    events (a dead letter's headers included) still go through, each acked once."""
    off = msgspec.structs.replace(settings, oncelog_fast_wire=False)
    events = [*_events(off, range(10)), Outbound(f"{off.subject_prefix}.wire", b"{bad", "wire:bad")]
    acks = await publish_many(js, events, deadline=time.monotonic() + 10, fast_wire=False)
    assert [a.seq for a in acks] == list(range(1, 12))
    async with running_consumer(off, js, pool):
        await wait_until(lambda: _stored(pool, 10))

        async def all_acked() -> bool:
            return (await js.stream_info(off.stream)).state.messages == 0

        await wait_until(all_acked, within=10)
    assert type(parser_of(nc)) is Parser
    headers = await pool.fetchval("SELECT headers FROM dead_letters")
    assert json.loads(headers) == {"Nats-Msg-Id": "wire:bad"}


def test_a_msg_from_nats_py_becomes_the_delivery_the_fast_path_makes() -> None:
    """The public path's Msg converts to the same subject, reply, header block and size."""
    raw = b"NATS/1.0\r\nNats-Msg-Id: t:1\r\n\r\n"
    wire = Delivery("events.t", b"$JS.ACK.E.a.1.2.3.4.0", raw, b"{}")
    msg = Msg(Client(), "events.t", "$JS.ACK.E.a.1.2.3.4.0", b"{}", parse_headers(raw))
    converted = Delivery.from_msg(msg)
    assert (converted.subject, converted.reply, converted.raw_headers, converted.data) == (
        wire.subject,
        wire.reply,
        wire.raw_headers,
        wire.data,
    )
    assert converted.size == wire.size
