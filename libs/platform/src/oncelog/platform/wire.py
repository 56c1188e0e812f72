"""The hot paths at wire level: raw deliveries, a fast protocol parser, bulk replies.

nats-py turns every message it receives into a `Msg` through a regular expression, a header
parse, a queue and a task switch: about a third of the consumer's CPU in a drain, and most of
the gateway's when it reads PubAcks. For the subscriptions registered here (the consumer's
pull inbox, the publishers' PubAck inbox) `FastParser` cuts each MSG/HMSG frame out of the
read buffer and hands its parts to a plain function; every other frame and subscription goes
through nats-py exactly as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from nats.aio.client import Client
from nats.errors import ProtocolError
from nats.protocol.parser import (
    AWAITING_CONTROL_LINE,
    AWAITING_MSG_PAYLOAD,
    MAX_CONTROL_LINE_SIZE,
    Parser,
)

from oncelog.events import parse_headers

__all__ = [
    "Delivered",
    "Delivery",
    "FastParser",
    "Sink",
    "can_write",
    "has_write_hooks",
    "install",
    "reply_bytes",
    "respond",
    "write",
]

_log = logging.getLogger("oncelog.wire")
_CRLF = b"\r\n"

# What a sink gets: subject, reply subject, raw headers (or None) and the body. It returns
# False for a frame it leaves to nats-py (a status message, for instance).
Sink = Callable[[bytes, bytes, bytes | None, bytes], bool]


class Delivered(Protocol):
    """What the consumer needs of a delivered message: a `Delivery`, or nats-py's `Msg`."""

    @property
    def subject(self) -> str: ...
    @property
    def reply(self) -> str | bytes: ...
    @property
    def data(self) -> bytes: ...
    @property
    def headers(self) -> dict[str, str] | None: ...


class Delivery:
    """One message as it came off the wire; headers are parsed only when asked for.

    `size` is subject + reply + header block + body: what JetStream charges against a pull
    request's `max_bytes`.
    """

    __slots__ = ("data", "raw_headers", "reply", "size", "subject")

    def __init__(self, subject: str, reply: bytes, raw_headers: bytes | None, data: bytes) -> None:
        self.subject = subject
        self.reply = reply
        self.raw_headers = raw_headers
        self.data = data
        self.size = len(subject) + len(reply) + len(data) + (len(raw_headers) if raw_headers else 0)

    @property
    def headers(self) -> dict[str, str] | None:
        return parse_headers(self.raw_headers) if self.raw_headers else None


