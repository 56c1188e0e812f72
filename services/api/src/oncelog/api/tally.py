"""Broker duplicates seen by the gateway: journalled in the tally stream, applied to topic_stats.

A request whose events the broker partly dropped as duplicates must not be answered 202 until
those drops are durably counted: the client has no reason to retry after a 202, so a count
lost then would leave `received` short for good. Writing them to PostgreSQL on the request's
path made every such request wait for a commit, and that commit for the WAL flush of the
consumers' batches before it (p50 11-14 ms of a 53 ms request under load).

Instead, the gateway publishes the request's counts as one message to the tally stream, with
a fresh id, and answers once the broker has acked it: one more PubAck, as durable as the
events themselves. `TallyApplier` pulls the tally stream in every API process, adds each
batch of counts to topic_stats in one transaction that records the counts' ids
(`tally_applied`), and acks only after the commit; a count delivered again finds its id and
adds nothing. So every answered request's duplicates are counted exactly once, shortly after
the answer, as its events are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import asyncpg
import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from oncelog.api.errors import StoreUnreachableError
from oncelog.events import topic_error
from oncelog.platform import broker
from oncelog.platform.publish import Outbound, publish_many
from oncelog.platform.settings import BrokerSettings
from oncelog.store.stats import apply_tallies, forget_tallies

__all__ = ["MAX_TALLY_BYTES", "Tally", "TallyApplier", "decode_tally", "publish_tally"]

_log = logging.getLogger("oncelog.api")

# A count per topic; no request publishes more events than fit in a body, so far fewer.
Count = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
# The most bytes a tally may have: a request's topics, each 255 characters at most.
MAX_TALLY_BYTES = 1024 * 1024


class Tally(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One request's broker duplicates per topic, under an id no other tally has."""

    id: uuid.UUID
    counts: dict[str, Count]


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Tally).decode


def decode_tally(data: bytes) -> Tally | str:
    """Return the tally in `data`, or why it is not one a gateway could have published."""
    if len(data) > MAX_TALLY_BYTES:
        return f"{len(data)} bytes, more than a tally's {MAX_TALLY_BYTES}"
    try:
        tally = _decode(data)
    except msgspec.DecodeError as exc:
        return str(exc)
    if not tally.counts:
        return "counts are empty"
    for topic in tally.counts:
        if (why := topic_error(topic)) is not None:
            return f"counts: {why}"
    return tally


async def publish_tally(
    js: JetStreamContext,
    settings: BrokerSettings,
    counts: Mapping[str, int],
    *,
    deadline: float,
    fast_wire: bool = True,
) -> None:
    """Journal `counts` in the tally stream; return once the broker has acked them.

    Raises what `publish_many` raises (PublishError, OSError, ValueError) when it has not.
    Retries inside carry the same Msg-Id, so the broker keeps one copy.
    """
    tally = Tally(id=uuid.uuid4(), counts={t: n for t, n in counts.items() if n})
    message = Outbound(broker.tally_subject(settings), _encode(tally), f"tally:{tally.id.hex}")
    await publish_many(js, [message], deadline=deadline, fast_wire=fast_wire)


class TallyApplier:
    """Pulls the tally stream and adds each batch to one stats shard, once per tally."""

    # Tallies per transaction, and how long one fetch waits for the first of them.
    batch = 500
    wait_seconds = 0.05
    # How often the ids of tallies the stream no longer holds are forgotten.
    forget_every_seconds = 30.0
    # ... once applied this long ago: time for a copy delivered before its ack to be applied
    # (and found) first, however slow PostgreSQL was meanwhile.
    forget_after_seconds = 600.0

    def __init__(
        self,
        js: JetStreamContext,
        settings: BrokerSettings,
        connection: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
        shard: int,
    ) -> None:
        self._js = js
        self._connection = connection
        self._shard = shard
        self._stream = broker.tally_stream_config(settings).name or ""
        self._durable = broker.tally_consumer_config(settings).durable_name or ""
        self._forgotten_at = 0.0
        # What this applier did, for tests and logs: tallies added, and refused as malformed.
        self.applied = 0
        self.rejected = 0

    async def run(self) -> None:
        """Apply tallies until cancelled; PostgreSQL or NATS being away only delays them."""
        sub = await self._js.pull_subscribe_bind(self._durable, self._stream)
        delay = 0.1
        try:
            while True:
                try:
                    msgs = await sub.fetch(self.batch, timeout=self.wait_seconds)
                except (TimeoutError, nats.errors.TimeoutError):
                    msgs = []
                except nats.errors.Error as exc:
                    _log.warning("could not fetch tallies: %r", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                try:
                    if msgs:
                        await self.apply(msgs)
                    await self._forget_now_and_then()
                except (asyncpg.PostgresError, asyncpg.InterfaceError, StoreUnreachableError) as e:
                    # Unacked, the tallies come again after ack_wait; nak sooner, with backoff.
                    _log.warning("could not apply broker duplicates yet: %r", e)
                    for msg in msgs:
                        with contextlib.suppress(Exception):
                            await msg.nak(delay=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.1
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def apply(self, msgs: list[Msg]) -> None:
        """Add the tallies in `msgs` in one transaction, then ack them; refuse malformed ones."""
        tallies: dict[uuid.UUID, tuple[uuid.UUID, int, Mapping[str, int]]] = {}
        good: list[Msg] = []
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            decoded = decode_tally(msg.data)
            if isinstance(decoded, str):
                # Only a gateway may publish here (deploy/nats/auth.conf); a malformed tally is
                # not a count of anything, and coming again would not make it one.
                self.rejected += 1
                _log.warning(
                    "refused a malformed tally", extra={"reason": decoded[:200], "stream_seq": seq}
                )
                await msg.term()
                continue
            good.append(msg)
            tallies.setdefault(decoded.id, (decoded.id, seq, decoded.counts))
        if not good:
            return
        async with self._connection() as conn, conn.transaction():
            # In id order, so two appliers given the same tally take its row in one order.
            await apply_tallies(conn, sorted(tallies.values()), self._shard)
        for msg in good:
            await msg.ack()
        self.applied += len(good)

    async def _forget_now_and_then(self) -> None:
        now = time.monotonic()
        if now - self._forgotten_at < self.forget_every_seconds:
            return
        self._forgotten_at = now
        try:
            info = await self._js.stream_info(self._stream)
        except nats.errors.Error as exc:
            _log.info("could not read the tally stream's first sequence: %r", exc)
            return
        async with self._connection() as conn:
            await forget_tallies(conn, int(info.state.first_seq), self.forget_after_seconds)
