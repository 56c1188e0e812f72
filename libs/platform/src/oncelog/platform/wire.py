"""The hot paths at wire level: raw deliveries, a fast protocol parser, bulk replies.

nats-py turns every message it receives into a `Msg` through a regular expression, a header
parse, a queue and a task switch: about a third of the consumer's CPU in a drain, and most of
the gateway's when it reads PubAcks. For the subscriptions registered here (the consumer's
pull inbox, the publishers' PubAck inbox) `FastParser` cuts each MSG/HMSG frame out of the
read buffer and hands its parts to a plain function; every other frame and subscription goes
through nats-py exactly as before.

This reaches into nats-py's internals, so it is fenced: the version is pinned in
libs/platform/pyproject.toml, `fast_path` checks once per client that every internal used here
is there with the shape expected (one warning naming what is not, and nats-py's public path
from then on), and callers pass `oncelog_fast_wire` (ONCELOG_FAST_WIRE=0) to stay off it.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import weakref
from collections.abc import Callable, Sequence

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ProtocolError
from nats.protocol import parser as nats_parser
from nats.protocol.parser import Parser

from oncelog.events import parse_headers

__all__ = [
    "Delivery",
    "FastParser",
    "Sink",
    "can_write",
    "fast_path",
    "fast_path_problem",
    "install",
    "respond",
    "route",
    "write",
]

_log = logging.getLogger("oncelog.wire")
_CRLF = b"\r\n"

# The parser's states and line limit, looked up rather than imported: a release that renames
# one is reported by `fast_path_problem` instead of breaking every import of this module.
_AWAITING_CONTROL_LINE: int = getattr(nats_parser, "AWAITING_CONTROL_LINE", -1)
_AWAITING_MSG_PAYLOAD: int = getattr(nats_parser, "AWAITING_MSG_PAYLOAD", -2)
_MAX_CONTROL_LINE_SIZE: int = getattr(nats_parser, "MAX_CONTROL_LINE_SIZE", 4096)

# What a sink gets: subject, reply subject, raw headers (or None) and the body. It returns
# False for a frame it leaves to nats-py (a status message, for instance).
Sink = Callable[[bytes, bytes, bytes | None, bytes], bool]


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

    @classmethod
    def from_msg(cls, msg: Msg) -> Delivery:
        """Return nats-py's Msg as the Delivery the fast path makes of the same frame."""
        headers = msg.headers
        raw = None
        if headers:
            # The block as the server sent it: "NATS/1.0", "Name: value" each, a blank line.
            lines = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())
            raw = b"NATS/1.0\r\n" + lines + b"\r\n"
        return cls(msg.subject, msg.reply.encode(), raw, msg.data)

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
            if self.state == _AWAITING_MSG_PAYLOAD:
                needed = self.needed
                if end - pos < needed + 2:
                    break
                arg = self.msg_arg
                split = pos + self.header_needed
                headers = bytes(buf[pos:split]) if self.header_needed else None
                payload = bytes(buf[split : pos + needed])
                pos += needed + 2
                self.header_needed = 0
                self.state = _AWAITING_CONTROL_LINE
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
                if end - pos > _MAX_CONTROL_LINE_SIZE:
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
        self.state = _AWAITING_MSG_PAYLOAD


# Each client's verdict, reached once: None when the fast path may be used, else why not.
_VERDICTS: weakref.WeakKeyDictionary[Client, str | None] = weakref.WeakKeyDictionary()
# A header control line as the server sends it, and what nats-py's parser must make of it.
_PROBE = b"HMSG a.b 7 r.s 12 15\r\n"
_PROBE_ARG = {"subject": b"a.b", "sid": 7, "reply": b"r.s"}
# The client's coroutines this module calls, with the arguments it calls them with.
_CLIENT_CALLS: tuple[tuple[str, tuple[object, ...]], ...] = (
    ("_process_msg", (7, b"a.b", b"r.s", b"", None)),
    ("_send_command", (b"",)),
    ("_flush_pending", ()),
)
_PARSER_FIELDS = (
    ("buf", bytearray),
    ("state", int),
    ("needed", int),
    ("header_needed", int),
    ("msg_arg", dict),
)


