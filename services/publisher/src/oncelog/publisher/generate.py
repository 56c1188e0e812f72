"""A reproducible plan of events to publish, duplicates included."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Literal

import msgspec

from oncelog.events import IncomingEvent, encode_event, msg_id, subject_for
from oncelog.platform.publish import Outbound

__all__ = ["Kind", "Planned", "plan", "topics_from"]

# "new" is an event's first message, "recent" a duplicate inside the broker's window, "old" a
# replay meant to be sent once the window has passed for its original.
Kind = Literal["new", "recent", "old"]
# One step of a plan: the kind of message and the message itself.
Planned = tuple[Kind, Outbound]


def topics_from(spec: str) -> list[str]:
    """Read `--topics`: a number N (topics load.t0 .. load.tN-1) or a comma-separated list."""
    if spec.isdigit():
        return [f"load.t{i}" for i in range(int(spec))]
    return [t.strip() for t in spec.split(",") if t.strip()]


def plan(
    *,
    count: int,
    topics: list[str],
    dup_rate: float,
    replay_old: float,
    source: str,
    seed: int | None,
    subject_prefix: str,
) -> Iterator[Planned]:
    """Yield `count` messages, each with its subject under `subject_prefix` and its Msg-Id.

    A duplicate repeats an event already planned, byte for byte and with the same Msg-Id: a
    fraction `replay_old` of them are replays meant to arrive after the broker has forgotten
    the id (so the store's permanent layer drops them), the rest arrive right away.
    """
    rng = random.Random(seed)
    sent: list[Outbound] = []
    for n in range(count):
        if sent and rng.random() < dup_rate:
            # The original's message itself: a duplicate costs no encoding and no new Msg-Id.
            original = sent[rng.randrange(len(sent))]
            yield ("old" if rng.random() < replay_old else "recent"), original
            continue
        topic = topics[rng.randrange(len(topics))]
        event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        event = IncomingEvent(
            topic=topic,
            event_id=event_id,
            timestamp=datetime.now(UTC),
            source=source,
            payload=msgspec.Raw(msgspec.json.encode({"n": n, "value": rng.random()})),
        )
        message = Outbound(
            subject_for(topic, subject_prefix),
            encode_event(event),
            msg_id(topic, event_id),
            topic,
            event_id,
        )
        sent.append(message)
        yield "new", message
