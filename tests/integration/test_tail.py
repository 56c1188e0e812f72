"""The live tail (GET /events/stream) over real HTTP, NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import uvicorn
from nats.js import JetStreamContext

from helpers import api_settings, assert_invariants, running_consumer, wait_until
from oncelog.api.app import create_app
from oncelog.api.state import app_state
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import msg_id, subject_for
from oncelog.local.embedded import free_port
from oncelog.platform import broker
from oncelog.platform.publish import Outbound, publish_many
from oncelog.store.tail import Position


@contextlib.asynccontextmanager
async def serving(settings: ConsumerSettings, **overrides: Any) -> AsyncIterator[str]:
    """Serve the API with uvicorn in this event loop; yield its base URL."""
    port = free_port()
    app = create_app(api_settings(settings, **overrides))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base) as http:

        async def ready() -> bool:
            with contextlib.suppress(httpx.TransportError):
                return (await http.get("/ready")).status_code == 200
            return False

        await wait_until(ready, within=20)
    try:
        yield base
    finally:
        app_state(app).closing.set()
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@dataclass
class Tailer:
    """A client of the stream: what it received, in order."""

    base: str
    topic: str
    headers: dict[str, str] = field(default_factory=dict)
    events: list[tuple[Position, dict[str, Any]]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop_after: int | None = None, after: str | None = None) -> None:
        """Read events until cancelled, or until `stop_after` more have arrived."""
        headers = dict(self.headers)
        if after is not None:
            headers["Last-Event-ID"] = after
        got = 0
        async with (
            httpx.AsyncClient(base_url=self.base, timeout=httpx.Timeout(10, read=120)) as http,
            http.stream(
                "GET", "/events/stream", params={"topic": self.topic}, headers=headers
            ) as r,
        ):
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            ident: str | None = None
            async for line in r.aiter_lines():
                if line.startswith("retry:"):
                    self.connected.set()
                elif line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("id: "):
                    ident = line[4:]
                elif line.startswith("data: "):
                    assert ident is not None
                    self.events.append((Position.parse(ident), json.loads(line[6:])))
                    ident = None
                    got += 1
                    if stop_after is not None and got >= stop_after:
                        return

    @property
    def last_id(self) -> str:
        return str(self.events[-1][0])


def matches_auth(topic: str) -> bool:
    return topic.startswith("auth.")


def matches_prod(topic: str) -> bool:
    parts = topic.split(".")
    return len(parts) == 2 and parts[1] == "prod"


TOPICS = ["auth.prod", "auth.login", "auth.login.prod", "billing.prod", "billing.dev"]


async def test_two_tails_get_exactly_the_stored_events_once_in_order_and_resume_without_gaps(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool
) -> None:
    """10,000 messages, 30% duplicates (half inside the broker's window, half replayed past
    it), from two NATS and two HTTP publishers, stored by two consumer replicas. A tail of
    `auth.>` and one of `*.prod` each receive exactly the matching stored events, once each, in
    position order, with the same JSON as /events; the second disconnects mid-way and resumes
    with Last-Event-ID on another API process, missing nothing and repeating nothing."""
    # A short broker window, so that replays past it are quick to make; every service
    # provisions the stream with it.
    settings = msgspec.structs.replace(settings, duplicate_window_seconds=1.0)
    await broker.ensure_stream(js, settings)
    assert (await js.stream_info(settings.stream)).config.duplicate_window == 1.0

    rng = random.Random(14)
    unique = [(rng.choice(TOPICS), f"e{i}") for i in range(7000)]
    inside = rng.sample(unique, 1500)
    past = rng.sample(unique, 1500)

    async with (
        serving(settings) as base,
        serving(settings) as other,
        running_consumer(settings, js, pool, shard=0),
        running_consumer(settings, js, pool, shard=1),
    ):
        auth = Tailer(base, "auth.>")
        prod = Tailer(base, "*.prod")
        auth_task = asyncio.create_task(auth.run())
        prod_first = asyncio.create_task(prod.run(stop_after=300))
        await asyncio.wait_for(auth.connected.wait(), 10)
        await asyncio.wait_for(prod.connected.wait(), 10)

        def outbound(topic: str, event_id: str) -> Outbound:
            body = json.dumps({"event_id": event_id, "payload": {"topic": topic}}).encode()
            return Outbound(
                subject_for(topic, settings.subject_prefix),
                body,
                msg_id(topic, event_id),
                topic,
                event_id,
            )

        async def over_nats(events: list[tuple[str, str]]) -> None:
            for i in range(0, len(events), 200):
                chunk = [outbound(t, e) for t, e in events[i : i + 200]]
                await publish_many(js, chunk, deadline=time.monotonic() + 30)

        async def over_http(events: list[tuple[str, str]]) -> None:
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                for i in range(0, len(events), 100):
                    body = [
                        {"topic": t, "event_id": e, "payload": {"topic": t}}
                        for t, e in events[i : i + 100]
                    ]
                    resp = await http.post("/publish", json=body)
                    assert resp.status_code == 202, resp.text

        first = unique + inside
        rng.shuffle(first)
        quarter = len(first) // 4
        await asyncio.gather(
            over_nats(first[:quarter]),
            over_nats(first[quarter : 2 * quarter]),
            over_http(first[2 * quarter : 3 * quarter]),
            over_http(first[3 * quarter :]),
        )
        # The first part of the *.prod tail ends; it reconnects, to another API process, while
        # the replays go in.
        await asyncio.wait_for(prod_first, 60)
        prod.base = other
        resumed = asyncio.create_task(prod.run(after=prod.last_id))
        await asyncio.sleep(1.2)  # past the broker's 1 s window: the store must catch these
        await asyncio.gather(over_nats(past[:750]), over_http(past[750:]))

        async def drained() -> bool:
            info = await js.consumer_info(settings.stream, settings.durable)
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)

        await wait_until(drained, within=120)
        totals = await assert_invariants(pool)
        assert totals["stored"] == 7000
        # Every replay past the window reached the store, which dropped it (the broker's own
        # drops are counted only for HTTP, by the gateway).
        assert totals["store_duplicates"] >= 1500

        rows = await pool.fetch("SELECT topic, event_id FROM events ORDER BY tx, pos")
        want_auth = [(r["topic"], r["event_id"]) for r in rows if matches_auth(r["topic"])]
        want_prod = [(r["topic"], r["event_id"]) for r in rows if matches_prod(r["topic"])]

        async def complete() -> bool:
            return len(auth.events) >= len(want_auth) and len(prod.events) >= len(want_prod)

        await wait_until(complete, within=60)
        # Nothing more arrives: a moment's grace for a stray repeat to show.
        await asyncio.sleep(0.5)
        auth_task.cancel()
        resumed.cancel()
        for task in (auth_task, resumed):
            with contextlib.suppress(asyncio.CancelledError):
                await task

        for tailer, want in ((auth, want_auth), (prod, want_prod)):
            got = [(e["topic"], e["event_id"]) for _, e in tailer.events]
            assert got == want
            positions = [p for p, _ in tailer.events]
            assert positions == sorted(set(positions))
        # The same JSON as /events, field for field.
        sample = auth.events[len(auth.events) // 2][1]
        query = {"topic": sample["topic"], "since": sample["timestamp"], "limit": "1000"}
        async with httpx.AsyncClient(base_url=base) as http:
            page = (await http.get("/events", params=query)).json()
        assert sample in page


@pytest.mark.parametrize("cap", [{"tail_buffer": 2}, {"tail_buffer_bytes": 1024}])
async def test_a_stream_too_slow_for_its_buffer_reads_on_from_the_store(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool, cap: dict[str, int]
) -> None:
    """With a buffer of 2 events, or of 1 KiB, one commit of 300 events overflows the stream at
    once: it reads on from the store, counts a resync, and still delivers all 300 once, in
    order."""
    async with (
        serving(settings, **cap) as base,
        running_consumer(settings, js, pool),
    ):
        tailer = Tailer(base, ">")
        task = asyncio.create_task(tailer.run(stop_after=300))
        await asyncio.wait_for(tailer.connected.wait(), 10)
        async with httpx.AsyncClient(base_url=base) as http:
            body = [{"topic": "slow.t", "event_id": str(i)} for i in range(300)]
            assert (await http.post("/publish", json=body)).status_code == 202
            await asyncio.wait_for(task, 60)
            metrics = (await http.get("/metrics")).text
        stored = await pool.fetch("SELECT event_id FROM events ORDER BY tx, pos")
        assert [e["event_id"] for _, e in tailer.events] == [r["event_id"] for r in stored]
        assert len(stored) == 300
        resyncs = [
            line for line in metrics.splitlines() if line.startswith("oncelog_tail_resyncs_total")
        ]
        assert resyncs
        assert float(resyncs[0].split()[-1]) >= 1


async def test_events_past_a_reads_byte_budget_all_arrive_live_and_on_catch_up(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool
) -> None:
    """Twelve events of 800 kB, 9.6 MB, pass one read's 8 MiB. A live stream gets them as they
    commit; a stream catching up from the start reads them from the store, where a read is cut
    after eleven and the next goes on from there. Both get all twelve once, in the store's
    commit order (two commit workers may store 10 before 9). (The follower's going on after a
    cut read is `more_after`, tested in test_tail_store.py.)"""
    blob = "x" * 800_000
    async with (
        serving(settings) as base,
        running_consumer(settings, js, pool),
    ):
        live = Tailer(base, "big.t")
        task = asyncio.create_task(live.run(stop_after=12))
        await asyncio.wait_for(live.connected.wait(), 10)
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            for i in range(12):
                event = {"topic": "big.t", "event_id": str(i), "payload": {"blob": blob}}
                assert (await http.post("/publish", json=event)).status_code == 202
        await asyncio.wait_for(task, 60)
        late = Tailer(base, "big.t")
        await asyncio.wait_for(late.run(stop_after=12, after="0-0"), 60)
        stored = [
            r["event_id"] for r in await pool.fetch("SELECT event_id FROM events ORDER BY tx, pos")
        ]
    assert sorted(stored, key=int) == [str(i) for i in range(12)]
    assert [e["event_id"] for _, e in live.events] == stored
    assert [e["event_id"] for _, e in late.events] == stored
    assert all(e["payload"] == {"blob": blob} for _, e in late.events)


async def test_keep_alives_cap_keys_and_hostile_positions(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool
) -> None:
    """An idle stream sends keep-alive comments; the stream cap answers 503 with Retry-After;
    read keys apply; a bad topic or position is a 422 naming its field."""
    async with serving(
        settings, tail_keepalive_seconds=0.2, tail_max_streams=1, api_keys_read="k1"
    ) as base:
        tailer = Tailer(base, "a.>", headers={"X-API-Key": "k1"})
        task = asyncio.create_task(tailer.run())
        await asyncio.wait_for(tailer.connected.wait(), 10)

        async def kept_alive() -> bool:
            return len(tailer.comments) >= 2

        await wait_until(kept_alive, within=10)
        assert tailer.comments[0] == ": keep-alive"
        async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": "k1"}) as http:
            full = await http.get("/events/stream")
            assert full.status_code == 503
            assert full.headers["retry-after"]
            assert "TAIL_MAX_STREAMS" in full.json()["detail"]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert (
                await http.get("/events/stream", headers={"X-API-Key": "nope"})
            ).status_code == 401
            cases: list[tuple[dict[str, str], dict[str, str | bytes], str]] = [
                ({"topic": "a..b"}, {}, "topic"),
                ({"topic": "a.b\n"}, {}, "topic"),
                ({"after": "12"}, {}, "after"),
                ({"after": "1-2-3"}, {}, "after"),
                ({"after": "99999999999999999999-1"}, {}, "after"),
                ({"after": ""}, {}, "after"),
                ({"after": "01-2"}, {}, "after"),
                ({}, {"Last-Event-ID": "x"}, "Last-Event-ID"),
                ({}, {"Last-Event-ID": "-1-1"}, "Last-Event-ID"),
                ({}, {"Last-Event-ID": "\u0661-2".encode()}, "Last-Event-ID"),
            ]
            for params, headers, field_name in cases:

                async def refused(
                    p: dict[str, str] = params, h: dict[str, str | bytes] = headers
                ) -> httpx.Response:
                    raw = {
                        k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in h.items()
                    }
                    return await http.get("/events/stream", params=p, headers=raw)

                resp = await asyncio.wait_for(refused(), 10)
                assert resp.status_code == 422, (params, headers, resp.text)
                assert [e["field"] for e in resp.json()["errors"]] == [field_name], resp.text


async def test_a_stopping_server_ends_its_streams(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool
) -> None:
    """When the server begins to stop, open streams end, so the stop does not hang on them."""
    async with serving(settings) as base:
        tailer = Tailer(base, ">")
        task = asyncio.create_task(tailer.run())
        await asyncio.wait_for(tailer.connected.wait(), 10)
    # serving() set `closing` and waited for the server: the stream ended by itself.
    await asyncio.wait_for(task, 10)


async def test_just_tail_prints_one_json_line_per_event_and_resumes(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool
) -> None:
    """`python -m oncelog.local.tail` (what `just tail` runs) prints each matching stored event
    as one JSON line; with --after 0-0 it starts from the beginning of the store."""
    async with serving(settings) as base, running_consumer(settings, js, pool):
        async with httpx.AsyncClient(base_url=base) as http:
            body = [{"topic": f"cli.{t}", "event_id": str(i)} for i in range(5) for t in "ab"]
            assert (await http.post("/publish", json=body)).status_code == 202

        async def stored() -> bool:
            return int(await pool.fetchval("SELECT count(*) FROM events")) == 10

        await wait_until(stored, within=30)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "oncelog.local.tail",
            "cli.a",
            "--after",
            "0-0",
            env=dict(os.environ) | {"API_URL": base},
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            lines = [
                json.loads(await asyncio.wait_for(proc.stdout.readline(), 20)) for _ in range(5)
            ]
        finally:
            proc.terminate()
            await proc.wait()
    assert sorted(e["event_id"] for e in lines) == [str(i) for i in range(5)]
    assert {e["topic"] for e in lines} == {"cli.a"}


async def test_just_tail_with_no_api_says_so_and_exits() -> None:
    """With nothing listening, the CLI ends in bounded time with one line naming the URL."""
    url = f"http://127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "oncelog.local.tail",
        env=dict(os.environ) | {"API_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert url in err.decode()
    assert "Traceback" not in err.decode()
