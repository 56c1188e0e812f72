"""The live tail's machinery: every stored event once, in the store's commit order, as Server-Sent Events.

One follower per API process reads the rows the store exposes (oncelog.store.tail) after the
last position it handed out, woken by the consumers' NOTIFY after each commit and by a poll, and
hands each row to the streams whose topic pattern matches it. A stream that reconnects with
Last-Event-ID first reads what it missed from the store, then takes the live rows after it.

Memory is bounded: each stream holds at most `tail_buffer` rows. A client that reads slower than
events arrive overflows it; the stream then drops its buffer and reads on from the store, after
the last event it sent, at the pace the client reads (backpressure from the socket), until it
has caught up and takes live rows again. Nothing is skipped and nothing is repeated either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy
from prometheus_client import CollectorRegistry, Counter, Gauge

from oncelog.api import queries
from oncelog.store import tail as store_tail
from oncelog.store.tail import Position

__all__ = [
    "Chunk",
    "Follower",
    "FrameData",
    "Subscription",
    "TailMetrics",
    "events",
    "frame",
    "matcher",
]

_log = logging.getLogger("oncelog.api")

# How many rows one read takes, live or catching up.
READ_BATCH = 500
_encode = msgspec.json.Encoder().encode


def matcher(pattern: str | None) -> tuple[Callable[[str], bool], str | None, tuple[Any, ...]]:
    """Return a test for topics matching `pattern` (a topic or NATS wildcard, already valid) and
    the same condition as SQL with its parameters, from the one rule /events uses."""
    if pattern is None:
        return (lambda _: True), None, ()
    condition, params = queries.topic_filter(pattern, 1)
    if len(params) == 1:
        exact = params[0]
        return (lambda topic: topic == exact), condition, tuple(params)
    # The LIKE prefix only helps the index; the regex alone decides.
    regex = re.compile(params[1])
    return (lambda topic: regex.fullmatch(topic) is not None), condition, tuple(params)


class FrameData(msgspec.Struct):
    """An event as a frame's data: /events' Event field for field, with the payload sent on as
    the JSON text PostgreSQL prints for the stored jsonb rather than decoded and encoded again."""

    topic: str
    event_id: str
    timestamp: datetime
    source: str
    payload: msgspec.Raw


def frame(row: Any) -> bytes:
    """One SSE message: the position as its id, the event as /events returns it as its data.

    Neither msgspec nor PostgreSQL's jsonb output ever writes a raw CR or LF (both escape every
    control character inside strings, and jsonb puts only spaces between tokens), so the data
    is one line whatever it carries.
    """
    data = FrameData(
        row["topic"], row["event_id"], row["ts"], row["source"], msgspec.Raw(row["payload"])
    )
    return b"id: %d-%d\ndata: %s\n\n" % (row["tx"], row["pos"], _encode(data))


def _position(row: Any) -> Position:
    return Position(row["tx"], row["pos"])


# The first wait before reconnecting to the store after losing it.
_FIRST_DELAY = 0.1
# The first second look after a NOTIFY that found nothing exposed yet.
_RECHECK = 0.005

# What a stream's live rows give instead of rows when it fell a whole buffer behind.
_OVERFLOW: Any = object()


class Chunk:
    """Consecutive live rows one read gave a stream: their frames, also joined for one write.

    Streams that take the same rows of a read share one chunk, so a row is framed and joined
    once however many streams send it.
    """

    __slots__ = ("data", "first", "last", "rows")

    def __init__(self, rows: list[tuple[Position, bytes]]) -> None:
        self.rows = rows
        self.first = rows[0][0]
        self.last = rows[-1][0]
        self.data = b"".join([f for _, f in rows])

    def after(self, position: Position) -> tuple[int, bytes]:
        """How many rows come after `position`, and their frames."""
        if self.first > position:
            return len(self.rows), self.data
        rest = [f for p, f in self.rows if p > position]
        return len(rest), b"".join(rest)


class Subscription:
    """One client's subscription: its topic test and a bounded buffer of live rows."""

    def __init__(self, matches: Callable[[str], bool], events: int, size: int) -> None:
        self.matches = matches
        # The buffer holds at most this many events and this many bytes of frames.
        self.max_events = events
        self.max_bytes = size
        self.chunks: deque[Chunk] = deque()
        self.events = self.bytes = 0
        self.ready = asyncio.Event()
        # Everything at or before this position is the store's to read; after it, the buffer's.
        self.live_from: Position = store_tail.ORIGIN
        self.overflowed = False

    def offer(self, chunk: Chunk) -> None:
        """Buffer live rows; when they would overflow the buffer, drop it and stop buffering
        until restarted (the stream then reads on from the store)."""
        if self.overflowed:
            return
        events, size = self.events + len(chunk.rows), self.bytes + len(chunk.data)
        if events > self.max_events or size > self.max_bytes:
            self.overflowed = True
            self.clear()
        else:
            self.chunks.append(chunk)
            self.events, self.bytes = events, size
        self.ready.set()

    def take(self) -> list[Chunk]:
        """Return and clear what the buffer holds."""
        chunks = list(self.chunks)
        self.clear()
        return chunks

    def clear(self) -> None:
        self.chunks.clear()
        self.events = self.bytes = 0
        self.ready.clear()


