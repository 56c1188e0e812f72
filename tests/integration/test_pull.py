"""The consumer's pull requests hold its memory to a byte budget, on a real nats-server."""

from __future__ import annotations

import json

import asyncpg
import msgspec
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from helpers import running_consumer, wait_until
from oncelog.consumer.loop import Consumer
from oncelog.consumer.pull import REQUEST_HEADROOM, Puller
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import msg_id
from oncelog.platform.wire import Delivery, respond

MiB = 1024 * 1024


def sequence(msg: Delivery) -> int:
    """Return the stream sequence from a delivery's ack subject."""
    return int(msg.reply.split(b".")[5])


class Holder:
    """Keeps every delivered message, as a consumer does until it has committed them."""

    def __init__(self) -> None:
        self.held: list[Delivery] = []
        self.seen: list[int] = []

    def __call__(self, msg: Delivery) -> None:
        self.held.append(msg)
        self.seen.append(sequence(msg))

    @property
    def held_bytes(self) -> int:
        return sum(msg.size for msg in self.held)


async def test_requested_and_held_bytes_stay_within_the_budget(
    nc: Client, js: JetStreamContext, settings: ConsumerSettings
) -> None:
    """Messages of 200 kB: the budget, not the message window, bounds what is held."""
    for n in range(60):
        await js.publish(f"{settings.subject_prefix}.big", bytes([65 + n % 26]) * 200_000)
    budget = 3 * MiB
    holder = Holder()
    puller = Puller(
        nc,
        settings.stream,
        settings.durable,
        holder,
        batch=20,
        window=60,
        max_bytes=budget,
        fast_wire=settings.oncelog_fast_wire,
    )
    await puller.start()
    try:

        async def topped_up() -> bool:
            await puller.top_up(len(holder.held), holder.held_bytes)
            assert holder.held_bytes <= budget
            return bool(holder.held)

        # Top up while nothing is released, until the puller has nothing requested any more
        # (the budget is spent): every step, and the state it settles in, stay within it.
        await wait_until(topped_up, within=10)

        async def settled() -> bool:
            return await topped_up() and puller.outstanding == 0

        await wait_until(settled, within=20)
        assert len(holder.held) < 60, "the 60-message window, not the budget, bound it"

        # Releasing what is held (acking it) lets the rest through, each message once.
        async def everything_delivered() -> bool:
            await respond(nc, holder.held, fast_wire=settings.oncelog_fast_wire)
            holder.held.clear()
            await puller.top_up(0, 0)
            return len(holder.seen) >= 60

        await wait_until(everything_delivered, within=20)
        await respond(nc, holder.held, fast_wire=settings.oncelog_fast_wire)
    finally:
        await puller.stop()
    assert sorted(holder.seen) == list(range(1, 61))


async def test_a_message_of_max_payload_gets_through_a_tiny_budget(
    nc: Client, js: JetStreamContext, settings: ConsumerSettings
) -> None:
    """A budget below one message is raised to what the server's max_payload needs.

    Otherwise the server would end every request with 409 "Message Size Exceeds MaxBytes" and
    that message would block the durable forever.
    """
    big = b"x" * (nc.max_payload - 1024)
    await js.publish(f"{settings.subject_prefix}.big", big)
    holder = Holder()
    puller = Puller(
        nc,
        settings.stream,
        settings.durable,
        holder,
        batch=10,
        window=30,
        max_bytes=nc.max_payload // 2,
        fast_wire=settings.oncelog_fast_wire,
    )
    await puller.start()
    try:

        async def delivered() -> bool:
            await puller.top_up(len(holder.held), holder.held_bytes)
            return bool(holder.held)

        await wait_until(delivered, within=10)
        await respond(nc, holder.held, fast_wire=settings.oncelog_fast_wire)
    finally:
        await puller.stop()
    assert holder.held[0].data == big
    assert puller.request_bytes > nc.max_payload


async def test_the_end_of_a_request_sets_the_credit_event(
    nc: Client, js: JetStreamContext, settings: ConsumerSettings
) -> None:
    """A pull request that ends (here by expiring, with nothing to deliver) sets `credit`, the
    event the consumer requests more on."""
    puller = Puller(
        nc,
        settings.stream,
        settings.durable,
        Holder(),
        batch=10,
        window=10,
        max_bytes=nc.max_payload + REQUEST_HEADROOM,
        expires=0.25,
        fast_wire=settings.oncelog_fast_wire,
    )
    await puller.start()
    try:
        await puller.top_up(0, 0)
        assert len(puller.requests) == 1
        assert not puller.credit.is_set()

        async def credited() -> bool:
            return puller.credit.is_set()

        await wait_until(credited, within=10)
        assert not puller.requests
    finally:
        await puller.stop()


async def test_the_consumer_stores_a_backlog_many_times_its_byte_budget(
    js: JetStreamContext,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """40 events of 300 kB through a 3 MiB budget: held bytes are released after each commit."""
    small = msgspec.structs.replace(settings, max_inflight_bytes=3 * MiB)
    for n in range(40):
        body = json.dumps({"event_id": f"e-{n}", "payload": {"blob": "y" * 300_000}}).encode()
        await js.publish(
            f"{small.subject_prefix}.big", body, headers={"Nats-Msg-Id": msg_id("big", f"e-{n}")}
        )

    async def all_stored() -> bool:
        return int(await pool.fetchval("SELECT count(*) FROM events")) == 40

    # Every delivery records what the replica then holds.
    peak = 0
    deliver = Consumer._deliver  # noqa: SLF001 - every delivery is observed where the replica holds it

    def recording(self: Consumer, msg: Delivery) -> None:
        nonlocal peak
        deliver(self, msg)
        peak = max(peak, self.held_bytes)

    monkeypatch.setattr(Consumer, "_deliver", recording)

    async def all_released() -> bool:
        return await all_stored() and consumer.held_bytes == 0

    async with running_consumer(small, js, pool) as consumer:
        await wait_until(all_released, within=60)
    assert 3 * MiB >= peak > 2 * 300_000