async def fast_path_problem(nc: Client) -> str | None:
    """Name the first nats-py internal the fast path needs that `nc` lacks or has changed.

    None means every one is there: the client's coroutines, its stats, its parser (of nats-py's
    class, with the fields `FastParser` reads), the parser's states, and the `msg_arg` keys
    nats-py's parser sets for a frame it has half read when `install` takes over.
    """
    # Everything is looked up by name, so that a missing member is reported here, at start-up,
    # rather than raised later inside nats-py's read loop.
    for name, args in _CLIENT_CALLS:
        method = getattr(nc, name, None)
        if not inspect.iscoroutinefunction(method):
            return f"Client.{name} is missing or not a coroutine function"
        try:
            inspect.signature(method).bind(*args)
        except TypeError:
            return f"Client.{name} takes other arguments"
    stats = getattr(nc, "stats", None)
    if not isinstance(stats, dict) or not {"in_msgs", "in_bytes", "out_msgs"} <= stats.keys():
        return "Client.stats lacks in_msgs, in_bytes or out_msgs"
    for name in ("AWAITING_CONTROL_LINE", "AWAITING_MSG_PAYLOAD", "MAX_CONTROL_LINE_SIZE"):
        if not isinstance(getattr(nats_parser, name, None), int):
            return f"nats.protocol.parser.{name} is missing"
    parser = getattr(nc, "_ps", None)
    if type(parser) not in (Parser, FastParser):
        return f"Client._ps is {type(parser).__qualname__}, not nats.protocol.parser.Parser"
    if getattr(parser, "nc", None) is not nc:
        return "Client._ps.nc is not the client"
    for name, kind in _PARSER_FIELDS:
        if not isinstance(getattr(parser, name, None), kind):
            return f"Parser.{name} is missing or not a {kind.__name__}"
    probe = Parser(nc)
    try:
        await probe.parse(_PROBE)
        got = (probe.state, probe.msg_arg, probe.needed, probe.header_needed)
        # FastParser takes the place of a live parser by changing its class.
        probe.__class__ = FastParser
    except Exception as exc:  # whatever a changed parser raises, the answer is "not usable"
        return f"Parser fails on a header control line: {exc!r}"
    if got != (_AWAITING_MSG_PAYLOAD, _PROBE_ARG, 15, 12):
        return (
            f"Parser reads a header control line as state, msg_arg, needed, header_needed = {got!r}"
        )
    return None


async def fast_path(nc: Client) -> bool:
    """Whether the fast path works on `nc`: checked once per client, one warning if not."""
    if nc not in _VERDICTS:
        problem = await fast_path_problem(nc)
        _VERDICTS[nc] = problem
        if problem is not None:
            _warn(problem)
    return _VERDICTS[nc] is None


def _warn(problem: str) -> None:
    _log.warning(
        "nats-py is not what the fast wire path was written for; using its public path",
        extra={"problem": problem, "nats_py": importlib.metadata.version("nats-py")},
    )


async def route(nc: Client, sub: Subscription, sink: Sink) -> Callable[[], None] | None:
    """Hand `sub`'s MSG/HMSG frames to `sink` if the fast path works on `nc`; return the undo.

    None means the frames keep nats-py's path and the subscription's callback; why was logged.
    """
    if not await fast_path(nc):
        return None
    try:
        sid = sub._id  # noqa: SLF001 - the sid MSG frames carry; Subscription does not expose it
    except AttributeError:
        sid = None
    if not isinstance(sid, int):
        # The client is then off the fast path for good, writes included: one verdict each.
        _VERDICTS[nc] = problem = "Subscription._id is missing or not an int"
        _warn(problem)
        return None
    return install(nc, sid, sink)


def install(nc: Client, sid: int, sink: Sink) -> Callable[[], None]:
    """Route the frames of subscription `sid` to `sink`; return a function that undoes it.

    Only for a client `fast_path` accepted (`route` checks). The client keeps one parser for its
    lifetime (it is reset, not replaced, on reconnect); should a nats-py release change that,
    frames simply keep their usual path.
    """
    parser = nc._ps  # noqa: SLF001 - the parser nats-py's read loop feeds; fast_path checked it
    if not isinstance(parser, FastParser):
        # The parser keeps its buffer and state: a read half-parsed goes on where it was.
        parser.__class__ = FastParser
        assert isinstance(parser, FastParser)
        parser.sinks = {}
    sinks = parser.sinks
    sinks[sid] = sink
    return lambda: sinks.pop(sid, None) and None


def can_write(nc: Client) -> bool:
    """Whether `write` can put frames on the wire now: connected, and `fast_path` accepted `nc`."""
    return nc.is_connected and _VERDICTS.get(nc, "not checked") is None


async def write(nc: Client, frames: bytes) -> None:
    """Queue protocol frames on the client's outbound buffer and flush them in one write."""
    await nc._send_command(frames)  # noqa: SLF001 - nats-py has no public way to queue raw frames
    await nc._flush_pending()  # noqa: SLF001 - one flush for all the frames just queued


async def respond(
    nc: Client, replies: Sequence[Delivery], body: bytes = b"", *, fast_wire: bool = True
) -> None:
    """Publish `body` to each message's reply subject in one write.

    An empty body is JetStream's +ACK; `-NAK` hands a message back, `+WPI` extends its
    ack_wait. With `fast_wire` off, while disconnected, or where nats-py's internals are not
    as expected, the client's own publish is used (buffered while disconnected); an ack that
    never arrives only means a redelivery.
    """
    subjects = [m.reply for m in replies]
    if not (fast_wire and nc.is_connected and await fast_path(nc)):
        for subject in subjects:
            await nc.publish(subject.decode(), body)
        return
    frame = b"%d\r\n%s\r\n" % (len(body), body)
    await write(nc, b"".join(b"PUB %s %s" % (subject, frame) for subject in subjects))
