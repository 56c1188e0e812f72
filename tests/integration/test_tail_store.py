"""The store's commit-order positions: gap-free under interleaved commits, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime

import asyncpg
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import batch_items
from oncelog.api import queries
from oncelog.api.tail import FrameData, frame
from oncelog.events import Event
from oncelog.local.tail import parse_sse
from oncelog.store import tail
from oncelog.store.batch import store_batch
from oncelog.store.tail import ORIGIN, POSITION_PATTERN, Position, PositionError


async def exposed(pool: asyncpg.Pool, after: Position = ORIGIN) -> list[tuple[Position, str]]:
    async with pool.acquire() as conn:
        rows = await tail.read_after(conn, after, 10_000)
    return [(Position(r["tx"], r["pos"]), r["event_id"]) for r in rows]


async def test_a_later_commit_of_an_earlier_transaction_is_never_skipped(
    pool: asyncpg.Pool,
) -> None:
    """Transaction A starts storing first and commits last; B commits in between. A reader
    never sees B's rows while A may still commit below them, so one that resumes after the last
    position it saw misses none of A's rows; and nothing of a rolled-back C ever shows."""
    async with pool.acquire() as a_conn, pool.acquire() as b_conn, pool.acquire() as c_conn:
        a = a_conn.transaction()
        await a.start()
        await store_batch(a_conn, batch_items("t.a", ["a1", "a2"]), shard=0)
        c = c_conn.transaction()
        await c.start()
        await store_batch(c_conn, batch_items("t.c", ["c1"]), shard=0)
        # B commits while A and C are open: its rows are visible to plain reads already ...
        await store_batch(b_conn, batch_items("t.b", ["b1", "b2"]), shard=0)
        assert await pool.fetchval("SELECT count(*) FROM events WHERE topic = 't.b'") == 2
        # ... but not exposed: A's (and C's) lower transaction ids could still commit below them.
        assert await exposed(pool) == []
        await c.rollback()
        assert await exposed(pool) == []
        await a.commit()
    seen = await exposed(pool)
    assert [event_id for _, event_id in seen] == ["a1", "a2", "b1", "b2"]
    positions = [p for p, _ in seen]
    assert positions == sorted(positions)
    assert len(set(positions)) == 4
    async with pool.acquire() as conn:
        assert await tail.head(conn) == positions[-1]
    # Resuming after any position yields exactly what follows it.
    for i, p in enumerate(positions):
        assert [e for _, e in await exposed(pool, p)] == [e for _, e in seen[i + 1 :]]


async def test_concurrent_writers_resumed_readers_miss_nothing_and_repeat_nothing(
    pool: asyncpg.Pool,
) -> None:
    """Eight writers commit 40 small batches each in random interleavings while a reader polls
    and resumes after the last position it saw: it ends with every stored row, once, in order."""
    stop = asyncio.Event()
    got: list[tuple[Position, str]] = []

    async def writer(w: int) -> None:
        for b in range(40):
            async with pool.acquire() as conn:
                await store_batch(conn, batch_items(f"w{w}", [f"{w}-{b}-{k}" for k in range(5)]), w)

    async def reader() -> None:
        after = ORIGIN
        while True:
            finished = stop.is_set()
            rows = await exposed(pool, after)
            got.extend(rows)
            if rows:
                after = rows[-1][0]
            if finished and not rows:
                return
            await asyncio.sleep(0.002)

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(w) for w in range(8)))
    # A reader that starts after the writers end sees everything at once.
    stop.set()
    await asyncio.wait_for(reading, 60)
    stored = await pool.fetch("SELECT event_id FROM events")
    assert len(got) == len(stored) == 8 * 40 * 5
    assert sorted(e for _, e in got) == sorted(r["event_id"] for r in stored)
    assert [p for p, _ in got] == sorted({p for p, _ in got})


async def test_read_until_bounds_a_catch_up(pool: asyncpg.Pool) -> None:
    """read_after with `until` returns the rows up to that position and no further."""
    async with pool.acquire() as conn:
        await store_batch(conn, batch_items("u", ["1", "2", "3"]), shard=0)
        rows = await tail.read_after(conn, ORIGIN, 10)
        middle = Position(rows[1]["tx"], rows[1]["pos"])
        upto = await tail.read_after(conn, ORIGIN, 10, until=middle)
        assert [r["event_id"] for r in upto] == ["1", "2"]
        only = await tail.read_after(conn, ORIGIN, 10, condition="event_id = $1", params=("3",))
        assert [r["event_id"] for r in only] == ["3"]


