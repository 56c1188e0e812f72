"""Broker duplicates of concurrent requests, added to topic_stats in one transaction.

Every request of one API process counts its duplicates on the same rows (its stats shard, the
topics it published to), so counted one transaction per request they wait on each other's row
locks and commits: 8 concurrent requests took 11-16 ms on this step alone, more than the wait
for their PubAcks. Here a request hands its counts over and waits; one write at a time carries
whatever every request handed over while the previous write ran (a group commit), and each
request is answered only once its own counts are committed, or gets the write's error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from oncelog.store.stats import add_broker_duplicates

__all__ = ["DuplicateTally"]


class DuplicateTally:
    """Adds broker duplicates to one stats shard, the counts of concurrent callers together."""

    def __init__(
        self, connection: Callable[[], contextlib.AbstractAsyncContextManager[Any]], shard: int
    ) -> None:
        self._connection = connection
        self._shard = shard
        self._counts: Counter[str] = Counter()
        self._waiters: list[asyncio.Future[None]] = []
        self._writer: asyncio.Task[None] | None = None
        # Transactions begun so far (failed ones too): how far the grouping goes.
        self.writes = 0

    @property
    def queued(self) -> int:
        """Requests waiting for the next write (not the one under way)."""
        return len(self._waiters)

    async def add(self, counts: Mapping[str, int]) -> None:
        """Return once `counts` are committed to topic_stats; raise the write's error if not.

        Nothing of a failed write is counted, for any of the requests it carried. A caller that
        is cancelled while it waits leaves its counts to the write: they are the broker's
        drops either way, and a retry of the same events is dropped and counted again.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Read here, so that an error nobody waits for any more is not reported as unread.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._counts.update(counts)
        self._waiters.append(future)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())
        await asyncio.shield(future)

    async def _write_all(self) -> None:
        waiters: list[asyncio.Future[None]] = []
        try:
            while self._waiters:
                counts, waiters = self._counts, self._waiters
                self._counts, self._waiters = Counter(), []
                self.writes += 1
                try:
                    async with self._connection() as conn:
                        await add_broker_duplicates(conn, counts, self._shard)
                except Exception as exc:  # every waiter gets it, to map to a 503 or raise
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    continue
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        finally:
            self._writer = None
            # Cancelled (the app stops): whoever still waits is cancelled with it.
            for waiter in [*waiters, *self._waiters]:
                waiter.cancel()
