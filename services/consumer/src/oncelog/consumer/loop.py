"""The consumer loop: take a batch, decode it, store it in one transaction, then ack."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
from nats.aio.client import Client

from oncelog.consumer.metrics import ConsumerMetrics
from oncelog.consumer.pull import Puller
from oncelog.consumer.settings import ConsumerSettings
from oncelog.consumer.watch import watch
from oncelog.events import Decoded, decode_message
from oncelog.platform.wire import Delivery, respond
from oncelog.store import health
from oncelog.store.batch import Item, Outcome, store_batch
from oncelog.store.stats import STATS_SHARDS
from oncelog.store.tail import NOTIFY_SQL

__all__ = ["STUCK_AFTER", "Consumer"]

# A batch whose commit failed this many times in a row counts as stuck: the metric and the
# API's /ready show it, while the batch keeps being retried.
STUCK_AFTER = 3
# How often a replica refreshes its row in consumer_health (see oncelog.store.health).
HEALTH_INTERVAL_SECONDS = 5.0
# While NATS is unreachable, how often the puller looks whether it is back: a reconnect
# sends the consumer no event of its own.
RECONNECT_CHECK_SECONDS = 0.1

_log = logging.getLogger("oncelog.consumer")
_V1_ACK_TOKENS = 9
# Failures of the store that are expected while PostgreSQL is down or restarting.
_STORE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def to_item(msg: Delivery, prefix: str, max_bytes: int) -> Item:
    """Decode one delivered message, keeping its stream position."""
    # The ack subject carries the delivery count, stream sequence and broker timestamp:
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the same with
    # <domain>.<account hash> in front. Splitting it here is cheaper than nats-py's Metadata.
    tokens = msg.reply.split(b".")
    shift = 0 if len(tokens) == _V1_ACK_TOKENS else 2
    if len(tokens) < _V1_ACK_TOKENS or tokens[0] != b"$JS" or tokens[1] != b"ACK":
        raise ValueError(f"not a JetStream delivery: reply subject {msg.reply!r}")
    received_ns = int(tokens[7 + shift])
    result = decode_message(msg.subject, msg.data, received_ns, prefix, max_bytes)
    return Item(
        seq=int(tokens[5 + shift]),
        delivered=int(tokens[4 + shift]),
        subject=msg.subject,
        received_ns=received_ns,
        # Raw off the wire: parsed only if the message ends up a dead letter.
        headers=msg.raw_headers,
        data=msg.data,
        result=result,
    )


class Consumer:
    """One replica of the durable pull consumer.

    `run` is one task group: `commit_workers` workers, each taking what is buffered (up to a
    batch), decoding it, storing it in one transaction and acking it; the puller task, which
    requests more whenever credit comes free; the health report and the watcher. Fetching,
    decoding and committing overlap. A worker that finds the buffer non-empty takes it at once:
    under light load a batch is whatever arrived meanwhile, which keeps latency low; under heavy
    load batches fill.
    """

    def __init__(
        self,
        settings: ConsumerSettings,
        nc: Client,
        pool: asyncpg.Pool,
        metrics: ConsumerMetrics,
        shard: int,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = nc.jetstream()
        self.pool = pool
        self.metrics = metrics
        self.shard = shard
        self._buffer: list[Delivery] = []
        self._arrived = asyncio.Event()
        self._committing = 0
        # Bytes delivered and not yet acked or handed back (buffered or committing).
        self._held_bytes = 0
        # Longer than any statement may run (statement_timeout), so only a dead connection hits it.
        self._commit_deadline = settings.statement_timeout_ms / 1000 + 15
        self.consumer_id = settings.consumer_id or f"{socket.gethostname()}-{os.getpid()}"
        # Batches now failing STUCK_AFTER times or more: when each got stuck, the last error.
        self._stuck: dict[int, datetime] = {}
        self._last_error: str | None = None
        # Set when a committed batch stored events: the announcer tells the live tail.
        self._stored = asyncio.Event()

    @property
    def held_bytes(self) -> int:
        """Bytes delivered to this replica and not yet acked or handed back."""
        return self._held_bytes

    def _deliver(self, msg: Delivery) -> None:
        self._held_bytes += msg.size
        self._buffer.append(msg)
        self._arrived.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; every delivered message is stored or handed back.

        A task that fails ends the group, and with it the process, rather than leaving the
        replica idle with its messages unacked.
        """
        s = self.settings
        puller = Puller(
            self.nc,
            s.stream,
            s.durable,
            self._deliver,
            batch=s.batch_size,
            window=s.batch_size * (s.commit_workers + 1),
            max_bytes=s.max_inflight_bytes,
            expires=s.fetch_timeout_seconds,
            fast_wire=s.oncelog_fast_wire,
        )
        await puller.start()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._stopping(puller, stop))
                group.create_task(self._pull(puller, stop))
                for i in range(s.commit_workers):
                    shard = (self.shard + i) % STATS_SHARDS
                    group.create_task(self._work(puller, stop, shard))
                group.create_task(self._report_health(stop))
                group.create_task(self._announce(stop))
                group.create_task(watch(s, self.js, self.pool, self.metrics, stop))
        finally:
            await puller.stop()
            # Whatever arrived but was not taken is handed back at once rather than after ack_wait.
            with contextlib.suppress(Exception):
                await respond(self.nc, self._buffer, b"-NAK", fast_wire=s.oncelog_fast_wire)
            self._buffer.clear()
            self._held_bytes = 0

    async def _stopping(self, puller: Puller, stop: asyncio.Event) -> None:
        """On stop, stop receiving and wake the tasks that wait for deliveries or credit."""
        await stop.wait()
        await puller.stop()
        self._arrived.set()
        puller.credit.set()

    async def _pull(self, puller: Puller, stop: asyncio.Event) -> None:
        """Request more whenever credit comes free, within the window and the byte budget."""
        nc = self.nc
        reconnects = nc.stats["reconnects"]
        while not stop.is_set():
            puller.credit.clear()
            if not nc.is_connected or nc.stats["reconnects"] != reconnects:
                # The server a reconnect lands on holds none of the requests sent before.
                reconnects = nc.stats["reconnects"]
                puller.reset()
            await puller.top_up(len(self._buffer) + self._committing, self._held_bytes)
            self.metrics.held_bytes.set(self._held_bytes)
            # Credit comes free when a request ends or a batch is acked or handed back, and
            # either sets `credit`. A reconnect, a request the server never ended and a request
            # that could not be sent set nothing, so a timer stands in for them.
            if not nc.is_connected:
                timeout = RECONNECT_CHECK_SECONDS
            else:
                lost = puller.until_lost()
                timeout = self.settings.fetch_timeout_seconds if lost is None else lost
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await puller.credit.wait()

    async def _report_health(self, stop: asyncio.Event) -> None:
        """Refresh this replica's row in consumer_health until stopped; failures only wait."""
        reported: int | None = None
        while not stop.is_set():
            stuck = len(self._stuck)
            # Refreshed on every change and on every interval while stuck, so /ready sees a
            # live replica's state; a healthy replica that reported so once stays quiet.
            if stuck or reported != 0:
                since = min(self._stuck.values(), default=None)
                try:
                    async with (
                        asyncio.timeout(HEALTH_INTERVAL_SECONDS),
                        self.pool.acquire(timeout=HEALTH_INTERVAL_SECONDS) as conn,
                    ):
                        await health.report(
                            conn,
                            self.consumer_id,
                            stuck,
                            since,
                            self._last_error if stuck else None,
                        )
                    reported = stuck
                except Exception as exc:  # the store may be the very thing that is down
                    _log.debug("health report failed", extra={"error": repr(exc)})
            await _sleep_or_stop(stop, HEALTH_INTERVAL_SECONDS if stuck else 1.0)

    async def _announce(self, stop: asyncio.Event) -> None:
        """NOTIFY the live tail's listeners after commits that stored events.

        Apart from the batch transaction on purpose: a transaction that notifies takes a
        database-wide lock through its commit, WAL flush included, which would serialise the
        commit workers. One notification covers every commit before it, so a burst of commits
        costs one or two round trips; a lost one only delays the tail to its next poll.
        """
        while True:
            stopping = asyncio.ensure_future(stop.wait())
            stored = asyncio.ensure_future(self._stored.wait())
            await asyncio.wait({stopping, stored}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            stored.cancel()
            if stop.is_set():
                return
            self._stored.clear()
            try:
                async with (
                    asyncio.timeout(HEALTH_INTERVAL_SECONDS),
                    self.pool.acquire(timeout=HEALTH_INTERVAL_SECONDS) as conn,
                ):
                    await conn.execute(NOTIFY_SQL)
            except Exception as exc:  # the store may be down; the tail polls as well
                _log.debug("notify failed", extra={"error": repr(exc)})

    async def _work(self, puller: Puller, stop: asyncio.Event, shard: int) -> None:
        """Take a batch, decode, commit and ack it; again, until stopped."""
        size = self.settings.batch_size
        while not stop.is_set():
            if not self._buffer:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = self._buffer[:size]
            del self._buffer[:size]
            self._committing += len(batch)
            try:
                await self.handle(batch, stop, shard)
            finally:
                self._committing -= len(batch)
                self._held_bytes -= sum(msg.size for msg in batch)
                # Acked or handed back, the batch's share of the window and budget is free.
                puller.credit.set()

    async def handle(self, msgs: Sequence[Delivery], stop: asyncio.Event, shard: int) -> None:
        """Store one batch (retrying while the store fails), then ack every message of it."""
        s = self.settings
        items = [to_item(msg, s.subject_prefix, s.max_event_bytes) for msg in msgs]
        outcome = await self._commit(items, msgs, stop, shard)
        if outcome is None:
            # Shutting down with the batch uncommitted: hand it back for another replica.
            with contextlib.suppress(Exception):
                await respond(self.nc, msgs, b"-NAK", fast_wire=s.oncelog_fast_wire)
            return
        if outcome.stored:
            self._stored.set()
        await respond(self.nc, msgs, fast_wire=s.oncelog_fast_wire)
        self._observe(items, outcome)

    async def _commit(
        self, items: list[Item], msgs: Sequence[Delivery], stop: asyncio.Event, shard: int
    ) -> Outcome | None:
        try:
            return await self._retry(items, msgs, stop, shard)
        finally:
            if self._stuck.pop(id(items), None) is not None:
                self.metrics.stuck_batches.set(len(self._stuck))

    async def _retry(
        self, items: list[Item], msgs: Sequence[Delivery], stop: asyncio.Event, shard: int
    ) -> Outcome | None:
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                # Bounded waits: a pool that cannot hand out a connection, or a server that
                # stops answering, turns into a retry instead of a worker stuck forever.
                async with (
                    asyncio.timeout(self._commit_deadline),
                    self.pool.acquire(timeout=self._commit_deadline) as conn,
                ):
                    outcome = await store_batch(conn, items, shard)
            except Exception as exc:
                # Any failure keeps the batch and retries it: nothing is acked before a commit.
                unexpected = not isinstance(exc, _STORE_ERRORS)
                attempt += 1
                self.metrics.commit_failures.inc()
                if attempt >= STUCK_AFTER:
                    self._last_error = repr(exc)
                    if id(items) not in self._stuck:
                        self._stuck[id(items)] = datetime.now(UTC)
                        self.metrics.stuck_batches.set(len(self._stuck))
                delay = min(self.settings.retry_max_seconds, 0.1 * 2**attempt) * random.uniform(
                    0.5, 1.0
                )
                _log.warning(
                    "store failed, retrying the batch",
                    exc_info=unexpected,
                    extra={
                        "error": repr(exc),
                        "attempt": attempt,
                        "retry_in": round(delay, 3),
                        "batch": len(items),
                    },
                )
                # Keep the batch ours while the store is down, rather than letting it bounce.
                with contextlib.suppress(Exception):
                    await respond(self.nc, msgs, b"+WPI", fast_wire=self.settings.oncelog_fast_wire)
                if await _sleep_or_stop(stop, delay):
                    return None
                continue
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            return outcome

    def _observe(self, items: list[Item], outcome: Outcome) -> None:
        m = self.metrics
        now = time.time()
        received: Counter[str] = Counter()
        stored: Counter[str] = Counter()
        dups: Counter[str] = Counter()
        label = m.topic
        for item in items:
            topic = label(_topic_of(item))
            received[topic] += 1
            if item.seq in outcome.stored:
                stored[topic] += 1
            elif item.seq in outcome.duplicates:
                dups[topic] += 1
        for topic, n in received.items():
            m.received.labels(topic).inc(n)
        for topic, n in stored.items():
            m.stored.labels(topic).inc(n)
        for topic, n in dups.items():
            m.duplicates.labels("store", topic).inc(n)
        for code, n in Counter(outcome.dead.values()).items():
            m.dead.labels(code).inc(n)
        m.redelivered.inc(outcome.redelivered)
        m.conflicting.inc(outcome.conflicting)
        if outcome.isolated:
            m.isolated.inc()
        m.batches.inc()
        m.batch_size.observe(len(items))
        m.last_commit.set(now)
        m.latency.observe_many(now - item.received_ns / 1e9 for item in items)
        m.duplicate_age.observe_many(outcome.duplicate_ages)
        _log.info(
            "batch committed",
            extra={
                "batch": len(items),
                "stored": len(outcome.stored),
                "duplicates": len(outcome.duplicates),
                "dead_lettered": len(outcome.dead),
                "redelivered": outcome.redelivered,
            },
        )
        if _log.isEnabledFor(logging.DEBUG):
            for item in items:
                result = item.result
                _log.debug(
                    "message",
                    extra={
                        "seq": item.seq,
                        "subject": item.subject,
                        "topic": result.topic if isinstance(result, Decoded) else None,
                        "event_id": result.event_id if isinstance(result, Decoded) else None,
                        "decision": _decision(item.seq, outcome),
                    },
                )


def _topic_of(item: Item) -> str:
    if isinstance(item.result, Decoded):
        return item.result.topic
    return "_invalid"


def _decision(seq: int, outcome: Outcome) -> str:
    if seq in outcome.stored:
        return "stored"
    if seq in outcome.duplicates:
        return "duplicate"
    if seq in outcome.dead:
        return "dead_lettered"
    return "already_counted"


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; return True when `stop` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
