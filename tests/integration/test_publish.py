"""publish_many and the publisher's Emitter against a real nats-server: acks, duplicates,
refusals, partial acks, the broker-duplicate metric and the wait for the duplicate window."""

from __future__ import annotations

import asyncio
import io
import time

import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StreamConfig
from prometheus_client import CollectorRegistry

from helpers import wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import msg_id
from oncelog.platform.publish import Outbound, PublishError, publish_many
from oncelog.publisher.emit import Emitter, PublisherMetrics
from oncelog.publisher.generate import plan
from oncelog.publisher.progress import Progress


def _outbound(settings: ConsumerSettings, n: int, topic: str = "pub") -> list[Outbound]:
    subject = f"{settings.subject_prefix}.{topic}"
    return [Outbound(subject, b'{"event_id":"p-%d"}' % i, f"{topic}:p-{i}") for i in range(n)]


async def test_every_message_is_acked_in_order_and_repeats_are_flagged(
    js: JetStreamContext, settings: ConsumerSettings
) -> None:
    messages = _outbound(settings, 500)
    acks = await publish_many(
        js, messages, deadline=time.monotonic() + 10, fast_wire=settings.oncelog_fast_wire
    )
    assert [a.seq for a in acks] == list(range(1, 501))
    assert {a.stream for a in acks} == {settings.stream}
    assert not any(a.duplicate for a in acks)
    again = await publish_many(
        js, messages[:10], deadline=time.monotonic() + 10, fast_wire=settings.oncelog_fast_wire
    )
    assert [(a.seq, a.duplicate) for a in again] == [(n, True) for n in range(1, 11)]
    info = await js.stream_info(settings.stream)
    assert info.state.messages == 500


async def test_a_msg_id_is_the_same_on_both_publish_paths(
    js: JetStreamContext, settings: ConsumerSettings
) -> None:
    """The contract's Msg-Id of any id reaches the broker unchanged on either publish path."""
    subject = f"{settings.subject_prefix}.ids"
    for event_id in ["a-1", "a-1 ", " a\r\nb ", "\u3000", "é:~"]:
        mid = msg_id("ids", event_id)
        first = await js.publish(subject, b"{}", headers={"Nats-Msg-Id": mid})
        [ack] = await publish_many(
            js,
            [Outbound(subject, b"{}", mid)],
            deadline=time.monotonic() + 10,
            fast_wire=settings.oncelog_fast_wire,
        )
        assert ack.duplicate, event_id
        assert ack.seq == first.seq


@pytest.mark.parametrize("bad", [" ids:a", "ids:a ", "ids:a\r\nb", "ids:\x00", "ids:é"])
async def test_a_msg_id_a_header_would_alter_is_never_written(
    js: JetStreamContext, settings: ConsumerSettings, bad: str
) -> None:
    """A Msg-Id that a header cannot carry unchanged is refused before a byte is written."""
    subject = f"{settings.subject_prefix}.ids"
    with pytest.raises(ValueError, match="cannot go into a NATS header"):
        await publish_many(
            js,
            [Outbound(subject, b"{}", bad)],
            deadline=time.monotonic() + 5,
            fast_wire=settings.oncelog_fast_wire,
        )
    assert (await js.stream_info(settings.stream)).state.messages == 0


@pytest.mark.parametrize("bad", ["ids.a b", "ids.a\r\nPUB x 1", "ids.\x00", ""])
async def test_a_subject_a_frame_cannot_carry_is_never_written(
    nc: Client, js: JetStreamContext, settings: ConsumerSettings, bad: str
) -> None:
    """A subject with a space, line break or control character is refused before it is sent."""
    with pytest.raises(ValueError, match="cannot go into a NATS frame"):
        await publish_many(
            js,
            [Outbound(bad, b"{}", "ids:a")],
            deadline=time.monotonic() + 5,
            fast_wire=settings.oncelog_fast_wire,
        )
    assert nc.is_connected


