"""At-least-once publishing: the same Msg-Id on every retry, backoff with jitter, bounded."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import Counter as Tally
from collections.abc import Iterable, Sequence

import msgspec
from nats.js import JetStreamContext
from nats.js.api import PubAck
from prometheus_client import CollectorRegistry, Counter

from oncelog.platform.publish import Outbound, PublishError, publish_many
from oncelog.publisher.generate import Kind, Planned
from oncelog.publisher.progress import Progress

__all__ = ["Emitter", "PublisherMetrics", "Summary"]

_log = logging.getLogger("oncelog.publisher")


class PublisherMetrics:
    """What the publisher exports while it runs."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter("oncelog_publisher_sent_total", "Events attempted.", registry=registry)
        self.acked = Counter(
            "oncelog_publisher_acked_total",
            "PubAcks received (duplicates included).",
            registry=registry,
        )
        self.duplicates = Counter(
            "oncelog_publisher_broker_duplicates_total",
            "PubAcks with duplicate=true: the broker dropped the message.",
            registry=registry,
        )
        # The name, label and help text the API and the consumer export, so one query sums
        # every layer's duplicates across services; the broker's series exists from the start.
        self.dropped = Counter(
            "oncelog_duplicates_total",
            "Duplicates dropped, by the layer that dropped them.",
            ["layer"],
            registry=registry,
        )
        self.dropped_by_broker = self.dropped.labels("broker")
        self.retried = Counter(
            "oncelog_publisher_retries_total", "Publish retries.", registry=registry
        )
        self.failed = Counter(
            "oncelog_publisher_failed_total",
            "Events given up on after every retry.",
            registry=registry,
        )


class Summary(msgspec.Struct, kw_only=True):
    """What one run did.

    `seconds` is the wall time, `wait_seconds` the part of it spent idle waiting for the broker's
    duplicate window to pass before replays, and `events_per_second` is `sent` over the rest
    (`publish_seconds`), the time actually spent publishing.
    """

    sent: int = 0
    unique: int = 0
    acked: int = 0
    broker_duplicates: int = 0
    errors: int = 0
    retries: int = 0
    old_replays: int = 0
    # Planned messages never sent because the run was stopped (SIGINT or SIGTERM), and how
    # many of them were replays held back for the duplicate window.
    unsent: int = 0
    skipped_replays: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    publish_seconds: float = 0.0
    events_per_second: float = 0.0
    duplicates_by_topic: dict[str, int] = msgspec.field(default_factory=dict)