@given(st.integers(0, 10**18 - 1), st.integers(0, 10**18 - 1))
def test_positions_round_trip_and_order(tx: int, pos: int) -> None:
    """str() and parse() are inverse, and the text form names the same order."""
    p = Position(tx, pos)
    assert Position.parse(str(p)) == p
    assert p < Position(tx, pos + 1)
    assert p < Position(tx + 1, 0)


@given(st.text(max_size=45) | st.from_regex(r"-?[0-9]{1,20}-[0-9\u0660-\u0669]{1,20}\n?"))
def test_any_other_text_is_refused_precisely(text: str) -> None:
    """Any text is either exactly a position's canonical form (which PostgreSQL's bigint
    holds) or a PositionError."""
    try:
        p = Position.parse(text)
    except PositionError:
        assert re.fullmatch(POSITION_PATTERN, text) is None
        return
    assert str(p) == text
    assert re.fullmatch(POSITION_PATTERN, text)
    assert max(p.tx, p.pos) < 2**63


# What the validator lets into the store: no NUL, no lone surrogate, finite numbers.
_STORABLE_TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]))
_STORABLE_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _STORABLE_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_STORABLE_TEXT, inner, max_size=3),
    max_leaves=12,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(_STORABLE_TEXT, _STORABLE_JSON, max_size=4))
async def test_a_payload_as_postgresql_prints_it_is_one_line_of_the_same_json(
    pool: asyncpg.Pool, payload: dict[str, object]
) -> None:
    """The stream sends the stored jsonb as PostgreSQL prints it, without decoding it: whatever
    the payload holds (CR, LF, NEL, U+2028, any control character, big numbers), that text adds
    no line to a frame and reads back as the JSON /events sends for the same row."""
    printed = await pool.fetchval("SELECT $1::jsonb::text", json.dumps(payload))
    row = {
        "tx": 1,
        "pos": 2,
        "topic": "a.b",
        "event_id": "e",
        "ts": datetime(2026, 12, 1, tzinfo=UTC),
        "source": "s",
        "payload": printed,
    }
    wire = frame(row)
    assert wire.count(b"\n") == 3
    assert b"\r" not in wire
    [(ident, data)] = list(parse_sse(iter(wire.splitlines(keepends=True))))
    assert ident == "1-2"
    # The same JSON as /events, which decodes the printed text and encodes it again (so a
    # float such as 4.5e16 reads back, in both, as the integer PostgreSQL's numeric prints).
    assert json.loads(data) == json.loads(msgspec.json.encode(queries.event_of(row)))
    assert json.loads(data)["payload"].keys() == payload.keys()


def test_frame_data_is_the_event_field_for_field() -> None:
    """A frame's data has /events' fields in /events' order."""
    assert FrameData.__struct_fields__ == Event.__struct_fields__


async def test_a_read_holds_at_most_its_bytes_and_the_next_read_goes_on(
    pool: asyncpg.Pool,
) -> None:
    """A read keeps the rows up to the first whose payloads would pass `max_bytes` (the first
    always comes) and says it was cut; reading on after its last row misses and repeats none."""
    ids = [f"e{i}" for i in range(10)]
    async with pool.acquire() as conn:
        await store_batch(conn, batch_items("t.bytes", ids), shard=0)
        # Each payload prints as {"n": 0} and so on: 8 bytes, so 3 start within 20.
        first = await tail.read_after(conn, ORIGIN, 100, max_bytes=20)
        assert [r["event_id"] for r in first] == ["e0", "e1", "e2"]
        assert [r["upto"] for r in first] == [8, 16, 24]
        assert tail.more_after(first, 100, 20)
        assert not tail.more_after(first[:2], 100, 20)
        assert tail.more_after(first, 3, 10**9)
        got, after = [], ORIGIN
        while rows := await tail.read_after(conn, after, 100, max_bytes=20):
            assert len(rows) <= 3
            got += [r["event_id"] for r in rows]
            after = Position(rows[-1]["tx"], rows[-1]["pos"])
        alone = await tail.read_after(conn, ORIGIN, 100, max_bytes=1)
    assert got == ids
    assert [r["event_id"] for r in alone] == ["e0"]
