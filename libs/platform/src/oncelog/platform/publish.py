"""At-least-once publishing: the same Msg-Id on every retry, within a deadline."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from oncelog.platform.wire import can_write, fast_path, route, write

__all__ = ["RETRYABLE", "Outbound", "PublishError", "check_frame", "publish_many"]

_log = logging.getLogger("oncelog.publish")

# Failures worth another try with the same Msg-Id: the broker may or may not have stored the
# message, and its duplicate window makes the retry safe either way. A full stream (discard=new)
# answers with an APIError, so it is retried too until the deadline.
RETRYABLE = (
    TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.APIError,
)


class PublishError(Exception):
    """The broker did not acknowledge a message before the deadline; the cause is the last error.

    `acks` holds what did arrive, in the order of the messages (None where none came), so a
    caller can still account for the duplicates the broker reported.
    """

    def __init__(self, message: str, acks: Sequence[PubAck | None] = ()) -> None:
        super().__init__(message)
        self.acks = list(acks)


class Outbound(NamedTuple):
    """One message to publish: subject, body, broker dedup id, and the event it carries."""

    subject: str
    body: bytes
    msg_id: str
    # What callers count PubAcks by (broker duplicates per topic, the replayed event); the
    # wire never reads these, so a message built from a subject and Msg-Id alone may omit them.
    topic: str = ""
    event_id: str = ""


async def publish_many(
    js: JetStreamContext,
    messages: Sequence[Outbound],
    *,
    deadline: float,
    attempt_timeout: float = 2.0,
    backoff_cap: float = 1.0,
    on_retry: Callable[[int], None] | None = None,
    fast_wire: bool = True,
) -> list[PubAck]:
    """Publish every message and wait for all PubAcks; return them in the order given.

    All messages go out back to back, replies to one wildcard inbox per client (see
    `_AckInbox`), and their acks are awaited together, which costs a fraction of one
    request-reply per message. Messages without an ack (timeout, error, full stream) are sent
    again with the same Msg-Id, under jittered backoff, until `deadline` (monotonic) passes;
    then PublishError names how many are missing. `on_retry` hears how many are sent again.
    With `fast_wire` off (ONCELOG_FAST_WIRE=0), only nats-py's `publish_async` is used.
    """
    acks: list[PubAck | None] = [None] * len(messages)
    todo = list(range(len(messages)))
    attempt = 0
    last: BaseException | None = None
    while todo:
        attempt += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PublishError(
                f"{len(todo)} of {len(messages)} messages got no PubAck", acks
            ) from last
        sent, last = await _send(js, messages, todo, remaining, fast_wire)
        if isinstance(sent, _Slice):
            await sent.wait(min(attempt_timeout, remaining))
            last = sent.collect(todo, acks) or last
        elif sent:
            done, pending = await asyncio.wait(sent, timeout=min(attempt_timeout, remaining))
            for future in pending:
                future.cancel()
            last = _collect(done, sent, acks) or last
        todo = [i for i in todo if acks[i] is None]
        if todo:
            if on_retry is not None:
                on_retry(len(todo))
            delay = random.uniform(0, min(backoff_cap, 0.02 * 2**attempt))
            if time.monotonic() + delay >= deadline:
                raise PublishError(
                    f"{len(todo)} of {len(messages)} messages got no PubAck", acks
                ) from last
            await asyncio.sleep(delay)
    return [ack for ack in acks if ack is not None]


async def _send(
    js: JetStreamContext,
    messages: Sequence[Outbound],
    todo: list[int],
    remaining: float,
    fast_wire: bool,
) -> tuple[_Slice | dict[asyncio.Future[PubAck], int], BaseException | None]:
    """Publish the messages `todo` names; return what their acks arrive in and any send error.

    That is one `_Slice` on the fast path, a future per message on nats-py's.
    """
    futures: dict[asyncio.Future[PubAck], int] = {}
    for i in todo:
        check_frame(messages[i])
    try:
        async with asyncio.timeout(remaining):
            nc = _client_of(js) if fast_wire else None
            inbox = await _AckInbox.of(nc) if nc is not None else None
            if inbox is not None and inbox.can_send([messages[i] for i in todo]):
                return await inbox.send(messages, todo), None
            # No wait_stall: nats-py would wrap every message in asyncio.wait_for, which
            # yields to the loop and so flushes the socket once per message.
            for i in todo:
                m = messages[i]
                future = await js.publish_async(
                    m.subject, m.body, headers={"Nats-Msg-Id": m.msg_id}
                )
                futures[future] = i
    except RETRYABLE as exc:
        return futures, exc
    return futures, None


def _client_of(js: JetStreamContext) -> Client | None:
    """Return the context's connection; None, warned once per context, where nats-py hid it."""
    try:
        return js._nc  # noqa: SLF001 - JetStreamContext has no public accessor for its connection
    except AttributeError:
        if js not in _HIDDEN:
            _HIDDEN.add(js)
            _log.warning(
                "JetStreamContext._nc is missing; publishing on nats-py's public path",
                extra={"problem": "JetStreamContext._nc is missing"},
            )
        return None