class Follower:
    """Follows the store's exposed positions for this process and feeds the open streams."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        poll_seconds: float,
        max_streams: int,
        buffer: int,
        buffer_bytes: int,
        on_count: Callable[[int], None] = lambda _: None,
    ) -> None:
        self.pool = pool
        self.poll_seconds = poll_seconds
        self.max_streams = max_streams
        self.buffer = buffer
        self.buffer_bytes = buffer_bytes
        self.on_count = on_count
        self.streams: set[Subscription] = set()
        # Where the live rows handed out end; None while nothing follows the store.
        self.position: Position | None = None
        self._synced = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._delay = _FIRST_DELAY

    @property
    def full(self) -> bool:
        """Whether another stream would exceed the cap."""
        return len(self.streams) >= self.max_streams

    async def open(self, matches: Callable[[str], bool], wait: float) -> Subscription:
        """Register a stream; its live rows start after the position it is given."""
        stream = Subscription(matches, self.buffer, self.buffer_bytes)
        self.streams.add(stream)
        self.on_count(len(self.streams))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._follow(), name="oncelog-tail")
        try:
            async with asyncio.timeout(wait):
                await self._synced.wait()
        except BaseException:
            self.close(stream)
            raise
        self.restart(stream)
        return stream

    def restart(self, stream: Subscription) -> None:
        """(Re)start a stream's live rows after the current position, with an empty buffer."""
        assert self.position is not None
        stream.clear()
        stream.overflowed = False
        stream.live_from = self.position

    def close(self, stream: Subscription) -> None:
        """Unregister a stream; the last one out stops following the store."""
        self.streams.discard(stream)
        self.on_count(len(self.streams))
        if not self.streams and self._task is not None:
            self._task.cancel()
            self._task = None
            self.position = None
            self._synced.clear()

    async def stop(self) -> None:
        """Stop following (at shutdown)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _notified(self, *_: Any) -> None:
        self._wake.set()

    async def _follow(self) -> None:
        while True:
            try:
                async with self.pool.acquire() as conn:
                    await self._listen(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("live tail: store unreachable, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(self._delay)
                self._delay = min(self._delay * 2, 5.0)
            else:  # pragma: no cover - _listen returns only by raising
                return

    async def _listen(self, conn: PoolConnectionProxy[Any]) -> None:
        await conn.add_listener(store_tail.NOTIFY_CHANNEL, self._notified)
        self._delay = _FIRST_DELAY
        try:
            if self.position is None:
                self.position = await store_tail.head(conn)
                self._synced.set()
            # After a NOTIFY whose rows are not exposed yet (an older transaction is still
            # open), look again soon, then less and less often, up to the poll interval.
            recheck: float | None = None
            while True:
                self._wake.clear()
                got, full = await self._read(conn)
                if full:
                    # More may be exposed already.
                    continue
                if got:
                    # Rows of a commit that NOTIFYed meanwhile are read on its wake; rows that
                    # an older open transaction still hid are read on the recheck.
                    recheck = _RECHECK
                woke = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(recheck or self.poll_seconds):
                        woke = await self._wake.wait()
                if woke:
                    recheck = _RECHECK
                elif recheck is not None:
                    recheck = recheck * 2 if recheck * 2 < self.poll_seconds else None
        finally:
            with contextlib.suppress(Exception):
                await conn.remove_listener(store_tail.NOTIFY_CHANNEL, self._notified)

    async def _read(self, conn: PoolConnectionProxy[Any]) -> tuple[int, bool]:
        """Hand out the next exposed rows; return how many there were, and whether the read
        was full (in rows or in bytes), so that more may be waiting."""
        assert self.position is not None
        rows = await store_tail.read_after(conn, self.position, READ_BATCH)
        if not rows:
            return 0, False
        # No await from here on: a stream registered now starts after these rows. Each row is
        # framed once, however many streams take it, and each stream's pattern is tested once
        # per topic of the batch, not once per row.
        topics = {row["topic"] for row in rows}
        takers = [(stream, {t for t in topics if stream.matches(t)}) for stream in self.streams]
        wanted = set().union(*(taken for _, taken in takers))
        framed = [
            (row["topic"], (_position(row), frame(row))) for row in rows if row["topic"] in wanted
        ]
        chunks: dict[frozenset[str], Chunk] = {}
        for stream, taken in takers:
            if not taken:
                continue
            key = frozenset(taken)
            chunk = chunks.get(key)
            if chunk is None:
                every = taken == topics
                chunk = chunks[key] = Chunk(
                    [item for topic, item in framed if every or topic in taken]
                )
            stream.offer(chunk)
        self.position = _position(rows[-1])
        return len(rows), store_tail.more_after(rows, READ_BATCH)


async def events(
    follower: Follower,
    stream: Subscription,
    after: Position | None,
    condition: tuple[str | None, tuple[Any, ...]],
    connection: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
    keepalive: float,
    *,
    on_resync: Callable[[], None] = lambda: None,
    on_sent: Callable[[int], None] = lambda _: None,
    closing: asyncio.Event | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body of one stream: what the store holds after `after`, then the live rows.

    Rows go out a page (or whatever is buffered) per write. It ends when `closing` is set (the
    server is stopping): the client reconnects with the last id it got, to this process or
    another, and misses nothing.
    """
    sql, params = condition
    closing = closing or asyncio.Event()
    last = after if after is not None else stream.live_from
    # How long EventSource waits before reconnecting, in milliseconds.
    yield b"retry: 1000\n\n"
    try:
        while not closing.is_set():
            # Catch up from the store up to where the live rows begin.
            while last < stream.live_from and not closing.is_set():
                async with connection() as conn:
                    rows = await store_tail.read_after(
                        conn, last, READ_BATCH, until=stream.live_from, condition=sql, params=params
                    )
                if not rows:
                    break
                yield b"".join(map(frame, rows))
                on_sent(len(rows))
                last = _position(rows[-1])
            async for batch in _live(stream, closing, keepalive):
                if batch is None:
                    yield b": keep-alive\n\n"
                    continue
                if batch is _OVERFLOW:
                    # Too slow for the live rows: read on from the store after `last` instead.
                    on_resync()
                    follower.restart(stream)
                    break
                # Only the first chunks can hold rows at or before `last` (those the catch-up
                # read already sent).
                fresh = [c for c in batch if c.last > last]
                if fresh:
                    sent, head = fresh[0].after(last)
                    rest = fresh[1:]
                    yield b"".join([head, *(c.data for c in rest)]) if rest else head
                    on_sent(sent + sum(len(c.rows) for c in rest))
                    last = fresh[-1].last
    finally:
        follower.close(stream)


