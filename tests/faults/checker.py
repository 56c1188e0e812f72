"""The fault checker: what publishers were told against what the store and the API hold.

Every fault test keeps a `Ledger` of each event's fate at the publisher (attempted, acked, or
only ever errors), then, after the fault is healed and the pipeline drained, `check` reads the
events table and the API and computes lost, duplicate and unexpected events and the statistics
invariants. `RESULTS` collects one `Verdict` per test for the table printed at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import asyncpg
import msgspec
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from oncelog.store import stats

__all__ = [
    "RESULTS",
    "Key",
    "Ledger",
    "Verdict",
    "check",
    "drained",
    "expired_keys",
    "stored_keys",
    "wait_stored",
]

Key = tuple[str, str]

# Verdicts of the session, in the order the tests ran; the conftest prints them as a table.
RESULTS: list[Verdict] = []


class Ledger:
    """Each event's fate at the publisher: attempted, acked (PubAck received), or errors only."""

    def __init__(self) -> None:
        self.attempted: set[Key] = set()
        # When the first PubAck arrived, so recovery can ask for "everything acked before T".
        self.acked: dict[Key, float] = {}
        self.errors: Counter[str] = Counter()
        # The last message of each kind of error, to show what publishers were told.
        self.error_messages: dict[str, str] = {}
        self.failed: set[Key] = set()
        self.broker_duplicates = 0
        self.copies_with_msg_id = 0
        self.copies_without_msg_id = 0

    def attempt(self, key: Key) -> None:
        """Record that a publisher is about to send `key`."""
        self.attempted.add(key)

    def ack(self, key: Key, *, duplicate: bool) -> None:
        """Record a PubAck for `key`; the first one dates the event."""
        self.acked.setdefault(key, time.monotonic())
        self.failed.discard(key)
        if duplicate:
            self.broker_duplicates += 1

    def error(self, exc: BaseException) -> None:
        """Record one failed publish attempt by the kind of error the publisher saw."""
        self.errors[type(exc).__name__] += 1
        self.error_messages[type(exc).__name__] = str(exc)

    def give_up(self, key: Key) -> None:
        """Record that every retry of `key` failed: it may or may not be in the stream."""
        if key not in self.acked:
            self.failed.add(key)

    def acked_before(self, instant: float) -> list[Key]:
        """Return the events whose first PubAck came before `instant` (time.monotonic)."""
        return [key for key, at in self.acked.items() if at <= instant]


class Verdict(msgspec.Struct, kw_only=True):
    """What one fault test measured."""

    fault: str
    runs: int
    attempted: int = 0
    acked: int = 0
    lost: int = 0
    duplicate_rows: int = 0
    unexpected: int = 0
    violations: list[str] = msgspec.field(default_factory=list)
    recovery_seconds: float | None = None
    redelivered: int = 0
    publish_errors: dict[str, int] = msgspec.field(default_factory=dict)
    dead_lettered: int = 0
    expected_failure: str = ""

    @property
    def ok(self) -> bool:
        """Whether nothing was lost, stored twice or invented, and every invariant held."""
        return not (self.lost or self.duplicate_rows or self.unexpected or self.violations)