class Emitter:
    """Publishes planned events in chunks, with bounded messages in flight and an optional rate.

    A chunk goes out back to back and its PubAcks are awaited together (publish_many), which
    costs far less than one request-reply per event. With a rate, a chunk holds 5 ms of events.
    """

    def __init__(
        self,
        js: JetStreamContext,
        *,
        window_seconds: float,
        inflight: int = 256,
        timeout: float = 5.0,
        max_attempts: int = 10,
        metrics: PublisherMetrics | None = None,
        progress: Progress | None = None,
        fast_wire: bool = True,
    ) -> None:
        self.js = js
        self.window = window_seconds
        self.inflight = inflight
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.fast_wire = fast_wire
        self.metrics = metrics or PublisherMetrics(CollectorRegistry())
        self.progress = progress
        self.summary = Summary()
        self.chunk_size = min(inflight, 256)
        self._slots = asyncio.Semaphore(1)
        self._chunk: list[Outbound] = []
        self._dups: Tally[str] = Tally()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        self._waited = 0.0

    async def run(
        self,
        events: Iterable[Planned],
        count: int,
        rate: float = 0.0,
        stop: asyncio.Event | None = None,
    ) -> Summary:
        """Publish every planned event; return once each one got a PubAck or ran out of tries.

        Once `stop` is set nothing more is sent: the PubAcks in flight are awaited, and the
        messages left are counted as unsent.
        """
        stop = stop or asyncio.Event()
        if rate > 0:
            self.chunk_size = max(1, min(self.chunk_size, int(rate * 0.005)))
        self._slots = asyncio.Semaphore(max(1, self.inflight // self.chunk_size))
        self._started = started = time.monotonic()
        pace = 1.0 / rate if rate > 0 else 0.0
        next_at = started
        later: list[tuple[float, int, Outbound]] = []
        for n, (kind, message) in enumerate(events):
            if stop.is_set():
                break
            if kind == "old":
                # Due once the broker has surely forgotten the original's Msg-Id.
                heapq.heappush(later, (time.monotonic() + self.window + 1.0, n, message))
                continue
            while later and later[0][0] <= time.monotonic():
                await self._add("old", heapq.heappop(later)[2])
            if pace:
                next_at += pace
                if (delay := next_at - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
            await self._add(kind, message)
            if self.progress is not None and self.progress.due():
                self.progress.report(self._line(count))
        await self._flush()
        if later and not stop.is_set():
            await self._wait_and_replay(later, count, stop)
        await self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks)
        s = self.summary
        s.unsent = count - s.sent
        s.skipped_replays = len(later)
        s.seconds = round(time.monotonic() - started, 3)
        s.wait_seconds = round(self._waited, 3)
        s.publish_seconds = round(max(s.seconds - s.wait_seconds, 0.0), 3)
        s.events_per_second = round(s.sent / s.publish_seconds, 1) if s.publish_seconds else 0.0
        s.duplicates_by_topic = dict(self._dups)
        if self.progress is not None:
            self.progress.report(self._line(count))
            self.progress.close()
        return s

    async def _wait_and_replay(
        self, later: list[tuple[float, int, Outbound]], count: int, stop: asyncio.Event
    ) -> None:
        """Send the replays held back for the duplicate window, each once it is due."""
        end = max(due for due, _, _ in later)
        if self.progress is not None and end - time.monotonic() > 1.0:
            self.progress.notice(
                f"{len(later):,} replays wait until the broker's {self.window:g} s duplicate "
                "window has passed for their originals, so that the store's permanent layer "
                f"drops them: about {end - time.monotonic():.0f} s "
                "(Ctrl-C skips them; --replay-old 0 plans none)"
            )
        while later and not stop.is_set():
            if later[0][0] > time.monotonic():
                # Idle until the next replay is due: let what is in flight finish first, so
                # the time counted as waiting holds no publishing.
                await self._flush()
                if self._tasks:
                    await asyncio.gather(*self._tasks)
                while (wait := later[0][0] - time.monotonic()) > 0 and not stop.is_set():
                    if self.progress is not None and self.progress.due():
                        self.progress.report(
                            self._line(
                                count,
                                f"waiting {end - time.monotonic():.0f} s for the duplicate "
                                f"window, then {len(later):,} replays (Ctrl-C skips them)",
                            )
                        )
                    idle_from = time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), min(wait, 1.0))
                    self._waited += time.monotonic() - idle_from
                continue
            await self._add("old", heapq.heappop(later)[2])

    async def _add(self, kind: Kind, message: Outbound) -> None:
        self.summary.sent += 1
        self.metrics.sent.inc()
        if kind == "new":
            self.summary.unique += 1
        elif kind == "old":
            self.summary.old_replays += 1
        self._chunk.append(message)
        if len(self._chunk) >= self.chunk_size:
            await self._flush()

    async def _flush(self) -> None:
        if not self._chunk:
            return
        chunk, self._chunk = self._chunk, []
        await self._slots.acquire()
        task = asyncio.create_task(self._send_chunk(chunk))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _retried(self, n: int) -> None:
        self.summary.retries += n
        self.metrics.retried.inc(n)

    async def _send_chunk(self, chunk: list[Outbound]) -> None:
        try:
            acks: Sequence[PubAck | None]
            try:
                acks = await publish_many(
                    self.js,
                    chunk,
                    deadline=time.monotonic() + self.timeout * self.max_attempts,
                    attempt_timeout=self.timeout,
                    fast_wire=self.fast_wire,
                    on_retry=self._retried,
                )
            except PublishError as exc:
                acks = exc.acks
                _log.error(
                    "giving up on events", extra={"missing": str(exc), "error": repr(exc.__cause__)}
                )
            for message, ack in zip(chunk, acks, strict=False):
                if ack is None:
                    continue
                self.summary.acked += 1
                self.metrics.acked.inc()
                if ack.duplicate:
                    self.summary.broker_duplicates += 1
                    self.metrics.duplicates.inc()
                    self.metrics.dropped_by_broker.inc()
                    self._dups[message.topic] += 1
            missing = len(chunk) - sum(ack is not None for ack in acks)
            self.summary.errors += missing
            self.metrics.failed.inc(missing)
        finally:
            self._slots.release()

    def _line(self, count: int, note: str = "") -> str:
        s = self.summary
        busy = max(time.monotonic() - self._started - self._waited, 1e-9)
        line = (
            f"sent {s.sent:,}/{count:,}  acked {s.acked:,}  broker dups {s.broker_duplicates:,}  "
            f"errors {s.errors:,}  {s.sent / busy:,.0f} ev/s while publishing"
        )
        return f"{line}  {note}" if note else line