async def _live(
    stream: Subscription, closing: asyncio.Event, keepalive: float
) -> AsyncIterator[Any]:
    """Yield the stream's buffered rows as soon as there are any; None after `keepalive`
    seconds without one; _OVERFLOW, then stop, when it fell behind; stop when `closing` is set."""
    stopping = asyncio.ensure_future(closing.wait())
    try:
        while True:
            if not stream.ready.is_set():
                # The event is the state; a wait cancelled here loses nothing.
                waiting = asyncio.ensure_future(stream.ready.wait())
                done, _ = await asyncio.wait(
                    {waiting, stopping}, timeout=keepalive, return_when=asyncio.FIRST_COMPLETED
                )
                waiting.cancel()
                if stopping in done:
                    return
                if not stream.ready.is_set():
                    yield None
                    continue
            if stream.overflowed:
                yield _OVERFLOW
                return
            yield stream.take()
    finally:
        stopping.cancel()


class TailMetrics:
    """What the live tail exports, on the API's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.streams = Gauge(
            "oncelog_tail_streams",
            "Live-tail streams (GET /events/stream) open in this process.",
            registry=registry,
        )
        self.sent = Counter(
            "oncelog_tail_events_sent_total",
            "Events sent to live-tail streams.",
            registry=registry,
        )
        self.resyncs = Counter(
            "oncelog_tail_resyncs_total",
            "Times a stream fell a whole buffer behind and read on from the store.",
            registry=registry,
        )
        self.refused = Counter(
            "oncelog_tail_refused_total",
            "Streams refused with 503 because TAIL_MAX_STREAMS were open.",
            registry=registry,
        )