async def stored_keys(pool: asyncpg.Pool, keys: list[Key]) -> int:
    """Return how many of `keys` are rows of the events table."""
    if not keys:
        return 0
    return int(
        await pool.fetchval(
            """SELECT count(*) FROM events e
               JOIN unnest($1::text[], $2::text[]) AS k(topic, event_id)
                 ON e.topic = k.topic AND e.event_id = k.event_id""",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
    )


async def expired_keys(pool: asyncpg.Pool, keys: list[Key]) -> set[Key]:
    """Return those of `keys` that retention expired and the dedup horizon remembers."""
    if not keys:
        return set()
    rows = await pool.fetch(
        """SELECT k.topic, k.event_id FROM unnest($1::text[], $2::text[]) AS k(topic, event_id)
           WHERE EXISTS (SELECT FROM expired_keys x WHERE x.key = event_key(k.topic, k.event_id))""",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(r["topic"], r["event_id"]) for r in rows}


async def wait_stored(pool: asyncpg.Pool, keys: list[Key], since: float, within: float) -> float:
    """Wait until every one of `keys` is stored; return the seconds since `since` (monotonic)."""
    deadline = time.monotonic() + within
    while True:
        try:
            if await stored_keys(pool, keys) == len(keys):
                return time.monotonic() - since
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # the store may still be coming back
        if time.monotonic() > deadline:
            raise AssertionError(f"acked events not all stored within {within}s")
        await asyncio.sleep(0.1)


async def drained(
    js: JetStreamContext, stream: str, durable: str, pool: asyncpg.Pool, ledger: Ledger
) -> bool:
    """Whether the durable has nothing pending or unacked and every acked event is stored (or
    expired by retention)."""
    try:
        info = await js.consumer_info(stream, durable, timeout=5)
    except Exception:  # the broker may be electing a leader; ask again
        return False
    if info.num_pending or info.num_ack_pending:
        return False
    keys = list(ledger.acked)
    # An acked event retention has expired counts as kept: its key is remembered.
    return await stored_keys(pool, keys) + len(await expired_keys(pool, keys)) == len(keys)


async def _api_violations(
    api: AsyncTestClient[Any], pool: asyncpg.Pool, ledger: Ledger
) -> list[str]:
    """Compare the API's /stats with the table and query every acked event through /events."""
    found: list[str] = []
    stats = (await api.get("/stats")).json()
    rows = int(await pool.fetchval("SELECT count(*) FROM events"))
    if stats["unique_processed"] - stats["expired"] != rows:
        found.append(
            f"/stats unique_processed {stats['unique_processed']} - expired {stats['expired']}"
            f" != {rows} rows"
        )
    if stats["received"] != (
        stats["unique_processed"] + stats["duplicate_dropped"] + stats["dead_lettered"]
    ):
        found.append(f"/stats received does not add up: {stats}")
    by_topic: dict[str, set[str]] = {}
    expired = await expired_keys(pool, list(ledger.acked))
    for topic, event_id in ledger.acked:
        if (topic, event_id) not in expired:
            by_topic.setdefault(topic, set()).add(event_id)
    for topic, wanted in sorted(by_topic.items()):
        seen: set[str] = set()
        url: str | None = f"/events?topic={topic}&limit=1000"
        while url is not None:
            response = await api.get(url)
            if response.status_code != 200:
                found.append(f"GET {url} answered {response.status_code}")
                break
            seen.update(e["event_id"] for e in response.json())
            link = response.headers.get("link")
            url = link[1 : link.index(">")] if link else None
        if missing := len(wanted - seen):
            found.append(f"{missing} acked events of {topic} not returned by /events")
    return found


async def check(
    fault: str,
    runs: int,
    ledger: Ledger,
    pool: asyncpg.Pool,
    js: JetStreamContext,
    stream: str,
    *,
    api: AsyncTestClient[Any] | None = None,
    recovery_seconds: float | None = None,
    dead_letters_expected: int = 0,
) -> Verdict:
    """Compute the verdict of a drained pipeline and add it to RESULTS."""
    rows = await pool.fetch("SELECT topic, event_id FROM events")
    stored = Counter((r["topic"], r["event_id"]) for r in rows)
    info = await js.stream_info(stream)
    # An acked event that retention expired is accounted for: its key is remembered.
    expired = await expired_keys(pool, list(ledger.acked))
    totals = stats.totals(await stats.per_topic(pool))
    violations = await stats.invariant_violations(pool, info.state.last_seq)
    if api is not None:
        violations += await _api_violations(api, pool, ledger)
    if totals.dead_lettered != dead_letters_expected:
        violations.append(f"{totals.dead_lettered} dead letters, expected {dead_letters_expected}")
    verdict = Verdict(
        fault=fault,
        runs=runs,
        attempted=len(ledger.attempted),
        acked=len(ledger.acked),
        lost=sum(1 for key in ledger.acked if key not in stored and key not in expired),
        duplicate_rows=sum(n - 1 for n in stored.values()),
        unexpected=sum(1 for key in stored if key not in ledger.attempted),
        violations=violations,
        recovery_seconds=None if recovery_seconds is None else round(recovery_seconds, 2),
        redelivered=totals.redelivered,
        publish_errors=dict(ledger.errors),
        dead_lettered=totals.dead_lettered,
    )
    RESULTS.append(verdict)
    return verdict
