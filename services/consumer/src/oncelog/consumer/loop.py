"""The consumer loop: fetch a batch, decode it, store it in one transaction, then ack."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence

import asyncpg
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from oncelog.consumer.metrics import ConsumerMetrics
from oncelog.consumer.store import Item, Outcome, store_batch
from oncelog.events import Decoded, decode_message
from oncelog.platform.settings import ConsumerSettings

__all__ = ["Consumer"]

_log = logging.getLogger("oncelog.consumer")


def to_item(msg: Msg, prefix: str, max_bytes: int) -> Item:
    """Decode one delivered message, keeping its stream position."""
    meta = msg.metadata
    return Item(
        seq=meta.sequence.stream,
        delivered=meta.num_delivered,
        subject=msg.subject,
        received_at=meta.timestamp,
        headers=msg.headers,
        data=msg.data,
        result=decode_message(msg.subject, msg.data, meta.timestamp, prefix, max_bytes),
    )


class Consumer:
    """One replica of the durable pull consumer."""

    def __init__(
        self,
        settings: ConsumerSettings,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        metrics: ConsumerMetrics,
        shard: int,
    ) -> None:
        self.settings = settings
        self.js = js
        self.pool = pool
        self.metrics = metrics
        self.shard = shard
        self.last_commit = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; every fetched message is stored or handed back."""
        s = self.settings
        sub = await self.js.pull_subscribe_bind(durable=s.durable, stream=s.stream)
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(s.batch_size, timeout=s.fetch_timeout_seconds)
                except TimeoutError:  # also nats.errors.TimeoutError: no message in time
                    continue
                except (nats.errors.ConnectionClosedError, nats.errors.NoRespondersError) as exc:
                    _log.warning("fetch failed: %s", exc)
                    await _sleep_or_stop(stop, 0.5)
                    continue
                if msgs:
                    await self.handle(msgs, stop)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def handle(self, msgs: Sequence[Msg], stop: asyncio.Event) -> None:
        """Store one batch (retrying while the store fails), then ack every message of it."""
        items = [
            to_item(msg, self.settings.subject_prefix, self.settings.max_event_bytes)
            for msg in msgs
        ]
        outcome = await self._commit(items, msgs, stop)
        if outcome is None:
            # Shutting down with the batch uncommitted: hand it back for another replica.
            for msg in msgs:
                with contextlib.suppress(Exception):
                    await msg.nak()
            return
        for msg in msgs:
            await msg.ack()
        self._observe(items, outcome)

    async def _commit(
        self, items: list[Item], msgs: Sequence[Msg], stop: asyncio.Event
    ) -> Outcome | None:
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                async with self.pool.acquire() as conn:
                    outcome = await store_batch(conn, items, self.shard)
            except (
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                OSError,
                TimeoutError,
                RuntimeError,
            ) as exc:
                attempt += 1
                self.metrics.commit_failures.inc()
                delay = min(self.settings.retry_max_seconds, 0.1 * 2**attempt) * random.uniform(
                    0.5, 1.0
                )
                _log.warning(
                    "store failed, retrying the batch",
                    extra={
                        "error": repr(exc),
                        "attempt": attempt,
                        "retry_in": round(delay, 3),
                        "batch": len(items),
                    },
                )
                # Keep the batch ours while the store is down, rather than letting it bounce.
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                if await _sleep_or_stop(stop, delay):
                    return None
                continue
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            self.last_commit = time.time()
            return outcome

    def _observe(self, items: list[Item], outcome: Outcome) -> None:
        m = self.metrics
        m.received.inc(len(items))
        m.batch_size.observe(len(items))
        m.stored.inc(outcome.stored)
        m.duplicates.labels("store").inc(outcome.duplicates)
        m.dead.inc(outcome.dead)
        m.redelivered.inc(outcome.redelivered)
        m.conflicting.inc(outcome.conflicting)
        for age in outcome.duplicate_ages:
            m.duplicate_age.observe(age)
        _log.info(
            "batch committed",
            extra={
                "batch": len(items),
                "stored": outcome.stored,
                "duplicates": outcome.duplicates,
                "dead_lettered": outcome.dead,
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
                        "decision": "decoded" if isinstance(result, Decoded) else "dead_lettered",
                    },
                )


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; return True when `stop` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
