"""At-least-once publishing: the same Msg-Id on every retry, backoff with jitter, bounded."""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import sys
import time
from collections import Counter as Tally
from collections.abc import Iterable

import msgspec
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter

from oncelog.events import msg_id, subject_for
from oncelog.platform.publish import RETRYABLE
from oncelog.publisher.generate import Planned

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
    """Publishes planned events with bounded concurrency and an optional rate."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        prefix: str,
        window_seconds: float,
        inflight: int = 256,
        timeout: float = 5.0,
        max_attempts: int = 10,
        metrics: PublisherMetrics | None = None,
        progress: bool = False,
    ) -> None:
        self.js = js
        self.prefix = prefix
        self.window = window_seconds
        self.inflight = asyncio.Semaphore(inflight)
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.metrics = metrics or PublisherMetrics(CollectorRegistry())
        self.progress = progress
        self.summary = Summary()
        self._dups: Tally[str] = Tally()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, events: Iterable[Planned], count: int, rate: float = 0.0) -> Summary:
        """Publish every planned event; return once each one got a PubAck or ran out of tries."""
        started = time.monotonic()
        last_report = started
        pace = 1.0 / rate if rate > 0 else 0.0
        next_at = started
        later: list[tuple[float, int, Planned]] = []
        for n, planned in enumerate(events):
            if planned.kind == "old":
                # Due once the broker has surely forgotten the original's Msg-Id.
                heapq.heappush(later, (time.monotonic() + self.window + 1.0, n, planned))
                continue
            while later and later[0][0] <= time.monotonic():
                await self._start(heapq.heappop(later)[2])
            if pace:
                next_at += pace
                if (delay := next_at - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
            await self._start(planned)
            if self.progress and time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                self._report(count, started)
        while later:
            due, _, planned = heapq.heappop(later)
            while (wait := due - time.monotonic()) > 0:
                if self.progress:
                    self._report(
                        count, started, f"waiting {wait:.0f}s for the broker's duplicate window"
                    )
                await asyncio.sleep(min(wait, 1.0))
            await self._start(planned)
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

    async def _start(self, planned: Planned) -> None:
        await self.inflight.acquire()
        self.summary.sent += 1
        self.metrics.sent.inc()
        if planned.kind == "new":
            self.summary.unique += 1
        elif planned.kind == "old":
            self.summary.old_replays += 1
        task = asyncio.create_task(self._publish(planned))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, planned: Planned) -> None:
        try:
            subject = subject_for(planned.topic, self.prefix)
            headers = {"Nats-Msg-Id": msg_id(planned.topic, planned.event_id)}
            for attempt in range(1, self.max_attempts + 1):
                try:
                    ack = await self.js.publish(
                        subject, planned.body, timeout=self.timeout, headers=dict(headers)
                    )
                except RETRYABLE as exc:
                    if attempt == self.max_attempts:
                        self.summary.errors += 1
                        self.metrics.failed.inc()
                        _log.error(
                            "giving up on an event",
                            extra={
                                "topic": planned.topic,
                                "event_id": planned.event_id,
                                "error": repr(exc),
                            },
                        )
                        return
                    self.summary.retries += 1
                    self.metrics.retried.inc()
                    # Full jitter over an exponential ceiling, so retries of many publishers spread out.
                    await asyncio.sleep(random.uniform(0, min(5.0, 0.05 * 2**attempt)))
                    continue
                self.summary.acked += 1
                self.metrics.acked.inc()
                if ack.duplicate:
                    self.summary.broker_duplicates += 1
                    self.metrics.duplicates.inc()
                    self._dups[planned.topic] += 1
                return
        finally:
            self.inflight.release()

    def _report(self, count: int, started: float, note: str = "") -> None:
        s = self.summary
        elapsed = max(time.monotonic() - started, 1e-9)
        sys.stderr.write(
            f"\rsent {s.sent}/{count}  acked {s.acked}  broker dups {s.broker_duplicates}  "
            f"errors {s.errors}  {s.sent / elapsed:,.0f} ev/s  {note:<50}"
        )
        sys.stderr.flush()
