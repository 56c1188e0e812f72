"""A reproducible plan of events to publish, duplicates included."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import msgspec

from oncelog.events import IncomingEvent, encode_event

__all__ = ["Planned", "plan", "topics_from"]


class Planned(msgspec.Struct, frozen=True):
    """One message to publish; `kind` is "new", "recent" (a duplicate inside the broker's
    window) or "old" (a replay sent once the window has passed for its original)."""

    topic: str
    event_id: str
    body: bytes
    kind: str


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
) -> Iterator[Planned]:
    """Yield `count` messages.

    A duplicate repeats an event already planned, byte for byte and with the same Msg-Id: a
    fraction `replay_old` of them are replays meant to arrive after the broker has forgotten
    the id (so the store's permanent layer drops them), the rest arrive right away.
    """
    rng = random.Random(seed)
    sent: list[Planned] = []
    for n in range(count):
        if sent and rng.random() < dup_rate:
            original = sent[rng.randrange(len(sent))]
            kind = "old" if rng.random() < replay_old else "recent"
            yield Planned(original.topic, original.event_id, original.body, kind)
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
        planned = Planned(topic, event_id, encode_event(event), "new")
        sent.append(planned)
        yield planned