async def test_a_subject_no_stream_takes_fails_by_the_deadline(
    js: JetStreamContext, settings: ConsumerSettings
) -> None:
    started = time.monotonic()
    with pytest.raises(PublishError, match="3 of 3 messages got no PubAck") as caught:
        await publish_many(
            js,
            [Outbound(f"nostream{settings.subject_prefix}.x", b"{}", f"x:{i}") for i in range(3)],
            deadline=time.monotonic() + 1.5,
            fast_wire=settings.oncelog_fast_wire,
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
        await publish_many(
            js,
            _outbound(settings, 8),
            deadline=time.monotonic() + 1.0,
            fast_wire=settings.oncelog_fast_wire,
        )
    assert [a.seq if a else None for a in caught.value.acks] == [1, 2, 3, 4, 5, None, None, None]


async def test_a_message_over_the_servers_limit_is_refused_before_sending(
    js: JetStreamContext, settings: ConsumerSettings, nc: Client
) -> None:
    """The connection stays up: the message never reaches the server."""
    big = Outbound(f"{settings.subject_prefix}.big", b"x" * (nc.max_payload + 1), "big:1")
    with pytest.raises(nats.errors.MaxPayloadError):
        await publish_many(
            js, [big], deadline=time.monotonic() + 5, fast_wire=settings.oncelog_fast_wire
        )
    assert nc.is_connected
    [ack] = await publish_many(
        js,
        _outbound(settings, 1),
        deadline=time.monotonic() + 5,
        fast_wire=settings.oncelog_fast_wire,
    )
    assert ack.seq == 1


def _broker_duplicates(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("oncelog_duplicates_total", {"layer": "broker"})


async def test_the_broker_duplicate_counter_counts_the_duplicate_pubacks(
    js: JetStreamContext, settings: ConsumerSettings
) -> None:
    """oncelog_duplicates_total{layer="broker"} exists at 0 before the first publish and then
    equals the PubAcks with duplicate=true, which are exactly the repeats the stream dropped."""
    registry = CollectorRegistry()
    metrics = PublisherMetrics(registry)
    assert _broker_duplicates(registry) == 0.0
    emitter = Emitter(js, window_seconds=120, metrics=metrics, fast_wire=settings.oncelog_fast_wire)
    events = plan(
        count=2000,
        topics=["m.a", "m.b"],
        dup_rate=0.4,
        replay_old=0.0,
        source="test",
        seed=5,
        subject_prefix=settings.subject_prefix,
    )
    summary = await emitter.run(events, 2000)
    assert summary.errors == 0
    assert summary.broker_duplicates == summary.sent - summary.unique > 500
    assert _broker_duplicates(registry) == summary.broker_duplicates
    stored = (await js.stream_info(settings.stream)).state.messages
    assert stored == summary.unique


async def test_replays_wait_out_the_window_idle_time_is_not_publishing_time(
    js: JetStreamContext, settings: ConsumerSettings
) -> None:
    """Replays go out only after the window, announced with a countdown; the events/s rate is
    taken over the time spent publishing, the wait reported apart from it."""
    out = io.StringIO()
    emitter = Emitter(
        js,
        window_seconds=1.0,
        progress=Progress(out, in_place=False, interval=0.2),
        fast_wire=settings.oncelog_fast_wire,
    )
    events = plan(
        count=400,
        topics=["w.a"],
        dup_rate=0.5,
        replay_old=1.0,
        source="test",
        seed=2,
        subject_prefix=settings.subject_prefix,
    )
    summary = await emitter.run(events, 400)
    assert summary.errors == summary.unsent == 0
    assert summary.old_replays > 100
    # Every replay came after the window (1 s here), plus the 1 s margin.
    assert summary.wait_seconds > 1.5
    assert summary.publish_seconds == pytest.approx(
        summary.seconds - summary.wait_seconds, abs=0.01
    )
    assert summary.events_per_second == pytest.approx(
        summary.sent / summary.publish_seconds, rel=0.01
    )
    text = out.getvalue()
    assert "replays wait until the broker's 1 s duplicate window has passed" in text
    assert "s for the duplicate window, then" in text
    assert "\r" not in text
    assert all(line.startswith("publisher: ") for line in text.splitlines())


async def test_a_stop_during_the_wait_skips_the_replays_and_returns_at_once(
    js: JetStreamContext, settings: ConsumerSettings
) -> None:
    """Setting the stop Event while replays wait for the window ends the run within moments,
    the replays counted as skipped and everything else acked."""
    stop = asyncio.Event()
    out = io.StringIO()
    emitter = Emitter(
        js,
        window_seconds=60.0,
        progress=Progress(out, in_place=False),
        fast_wire=settings.oncelog_fast_wire,
    )
    events = plan(
        count=300,
        topics=["s.a"],
        dup_rate=0.5,
        replay_old=1.0,
        source="test",
        seed=3,
        subject_prefix=settings.subject_prefix,
    )
    run = asyncio.create_task(emitter.run(events, 300, stop=stop))

    async def waiting() -> bool:
        return "replays wait until" in out.getvalue()

    await wait_until(waiting, within=10)
    started = time.monotonic()
    stop.set()
    summary = await asyncio.wait_for(run, 5)
    assert time.monotonic() - started < 2
    assert summary.errors == 0
    assert summary.skipped_replays == summary.unsent > 50
    assert summary.acked == summary.sent == 300 - summary.unsent