class FastParser(Parser):
    """nats-py's protocol parser, with MSG/HMSG frames of registered sids handed to a sink."""

    def __init__(self, nc: Client) -> None:
        super().__init__(nc)
        self.sinks: dict[int, Sink] = {}

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        pos = 0
        end = len(buf)
        sinks = self.sinks
        stats = self.nc.stats
        while pos < end:
            if self.state == AWAITING_MSG_PAYLOAD:
                needed = self.needed
                if end - pos < needed + 2:
                    break
                arg = self.msg_arg
                split = pos + self.header_needed
                headers = bytes(buf[pos:split]) if self.header_needed else None
                payload = bytes(buf[split : pos + needed])
                pos += needed + 2
                self.header_needed = 0
                self.state = AWAITING_CONTROL_LINE
                sink = sinks.get(arg["sid"])
                if sink is not None and sink(arg["subject"], arg["reply"], headers, payload):
                    stats["in_msgs"] += 1
                    stats["in_bytes"] += len(payload)
                    continue
                del buf[:pos]
                pos, end = 0, len(buf)
                await self.nc._process_msg(  # noqa: SLF001 - nats-py's processing of a frame no sink took
                    arg["sid"], arg["subject"], arg["reply"], payload, headers
                )
                if self.buf is not buf:
                    return  # the client reset the parser (a reconnect) meanwhile
                continue
            eol = buf.find(_CRLF, pos)
            if eol < 0:
                if end - pos > MAX_CONTROL_LINE_SIZE:
                    raise ProtocolError("nats: control line too long")
                break
            if buf.startswith(b"MSG ", pos) or buf.startswith(b"HMSG ", pos):
                self._control_line(bytes(buf[pos:eol]))
                pos = eol + 2
                continue
            # PING, PONG, +OK, -ERR or INFO: nats-py's parser handles that one line.
            line = bytearray(buf[pos : eol + 2])
            del buf[: eol + 2]
            pos, end = 0, len(buf)
            self.buf = line
            await super().parse()
            if self.buf is not line:
                return  # the client reset the parser (a reconnect) meanwhile
            self.buf = buf
        del buf[:pos]

    def _control_line(self, line: bytes) -> None:
        # MSG <subject> <sid> [reply] <size> / HMSG <subject> <sid> [reply] <hdr size> <size>
        parts = line.split()
        try:
            if parts[0] == b"MSG":
                header_size = 0
                total = parts[-1]
                reply = parts[3] if len(parts) == 5 else b""
            else:
                header_size = int(parts[-2])
                total = parts[-1]
                reply = parts[3] if len(parts) == 6 else b""
            self.msg_arg = {"subject": parts[1], "sid": int(parts[2]), "reply": reply}
            self.needed = int(total)
            self.header_needed = header_size
        except (IndexError, ValueError) as exc:
            raise ProtocolError("nats: malformed MSG") from exc
        self.state = AWAITING_MSG_PAYLOAD


def install(nc: Client, sid: int, sink: Sink) -> Callable[[], None]:
    """Route the frames of subscription `sid` to `sink`; return a function that undoes it.

    The client keeps one parser for its lifetime (it is reset, not replaced, on reconnect);
    should a nats-py release change that, frames simply keep their usual path.
    """
    parser = getattr(nc, "_ps", None)
    if not isinstance(parser, Parser):
        _log.warning("nats-py has no protocol parser where expected; using the standard path")
        return lambda: None
    if not isinstance(parser, FastParser):
        # The parser keeps its buffer and state: a read half-parsed goes on where it was.
        parser.__class__ = FastParser
        assert isinstance(parser, FastParser)
        parser.sinks = {}
    sinks = parser.sinks
    sinks[sid] = sink
    return lambda: sinks.pop(sid, None) and None


def reply_bytes(msg: Delivered) -> bytes:
    """Return a message's reply subject as bytes, whichever path delivered it."""
    return msg.reply if isinstance(msg.reply, bytes) else msg.reply.encode()


def has_write_hooks(nc: Client) -> bool:
    """Whether this nats-py release has the two internals `write` relies on."""
    return hasattr(nc, "_send_command") and hasattr(nc, "_flush_pending")


def can_write(nc: Client) -> bool:
    """Whether `write` can put frames on the wire now: connected, with nats-py's hooks."""
    return nc.is_connected and has_write_hooks(nc)


async def write(nc: Client, frames: bytes) -> None:
    """Queue protocol frames on the client's outbound buffer and flush them in one write."""
    await nc._send_command(frames)  # noqa: SLF001 - nats-py has no public way to queue raw frames
    await nc._flush_pending()  # noqa: SLF001 - one flush for all the frames just queued


async def respond(nc: Client, replies: Sequence[Delivered], body: bytes = b"") -> None:
    """Publish `body` to each message's reply subject in one write.

    An empty body is JetStream's +ACK; `-NAK` hands a message back, `+WPI` extends its
    ack_wait. While disconnected, fall back to the client's buffered publish path; an ack
    that never arrives only means a redelivery.
    """
    subjects = [reply_bytes(m) for m in replies]
    if not can_write(nc):
        for subject in subjects:
            await nc.publish(subject.decode(), body)
        return
    frame = b"%d\r\n%s\r\n" % (len(body), body)
    await write(nc, b"".join(b"PUB %s %s" % (subject, frame) for subject in subjects))
