"""A bounded publisher under faults: retries with the same Msg-Id and sends duplicates on purpose.

Every event goes into the ledger as attempted before its first send and as acked on its first
PubAck. One event in `copy_every` is followed by a copy of an already acked event with the
same Msg-Id (the broker's window drops it), and one in `raw_copy_every` by a copy without any
Msg-Id (only the store's unique key can drop it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time

import nats
import nats.errors
from nats.aio.client import Client

from faults.checker import Key, Ledger
from oncelog.events import msg_id

__all__ = ["Load", "connect"]


async def connect(urls: list[str], name: str) -> Client:
    """Connect to NATS on loopback, reconnecting forever, without logging each hiccup."""

    async def quiet(exc: Exception) -> None:
        del exc  # the ledger records what each publish saw; the callback has nothing to add

    return await nats.connect(
        urls,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        connect_timeout=2,
        error_cb=quiet,
    )


def body(key: Key, n: int) -> bytes:
    """Return the JSON body of event `key`; its payload names the event it belongs to."""
    topic, event_id = key
    return json.dumps(
        {
            "event_id": event_id,
            "source": "faults",
            "payload": {"n": n, "key": f"{topic}/{event_id}"},
        }
    ).encode()


class Load:
    """Publishes events at a bounded rate and concurrency until stopped or `limit` is reached."""

    def __init__(
        self,
        nc: Client,
        prefix: str,
        ledger: Ledger,
        *,
        tag: str = "e",
        topics: int = 3,
        rate: float = 250.0,
        inflight: int = 32,
        limit: int = 60_000,
        copy_every: int = 10,
        raw_copy_every: int = 25,
        timeout: float = 2.0,
        retry_for: float = 180.0,
    ) -> None:
        self.js = nc.jetstream()
        self.prefix = prefix
        self.ledger = ledger
        self.tag = tag
        self.topics = [f"faults.t{i}" for i in range(topics)]
        self.rate = rate
        self.slots = asyncio.Semaphore(inflight)
        self.limit = limit
        self.copy_every = copy_every
        self.raw_copy_every = raw_copy_every
        self.timeout = timeout
        self.retry_for = retry_for
        self.sent = 0
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._bodies: dict[Key, bytes] = {}

    def start(self) -> None:
        """Start publishing in the background."""
        self._runner = asyncio.create_task(self._run())

    async def stop(self, within: float = 240.0) -> None:
        """Stop starting new events and wait for the in-flight ones to be acked or given up."""
        self._stop.set()
        if self._runner is not None:
            await asyncio.wait_for(self._runner, within)
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks), within)

    async def until_acked(self, count: int, within: float = 60.0) -> None:
        """Wait until at least `count` events were acked."""
        deadline = time.monotonic() + within
        while len(self.ledger.acked) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.ledger.acked)} of {count} events acked")
            await asyncio.sleep(0.05)

    async def _run(self) -> None:
        pace = 1.0 / self.rate
        next_at = time.monotonic()
        n = 0
        while not self._stop.is_set() and n < self.limit:
            n += 1
            key = (self.topics[n % len(self.topics)], f"{self.tag}-{n}")
            self._bodies[key] = body(key, n)
            self.ledger.attempt(key)
            await self._spawn(key, with_id=True)
            if n % self.copy_every == 0 and self.ledger.acked:
                self.ledger.copies_with_msg_id += 1
                await self._spawn(self._acked_key(), with_id=True)
            if n % self.raw_copy_every == 0 and self.ledger.acked:
                self.ledger.copies_without_msg_id += 1
                await self._spawn(self._acked_key(), with_id=False)
            next_at += pace
            if (delay := next_at - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            else:
                next_at = time.monotonic()

    def _acked_key(self) -> Key:
        # The newest acks are the ones still inside the broker's window, the oldest are not.
        keys = list(self.ledger.acked)
        return random.choice(keys[-200:] if random.random() < 0.5 else keys)

    async def _spawn(self, key: Key, *, with_id: bool) -> None:
        await self.slots.acquire()
        self.sent += 1
        task = asyncio.create_task(self._publish(key, with_id=with_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, key: Key, *, with_id: bool) -> None:
        """Publish `key` until a PubAck arrives or `retry_for` runs out, with the same Msg-Id."""
        try:
            subject = f"{self.prefix}.{key[0]}"
            headers = {"Nats-Msg-Id": msg_id(*key)} if with_id else None
            deadline = time.monotonic() + self.retry_for
            attempt = 0
            while True:
                attempt += 1
                try:
                    ack = await self.js.publish(
                        subject, self._bodies[key], timeout=self.timeout, headers=headers
                    )
                except (nats.errors.Error, TimeoutError) as exc:
                    self.ledger.error(exc)
                    if time.monotonic() > deadline:
                        self.ledger.give_up(key)
                        return
                    await asyncio.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))
                    continue
                self.ledger.ack(key, duplicate=bool(ack.duplicate))
                return
        finally:
            self.slots.release()