def check_frame(message: Outbound) -> None:
    """Raise ValueError unless the subject and Msg-Id can go into a protocol frame unchanged.

    A subject is printable ASCII without spaces; a Msg-Id is printable ASCII with no space at
    either end (what `oncelog.events.msg_id` makes). Anything else would break the frame (a line
    break ends it) or be altered on the way (clients and server trim header values), so it is
    refused here, before a byte is written, whoever called.
    """
    subject, msg_id = message.subject, message.msg_id
    if not (subject.isascii() and subject.isprintable() and subject and " " not in subject):
        raise ValueError(f"subject {subject[:80]!r} cannot go into a NATS frame")
    if not (msg_id.isascii() and msg_id.isprintable() and msg_id and msg_id.strip() == msg_id):
        raise ValueError(f"Msg-Id {msg_id[:80]!r} cannot go into a NATS header unchanged")


class _Ack(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    domain: str | None = None
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(_Ack).decode
_NO_RESPONDERS = b"NATS/1.0 503"
_SWEEP_AT = 10_000
# One ack inbox per client, for as long as the client lives (None: no fast path on it).
_INBOXES: weakref.WeakKeyDictionary[Client, _AckInbox | None] = weakref.WeakKeyDictionary()
# Contexts whose connection this nats-py keeps elsewhere, warned about once each.
_HIDDEN: weakref.WeakSet[JetStreamContext] = weakref.WeakSet()


class _Slice:
    """The PubAcks of one write, filled in by the read loop; one future for them all.

    A future per message, awaited with asyncio.wait, costs a done-callback and a trip through
    the event loop for every ack; here the read loop files each ack in its place and wakes the
    caller once, when the last one is in (or the wait ends first, and late acks are dropped).
    """

    __slots__ = ("acks", "done", "errors", "left")

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.acks: list[PubAck | None] = [None] * size
        self.errors: dict[int, BaseException] = {}
        self.left = size
        self.done: asyncio.Future[None] = loop.create_future()

    def resolve(self, position: int, ack: PubAck | None, error: BaseException | None) -> None:
        """File what came for the message at `position`; wake the caller after the last."""
        if error is not None:
            self.errors[position] = error
        else:
            self.acks[position] = ack
        self.left -= 1
        if not self.left:
            self.done.set_result(None)

    async def wait(self, within: float) -> None:
        """Wait until every message has its answer or `within` seconds pass; then take no more."""
        try:
            await asyncio.wait((self.done,), timeout=within)
        finally:
            # Closed, so a late ack (the caller has moved on, or sends the message again
            # under a new token) is dropped, and the sweep forgets its token.
            self.done.cancel()

    def collect(self, todo: list[int], acks: list[PubAck | None]) -> BaseException | None:
        """Store the acks that arrived at their messages' places in `acks`; return the last
        retryable error, raise any other."""
        last: BaseException | None = None
        for position, i in enumerate(todo):
            ack = self.acks[position]
            if ack is not None:
                acks[i] = ack
            elif (error := self.errors.get(position)) is not None:
                if not isinstance(error, RETRYABLE):
                    raise error
                last = error
        return last


class _AckInbox:
    """PubAcks of one client on one wildcard subscription, read straight off the wire.

    nats-py's publish_async costs a NUID, a future with callbacks, a header dict encoded per
    message and a Msg plus json.loads per ack: most of the gateway's CPU. Here a batch is one
    write of HPUB frames, and each ack is decoded by msgspec in the read loop.
    """

    def __init__(self, nc: Client, prefix: bytes) -> None:
        self.nc = nc
        self.prefix = prefix
        # Each token's slice and place in it, until its ack arrives or the slice is closed.
        self.pending: dict[bytes, tuple[_Slice, int]] = {}
        self.tokens = itertools.count()

    @classmethod
    async def of(cls, nc: Client) -> _AckInbox | None:
        """Return the client's inbox, subscribing it on first use; None where unsupported."""
        if nc in _INBOXES:
            return _INBOXES[nc]
        inbox: _AckInbox | None = None
        # Decided once per client, connected or not: whether nats-py's internals are as expected.
        if await fast_path(nc):
            subject = nc.new_inbox()
            inbox = cls(nc, subject.encode() + b".")
            sub = await nc.subscribe(subject + ".*", cb=inbox._on_msg)
            # Should the frames keep nats-py's path after all, _on_msg reads the same acks.
            await route(nc, sub, inbox._on_frame)
        _INBOXES[nc] = inbox
        return inbox

    def can_send(self, messages: Sequence[Outbound]) -> bool:
        """Whether the fast path applies: connected, and nothing nats-py would refuse."""
        nc = self.nc
        if not can_write(nc) or nc.is_draining_pubs:
            return False
        limit = nc.max_payload - 256
        return all(len(m.body) + len(m.msg_id) < limit for m in messages)

    async def send(self, messages: Sequence[Outbound], todo: list[int]) -> _Slice:
        """Write one HPUB frame per message in one go; return the slice their acks fill."""
        if len(self.pending) > _SWEEP_AT:
            # Tokens of slices given up on (their wait ended before the ack) are dropped here.
            self.pending = {t: e for t, e in self.pending.items() if not e[0].done.done()}
        batch = _Slice(len(todo), asyncio.get_running_loop())
        pending = self.pending
        frames: list[bytes] = []
        for position, i in enumerate(todo):
            m = messages[i]
            token = b"%x" % next(self.tokens)
            pending[token] = (batch, position)
            header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % m.msg_id.encode()
            frames.append(
                b"HPUB %s %s%s %d %d\r\n%s%s\r\n"
                % (
                    m.subject.encode(),
                    self.prefix,
                    token,
                    len(header),
                    len(header) + len(m.body),
                    header,
                    m.body,
                )
            )
        self.nc.stats["out_msgs"] += len(frames)
        try:
            await write(self.nc, b"".join(frames))
        except BaseException:
            batch.done.cancel()  # nothing waits for these acks: their tokens are swept
            raise
        return batch

    def _on_frame(self, subject: bytes, reply: bytes, headers: bytes | None, data: bytes) -> bool:
        status = headers[:12] if headers is not None and not data else None
        self._resolve(subject[len(self.prefix) :], status == _NO_RESPONDERS, data)
        return True

    async def _on_msg(self, msg: Msg) -> None:
        no_responders = (msg.headers or {}).get("Status") == "503" and not msg.data
        self._resolve(msg.subject.encode()[len(self.prefix) :], no_responders, msg.data)

    def _resolve(self, token: bytes, no_responders: bool, data: bytes) -> None:
        entry = self.pending.pop(token, None)
        if entry is None or entry[0].done.done():
            return
        batch, position = entry
        if no_responders:
            batch.resolve(position, None, nats.js.errors.NoStreamResponseError())
            return
        try:
            ack = _decode_ack(data)
        except msgspec.DecodeError:
            error = nats.js.errors.APIError(description=f"bad PubAck {data[:200]!r}")
            batch.resolve(position, None, error)
            return
        if ack.error is not None:
            try:
                nats.js.errors.APIError.from_error(ack.error)
            except nats.js.errors.APIError as exc:
                batch.resolve(position, None, exc)
            return
        batch.resolve(
            position,
            PubAck(stream=ack.stream, seq=ack.seq, domain=ack.domain, duplicate=ack.duplicate),
            None,
        )


def _collect(
    done: set[asyncio.Future[PubAck]],
    futures: dict[asyncio.Future[PubAck], int],
    acks: list[PubAck | None],
) -> BaseException | None:
    """Store the acks that arrived; return the last retryable error, raise any other."""
    last: BaseException | None = None
    for future in done:
        if future.cancelled():
            continue
        error = future.exception()
        if error is None:
            acks[futures[future]] = future.result()
        elif isinstance(error, RETRYABLE):
            last = error
        else:
            raise error
    return last
