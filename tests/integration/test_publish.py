"""publish_many against a real nats-server: acks, duplicates, refusals and partial acks."""

from __future__ import annotations

import time

import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StreamConfig

from oncelog.platform.publish import Outbound, PublishError, publish_many
from oncelog.platform.settings import ConsumerSettings


def _outbound(settings: ConsumerSettings, n: int, topic: str = "pub") -> list[Outbound]:
    subject = f"{settings.subject_prefix}.{topic}"
    return [Outbound(subject, b'{"event_id":"p-%d"}' % i, f"{topic}:p-{i}") for i in range(n)]


async def test_every_message_is_acked_in_order_and_repeats_are_flagged(
    js: JetStreamContext, settings: ConsumerSettings
) -> None:
    messages = _outbound(settings, 500)
    acks = await publish_many(js, messages, deadline=time.monotonic() + 10)
    assert [a.seq for a in acks] == list(range(1, 501))
    assert {a.stream for a in acks} == {settings.stream}
    assert not any(a.duplicate for a in acks)
    again = await publish_many(js, messages[:10], deadline=time.monotonic() + 10)
    assert [(a.seq, a.duplicate) for a in again] == [(n, True) for n in range(1, 11)]
    info = await js.stream_info(settings.stream)
    assert info.state.messages == 500


async def test_a_msg_id_is_the_same_on_both_publish_paths(
    js: JetStreamContext, settings: ConsumerSettings
) -> None:
    """nats-py writes header values stripped with line breaks as spaces; so does the fast path."""
    subject = f"{settings.subject_prefix}.ids"
    first = await js.publish(subject, b"{}", headers={"Nats-Msg-Id": " ids:a\r\nb "})
    [ack] = await publish_many(
        js, [Outbound(subject, b"{}", " ids:a\r\nb ")], deadline=time.monotonic() + 10
    )
    assert ack.duplicate
    assert ack.seq == first.seq


async def test_a_subject_no_stream_takes_fails_by_the_deadline(
    js: JetStreamContext, settings: ConsumerSettings
) -> None:
    started = time.monotonic()
    with pytest.raises(PublishError, match="3 of 3 messages got no PubAck") as caught:
        await publish_many(
            js,
            [Outbound(f"nostream{settings.subject_prefix}.x", b"{}", f"x:{i}") for i in range(3)],
            deadline=time.monotonic() + 1.5,
        )
    assert time.monotonic() - started < 5
    assert caught.value.acks == [None, None, None]


async def test_a_full_stream_acks_what_fits_and_names_the_rest(
    nc: Client, settings: ConsumerSettings
) -> None:
    """With discard=new the broker refuses past its limit: the acks that came are kept."""
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=settings.stream,
            subjects=[f"{settings.subject_prefix}.>"],
            max_msgs=5,
            discard=DiscardPolicy.NEW,
        )
    )
    with pytest.raises(PublishError, match="3 of 8") as caught:
        await publish_many(js, _outbound(settings, 8), deadline=time.monotonic() + 1.0)
    assert [a.seq if a else None for a in caught.value.acks] == [1, 2, 3, 4, 5, None, None, None]


async def test_a_message_over_the_servers_limit_is_refused_before_sending(
    js: JetStreamContext, settings: ConsumerSettings, nc: Client
) -> None:
    """The connection stays up: the message never reaches the server."""
    big = Outbound(f"{settings.subject_prefix}.big", b"x" * (nc.max_payload + 1), "big:1")
    with pytest.raises(nats.errors.MaxPayloadError):
        await publish_many(js, [big], deadline=time.monotonic() + 5)
    assert nc.is_connected
    [ack] = await publish_many(js, _outbound(settings, 1), deadline=time.monotonic() + 5)
    assert ack.seq == 1
