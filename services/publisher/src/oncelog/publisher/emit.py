"""At-least-once publishing: the same Msg-Id on every retry, backoff with jitter, bounded."""

from __future__ import annotations

import asyncio
import heapq
import logging
import sys
import time
from collections import Counter as Tally
from collections.abc import Iterable, Sequence

import msgspec
from nats.js import JetStreamContext
from nats.js.api import PubAck
from prometheus_client import CollectorRegistry, Counter

from oncelog.platform.publish import Outbound, PublishError, publish_many
from oncelog.publisher.generate import Kind, Planned

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
        self.retried = Counter(
            "oncelog_publisher_retries_total", "Publish retries.", registry=registry
        )
        self.failed = Counter(
            "oncelog_publisher_failed_total",
            "Events given up on after every retry.",
            registry=registry,
        )


class Summary(msgspec.Struct, kw_only=True):
    """What one run did."""

    sent: int = 0
    unique: int = 0
    acked: int = 0
    broker_duplicates: int = 0
    errors: int = 0
    retries: int = 0
    old_replays: int = 0
    seconds: float = 0.0
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
        progress: bool = False,
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

    async def run(self, events: Iterable[Planned], count: int, rate: float = 0.0) -> Summary:
        """Publish every planned event; return once each one got a PubAck or ran out of tries."""
        if rate > 0:
            self.chunk_size = max(1, min(self.chunk_size, int(rate * 0.005)))
        self._slots = asyncio.Semaphore(max(1, self.inflight // self.chunk_size))
        started = time.monotonic()
        last_report = started
        pace = 1.0 / rate if rate > 0 else 0.0
        next_at = started
        later: list[tuple[float, int, Outbound]] = []
        for n, (kind, message) in enumerate(events):
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
            if self.progress and time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                self._report(count, started)
        await self._flush()
        while later:
            due, _, message = heapq.heappop(later)
            while (wait := due - time.monotonic()) > 0:
                await self._flush()
                if self.progress:
                    self._report(
                        count, started, f"waiting {wait:.0f}s for the broker's duplicate window"
                    )
                await asyncio.sleep(min(wait, 1.0))
            await self._add("old", message)
        await self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks)
        s = self.summary
        s.seconds = round(time.monotonic() - started, 3)
        s.events_per_second = round(s.sent / s.seconds, 1) if s.seconds else 0.0
        s.duplicates_by_topic = dict(self._dups)
        if self.progress:
            self._report(count, started)
            sys.stderr.write("\n")
        return s

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
                    self._dups[message.topic] += 1
            missing = len(chunk) - sum(ack is not None for ack in acks)
            self.summary.errors += missing
            self.metrics.failed.inc(missing)
        finally:
            self._slots.release()

    def _report(self, count: int, started: float, note: str = "") -> None:
        s = self.summary
        elapsed = max(time.monotonic() - started, 1e-9)
        sys.stderr.write(
            f"\rsent {s.sent}/{count}  acked {s.acked}  broker dups {s.broker_duplicates}  "
            f"errors {s.errors}  {s.sent / elapsed:,.0f} ev/s  {note:<50}"
        )
        sys.stderr.flush()
