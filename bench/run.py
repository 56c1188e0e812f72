"""`just bench`: oncelog's throughput, latency, query speed and memory on this machine.

Runs everything on the embedded stack (nats-server and PostgreSQL from their wheels, fsync on)
and prints a table; JSON and a PNG plot go to the results folder. `--quick` shrinks every
scenario to finish in about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats

from oncelog import migrate
from oncelog.consumer.pull import Puller
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import decode_message
from oncelog.local.embedded import NatsServer, PostgresServer, free_port
from oncelog.platform import db
from oncelog.platform.settings import CommonSettings, load
from oncelog.platform.wire import Delivery, respond
from oncelog.store.batch import Item, store_batch
from oncelog.store.stats import STATS_SHARDS

TOPICS = 8
# Events awaiting their PubAck at once, in live ingestion (the publisher's --inflight) and in
# HTTP ingestion (clients x events per request): the same depth, so that neither side is
# judged at a pipeline the other does not get.
INFLIGHT = 2000
HTTP_BATCH = 100
# The latency scenario offers this share of the same run's drain rate.
LATENCY_SHARE = 0.25
PAYLOAD = {"user": 1234, "action": "login", "ok": True, "ip": "10.0.0.1", "agent": "bench/1.0"}


# A service under cProfile. uvicorn raises the stop signal again once it has shut down, which
# would end the process before the stats are written, so that last raise is skipped here.
_PROFILED = """
import cProfile, runpy, signal, sys
sys.argv[0] = {module!r}
signal.raise_signal = lambda sig: None
profile = cProfile.Profile()
try:
    profile.runcall(runpy.run_module, {module!r}, run_name="__main__", alter_sys=True)
finally:
    profile.dump_stats({out!r})
"""


@dataclass
class Stack:
    """Embedded servers of one scenario and the environment services need to reach them."""

    nats: NatsServer
    postgres: PostgresServer
    settings: CommonSettings
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return (
            dict(os.environ)
            | {
                "NATS_URL": self.nats.url,
                "DATABASE_URL": self.settings.database_url,
                "STREAM_MAX_BYTES": str(self.settings.stream_max_bytes),
                "LOG_LEVEL": "WARNING",
            }
            | extra
        )

    def spawn(self, module: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        run = [sys.executable, "-m", module, *args]
        if profiles := os.environ.get("BENCH_PROFILE_DIR"):
            # Each service under cProfile, its stats written when it stops (pstats to read).
            out = Path(profiles) / f"{module}-{time.monotonic_ns()}.prof"
            run[1:3] = ["-c", _PROFILED.format(out=str(out), module=module)]
        proc = subprocess.Popen(run, env=self.env(**env))  # noqa: S603
        self.procs.append(proc)
        return proc

    def stop_services(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            proc.wait(60)
        self.procs.clear()


@contextmanager
def stack(root: Path, sync_always: bool = False, commit_times: bool = False) -> Iterator[Stack]:
    """Start nats-server and PostgreSQL in `root`, migrated and provisioned.

    `commit_times` has PostgreSQL keep each transaction's commit time
    (track_commit_timestamp), from which the HTTP latency scenario reads when each row became
    durable.
    """
    root.mkdir(parents=True, exist_ok=True)
    config = None
    if sync_always:
        config = root / "nats.conf"
        config.write_text("jetstream { sync_interval: always }\n")
    nats_server = NatsServer(root / "nats", config_file=config).start()
    pg_settings = {"shared_buffers": "512MB", "max_wal_size": "4GB"}
    if commit_times:
        pg_settings["track_commit_timestamp"] = "on"
    postgres = PostgresServer(root / "pg", settings=pg_settings).start()
    settings = load(
        CommonSettings,
        {},
        nats_url=nats_server.url,
        database_url=postgres.url("oncelog"),
        stream_max_bytes=16 * 1024**3,
    )
    s = Stack(nats_server, postgres, settings)
    try:
        asyncio.run(_prepare(s))
        yield s
    finally:
        s.stop_services()
        nats_server.stop()
        postgres.stop()
        # The kernel writes a stopped stack's files back for up to half a minute: on a shared
        # disk that would slow whichever scenario runs next, so it is done here, off the clock.
        os.sync()


async def _prepare(s: Stack) -> None:
    admin = await asyncpg.connect(s.postgres.url())
    await admin.execute("CREATE DATABASE oncelog")
    await admin.close()
    await migrate.run(s.settings, [], provision=True)


def events(count: int, dup_rate: float, seed: int) -> tuple[list[tuple[str, str, bytes]], int]:
    """Return (topic, event_id, body) for `count` messages, `dup_rate` of them repeats."""
    rng = random.Random(seed)
    out: list[tuple[str, str, bytes]] = []
    unique = 0
    for n in range(count):
        if out and rng.random() < dup_rate:
            out.append(out[rng.randrange(len(out))])
            continue
        topic = f"bench.t{rng.randrange(TOPICS)}"
        event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        body = json.dumps(
            {
                "event_id": event_id,
                "source": "bench",
                "timestamp": datetime.now(UTC).isoformat(),
                "payload": PAYLOAD | {"n": n},
            }
        ).encode()
        out.append((topic, event_id, body))
        unique += 1
    return out, unique


async def preload(s: Stack, count: int, dup_rate: float, seed: int = 1) -> tuple[int, float]:
    """Fill the stream with a backlog; return (unique events, publish rate)."""
    msgs, unique = events(count, dup_rate, seed)
    nc = await nats.connect(s.nats.url, pending_size=64 * 1024**2)
    js = nc.jetstream()
    started = time.monotonic()
    # Copies carry no Nats-Msg-Id here, so every duplicate reaches the store layer, the
    # expensive path; JetStream acks are awaited in windows so the backlog is durable.
    window = 2000
    for i in range(0, len(msgs), window):
        futures = [await js.publish_async(f"events.{t}", b) for t, _, b in msgs[i : i + window]]
        await asyncio.gather(*futures)
    rate = count / (time.monotonic() - started)
    await nc.close()
    return unique, rate


def consumer_settings(s: Stack) -> ConsumerSettings:
    """The settings a consumer spawned on this stack runs with (its batch size, workers)."""
    return load(
        ConsumerSettings, s.env(), nats_url=s.nats.url, database_url=s.settings.database_url
    )


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system) a process has used so far, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat(5); [0] here is field 3, the state.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_us_per_event(before: float, pid: int, events: int) -> float:
    """CPU microseconds per event a process spent since `before` (its cpu_seconds then)."""
    return round((cpu_seconds(pid) - before) * 1e6 / max(events, 1), 1)


async def ack_only(s: Stack, count: int) -> dict[str, Any]:
    """Ceiling (a): the durable's backlog delivered to a consumer that only acks.

    The consumer's own pull driver and wire path in this process, with the consumer's batch
    size and window, and nothing stored: what nats-server and the NATS half of the consumer
    can do on this stack. Timed like the drain, from the first delivery to an empty stream.
    """
    defaults = consumer_settings(s)
    nc = await nats.connect(s.nats.url, pending_size=64 * 1024**2)
    held: list[Delivery] = []
    arrived = asyncio.Event()

    def deliver(delivery: Delivery) -> None:
        held.append(delivery)
        arrived.set()

    puller = Puller(
        nc,
        s.settings.stream,
        s.settings.durable,
        deliver,
        batch=defaults.batch_size,
        window=defaults.batch_size * (defaults.commit_workers + 1),
        max_bytes=defaults.max_inflight_bytes,
    )
    await puller.start()
    acked = 0
    started = 0.0
    deadline = time.monotonic() + 600
    try:
        while acked < count:
            await puller.top_up(len(held), 0)
            if not held:
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await arrived.wait()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {acked} of {count} acked")
                continue
            started = started or time.monotonic()
            batch = held[: defaults.batch_size]
            del held[: len(batch)]
            await respond(nc, batch)
            acked += len(batch)
        await nc.flush()
        t1 = await wait_acked(s)
    finally:
        await puller.stop()
        await nc.close()
    return {"events_per_second": round(count / (t1 - started)), "messages": count}


def bench_items(count: int, dup_rate: float, seed: int, prefix: str) -> list[Item]:
    """The preload's messages as the consumer hands them to store_batch, decoded already."""
    msgs, _ = events(count, dup_rate, seed)
    now = time.time_ns()
    out = []
    for seq, (topic, _, body) in enumerate(msgs, 1):
        subject = f"{prefix}.{topic}"
        result = decode_message(subject, body, now, prefix)
        out.append(Item(seq, 1, subject, now, None, body, result))
    return out


async def store_only(s: Stack, count: int) -> dict[str, Any]:
    """Ceiling (b): the same rows through the same statement, no NATS in the loop.

    `store_batch` on batches of the consumer's size from the preload's generator, with as many
    connections as the consumer has commit workers, into a database of its own on the same
    PostgreSQL (migrated, empty, like the drain's at its start).
    """
    defaults = consumer_settings(s)
    admin = await asyncpg.connect(s.postgres.url())
    await admin.execute("CREATE DATABASE ceiling")
    await admin.close()
    settings = load(CommonSettings, {}, database_url=s.postgres.url("ceiling"))
    await migrate.run(settings, [], provision=False)
    items = bench_items(count, 0.3, 1, s.settings.subject_prefix)
    size = defaults.batch_size
    batches = [items[i : i + size] for i in range(0, len(items), size)]
    batches.reverse()
    pool = await db.create_pool(settings, "bench-ceiling")
    try:

        async def worker(shard: int) -> None:
            async with pool.acquire() as conn:
                while batches:
                    await store_batch(conn, batches.pop(), shard)

        started = time.monotonic()
        workers = defaults.commit_workers
        await asyncio.gather(*(worker(i % STATS_SHARDS) for i in range(workers)))
        seconds = time.monotonic() - started
    finally:
        await pool.close()
    return {"events_per_second": round(count / seconds), "messages": count}


async def stats(dsn: str) -> tuple[int, int]:
    """Return (received, stored) from the statistics."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT coalesce(sum(received),0)::bigint, coalesce(sum(stored),0)::bigint FROM topic_stats"
        )
        assert row is not None
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


def peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


async def wait_received(
    s: Stack, target: int, procs: list[subprocess.Popen[bytes]], limit: float = 1800
) -> tuple[float, float, int]:
    """Poll until `target` messages are counted; return (first seen, done, count at first)."""
    first: tuple[float, int] | None = None
    deadline = time.monotonic() + limit
    while True:
        got, _ = await stats(s.settings.database_url)
        now = time.monotonic()
        if got and first is None:
            first = (now, got)
        if got >= target:
            assert first is not None
            return first[0], now, first[1]
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a service exited during the benchmark")
        if now > deadline:
            raise RuntimeError(f"only {got} of {target} counted after {limit}s")
        await asyncio.sleep(0.05)


async def drain(s: Stack, count: int, replicas: int = 1) -> dict[str, Any]:
    """Time consumers draining the backlog: from the first count until every message is
    committed and acked (the work-queue stream is empty)."""
    procs = [
        s.spawn("oncelog.consumer", METRICS_PORT=str(free_port()), CONSUMER_ID=f"bench-{i}")
        for i in range(replicas)
    ]
    t0, committed, at_first = await wait_received(s, count, procs)
    t1 = await wait_acked(s)
    rss = max(peak_rss_mib(p.pid) for p in procs)
    cpu = sum(cpu_seconds(p.pid) for p in procs)
    s.stop_services()
    return {
        "events_per_second": round((count - at_first) / (t1 - t0)),
        "seconds": round(t1 - t0, 2),
        "ack_lag_seconds": round(t1 - committed, 2),
        "consumer_peak_rss_mib": rss,
        # Over the whole run, start-up included: a few hundredths of a second.
        "consumer_cpu_us_per_event": round(cpu * 1e6 / count, 1),
    }


async def wait_acked(s: Stack, limit: float = 1800) -> float:
    """Wait until the work-queue stream is empty (every message acked); return when it was."""
    nc = await nats.connect(s.nats.url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + limit
        while (await js.stream_info(s.settings.stream)).state.messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"messages still unacked after {limit}s")
            await asyncio.sleep(0.05)
        return time.monotonic()
    finally:
        await nc.close()


async def live(s: Stack, count: int) -> dict[str, Any]:
    """Publisher and consumer together: from the first event in the broker to the last stored."""
    consumer = s.spawn("oncelog.consumer", METRICS_PORT=str(free_port()))
    await asyncio.sleep(1.0)  # let the consumer bind before the publisher starts
    publisher = s.spawn(
        "oncelog.publisher",
        "--count",
        str(count),
        "--dup-rate",
        "0.3",
        "--replay-old",
        "0",
        "--topics",
        str(TOPICS),
        "--inflight",
        str(INFLIGHT),
        "--quiet",
        "--seed",
        "3",
    )
    consumer_cpu = cpu_seconds(consumer.pid)
    _, t1, _ = await wait_received(s, count, [consumer])
    consumer_us = cpu_us_per_event(consumer_cpu, consumer.pid, count)
    publisher.wait(60)
    seconds = await since_first_received(s, t1)
    s.stop_services()
    return {
        "events_per_second": round(count / seconds),
        "seconds": round(seconds, 2),
        "consumer_cpu_us_per_event": consumer_us,
    }


async def since_first_received(s: Stack, done: float) -> float:
    """Seconds from the broker's receipt of the first event stored to `done` (monotonic).

    Live and HTTP ingestion are both timed this way, so neither counts a process's start-up
    (the publisher's interpreter, say) nor the other's warm-up.
    """
    done_wall = time.time() - (time.monotonic() - done)
    conn = await asyncpg.connect(s.settings.database_url)
    try:
        first = await conn.fetchval(
            "SELECT extract(epoch FROM min(received_at))::float8 FROM events"
        )
    finally:
        await conn.close()
    assert isinstance(first, float)
    return done_wall - first


class Lean:
    """A keep-alive HTTP/1.1 client on one connection, a few microseconds per request.

    httpx spends about 3 ms of this machine's CPU on each request, more than the API itself,
    which would make the client the thing measured.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        data = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def api_ready(client: httpx.AsyncClient, within: float = 60) -> None:
    """Wait until the API answers /ready with 200."""
    deadline = time.monotonic() + within
    while True:
        try:
            if (await client.get("/ready")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the API did not become ready")
        await asyncio.sleep(0.2)


async def http_ingest(
    s: Stack, count: int, batch: int = HTTP_BATCH, clients: int = INFLIGHT // HTTP_BATCH
) -> dict[str, Any]:
    """POST /publish in batches from concurrent clients, as many events in flight as live
    ingestion keeps; e2e from the first event in the broker to the last one counted."""
    port = free_port()
    procs = [
        s.spawn("oncelog.consumer", METRICS_PORT=str(free_port())),
        s.spawn("oncelog.api", API_PORT=str(port), RATE_LIMIT_PER_SECOND="0"),
    ]
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        await api_ready(client)
        msgs, _ = events(count, 0.3, seed=5)
        bodies = [
            [json.loads(b) | {"topic": t} for t, _, b in msgs[i : i + batch]]
            for i in range(0, len(msgs), batch)
        ]
        queue = [json.dumps({"events": body}).encode() for body in reversed(bodies)]
        requests = len(queue)
        statuses: dict[int, int] = {}
        # Ceiling (c): the same server, clients and concurrency on an empty route.
        empty = await empty_route(port, clients, max(2000, 2 * requests))

        async def worker() -> None:
            lean = Lean(port)
            while queue:
                status, _, _ = await lean.request("POST", "/publish", queue.pop())
                statuses[status] = statuses.get(status, 0) + 1
            await lean.close()

        consumer_cpu, api_cpu = cpu_seconds(procs[0].pid), cpu_seconds(procs[1].pid)
        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(clients)))
        accepted = time.monotonic() - started
        _, t1, _ = await wait_received(s, count, procs)
        gateway_us = cpu_us_per_event(api_cpu, procs[1].pid, count)
        consumer_us = cpu_us_per_event(consumer_cpu, procs[0].pid, count)
    api_rss = peak_rss_mib(procs[1].pid)
    seconds = await since_first_received(s, t1)
    s.stop_services()
    return {
        "events_per_second": round(count / seconds),
        "seconds": round(seconds, 2),
        "accepted_per_second": round(count / accepted),
        "publish_requests_per_second": round(requests / accepted),
        "empty_route_requests_per_second": empty,
        "gateway_cpu_us_per_event": gateway_us,
        "consumer_cpu_us_per_event": consumer_us,
        "statuses": statuses,
        "api_peak_rss_mib": api_rss,
    }


async def empty_route(port: int, clients: int, requests: int) -> int:
    """Requests/s of GET /health from `clients` Lean clients: the HTTP server's own ceiling."""
    left = requests

    async def worker() -> None:
        nonlocal left
        lean = Lean(port)
        while left > 0:
            left -= 1
            status, _, _ = await lean.request("GET", "/health")
            assert status == 200
        await lean.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return round(requests / (time.monotonic() - started))


class TailReader(asyncio.Protocol):
    """A live-tail client that only counts the events it receives, in the protocol's callback
    (no stream buffer, no copies of the data): the API's work is what the tail scenario
    measures, not the client's."""

    MARK = b"\ndata: "

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.carry = b""
        self.registered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def connect(self) -> None:
        """Open the stream and return once the API has registered it (its first line)."""
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, "127.0.0.1", self.port)
        assert self.transport is not None
        self.transport.write(b"GET /events/stream HTTP/1.1\r\nHost: bench\r\n\r\n")
        await self.registered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.registered.done():
            self.head += data
            if not self.head.startswith(b"HTTP/1.1 200") and b"\r\n" in self.head:
                self.registered.set_exception(
                    RuntimeError(f"the tail was refused: {self.head[:200]!r}")
                )
            elif b"retry:" in self.head:
                self.registered.set_result(None)
                self._count(self.head.partition(b"retry:")[2])
            return
        self._count(data)

    def _count(self, data: bytes) -> None:
        keep = len(self.MARK) - 1
        # Marks inside this chunk, plus one split across the chunk boundary.
        self.count += data.count(self.MARK) + (self.carry + data[:keep]).count(self.MARK)
        self.carry = data[-keep:] if len(data) >= keep else (self.carry + data)[-keep:]

    async def run(self) -> None:
        """Receive until cancelled (the counting happens in data_received)."""
        await asyncio.Event().wait()

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def tail_drain(s: Stack, count: int, tails: int) -> dict[str, Any]:
    """Drain the backlog with the API running and `tails` clients following the live tail;
    every client must receive every stored event."""
    port = free_port()
    api = s.spawn("oncelog.api", API_PORT=str(port))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        await api_ready(client)
    readers = [TailReader(port) for _ in range(tails)]
    await asyncio.gather(*(r.connect() for r in readers))
    reading = [asyncio.create_task(r.run()) for r in readers]
    consumer = s.spawn("oncelog.consumer", METRICS_PORT=str(free_port()), CONSUMER_ID="bench-0")
    t0, _, at_first = await wait_received(s, count, [consumer, api])
    t1 = await wait_acked(s)
    stored = (await stats(s.settings.database_url))[1]
    deadline = time.monotonic() + 120
    while any(r.count < stored for r in readers):
        if time.monotonic() > deadline:
            raise RuntimeError(f"tails got {[r.count for r in readers]} of {stored} events")
        await asyncio.sleep(0.05)
    caught_up = time.monotonic()
    got = [r.count for r in readers]
    api_rss = peak_rss_mib(api.pid)
    for task in reading:
        task.cancel()
    for r in readers:
        await r.close()
    s.stop_services()
    if any(n != stored for n in got):
        raise RuntimeError(f"tails got {got} events, {stored} were stored")
    return {
        "tails": tails,
        "events_per_second": round((count - at_first) / (t1 - t0)),
        "tail_caught_up_after_seconds": round(caught_up - t1, 2) if tails else 0.0,
        "api_peak_rss_mib": api_rss,
    }


async def expiring_rows(s: Stack, rows: int) -> None:
    """Store `rows` events 30 days old in the bench's topics, with their statistics, as if a
    consumer had stored them: what a retention of 7 days has to expire."""
    conn = await asyncpg.connect(s.settings.database_url)
    try:
        await conn.execute(
            """INSERT INTO events (topic, event_id, ts, source, payload, stream_seq, received_at)
               SELECT 'bench.t' || (i % $2), 'old-' || i, now() - interval '30 days', 'bench',
                      '{"n": 1}', -i, now() - interval '30 days'
               FROM generate_series(1, $1) AS i""",
            rows,
            TOPICS,
        )
        await conn.execute(
            """INSERT INTO topic_stats (topic, shard, received, stored, first_ts, last_ts)
               SELECT topic, 0, count(*), count(*), min(ts), max(ts) FROM events GROUP BY topic""",
        )
        await conn.execute("VACUUM ANALYZE events")
    finally:
        await conn.close()


async def retention_drain(s: Stack, count: int, expiring: int, retain: bool) -> dict[str, Any]:
    """Drain the backlog over `expiring` old rows already stored, the retention service expiring them
    (RETENTION_DAYS=7) or not running."""
    procs = [s.spawn("oncelog.consumer", METRICS_PORT=str(free_port()), CONSUMER_ID="bench-0")]
    if retain:
        procs.append(
            s.spawn(
                "oncelog.retention",
                METRICS_PORT=str(free_port()),
                RETENTION_DAYS="7",
                RETENTION_INTERVAL_SECONDS="1",
            )
        )
    # The old rows are counted as received already: the clock starts at the first new one.
    deadline = time.monotonic() + 600
    while (await stats(s.settings.database_url))[0] == expiring:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError("the consumer stored nothing")
        await asyncio.sleep(0.01)
    t0, _, at_first = await wait_received(s, expiring + count, procs)
    at_first -= expiring
    t1 = await wait_acked(s)
    conn = await asyncpg.connect(s.settings.database_url)
    try:
        expired = int(await conn.fetchval("SELECT coalesce(sum(expired), 0) FROM topic_stats"))
    finally:
        await conn.close()
    s.stop_services()
    return {
        "retention": retain,
        "events_per_second": round((count - at_first) / (t1 - t0)),
        "expired_during_drain_and_after": expired,
    }


def retention_pairs(tmp: Path, runs: int, backlog: int, expiring: int) -> dict[str, Any]:
    """Drain without and with the retention job against `expiring` old rows, in interleaved
    pairs on fresh stacks; report the median ratio."""
    pairs = []
    for n in range(runs):
        pair = []
        for retain in (False, True):
            with stack(tmp / f"r{n}-{int(retain)}") as s:
                asyncio.run(expiring_rows(s, expiring))
                asyncio.run(preload(s, backlog, 0.3))
                pair.append(asyncio.run(retention_drain(s, backlog, expiring, retain)))
        sys.stderr.write(f"retention pair {n + 1}: {pair}\n")
        pairs.append(pair)
    ratios = [round(b["events_per_second"] / a["events_per_second"], 3) for a, b in pairs]
    return {
        "backlog": backlog,
        "expiring": expiring,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "pairs": pairs,
    }


def histogram(text: str, name: str) -> list[tuple[float, float]]:
    """Return (upper bound, cumulative count) pairs of a histogram in Prometheus text."""
    out = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return out


def ms_at(q: float, ordered: list[float]) -> float:
    """The q-quantile of sorted seconds (the sample at rank q * n), in milliseconds."""
    return round(ordered[int(len(ordered) * q)] * 1000, 1)


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """histogram_quantile: linear interpolation inside the bucket holding the q-th rank."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(cumulative - below, 1e-9)
        lower, below = upper, cumulative
    return lower


async def latency(s: Stack, rate: int, seconds: int) -> dict[str, Any]:
    """Publish at a fixed rate; publish -> committed quantiles from the consumer's histogram."""
    port = free_port()
    consumer = s.spawn("oncelog.consumer", METRICS_PORT=str(port))
    await asyncio.sleep(1.5)
    count = rate * seconds
    publisher = s.spawn(
        "oncelog.publisher",
        "--count",
        str(count),
        "--rate",
        str(rate),
        "--dup-rate",
        "0",
        "--topics",
        str(TOPICS),
        "--quiet",
        "--seed",
        "9",
    )
    await wait_received(s, count, [consumer])
    publisher.wait(60)
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    buckets = histogram(text, "oncelog_end_to_end_latency_seconds")
    conn = await asyncpg.connect(s.settings.database_url)
    # Per row: to the start of its transaction (stored_at), and exactly to its commit
    # (track_commit_timestamp), without the histogram's buckets or the ack after the commit.
    rows = await conn.fetch(
        "SELECT extract(epoch FROM stored_at - received_at)::float8,"
        " extract(epoch FROM pg_xact_commit_timestamp(xmin) - received_at)::float8"
        " FROM events WHERE source = 'publisher'"
    )
    await conn.close()
    lags, commits = sorted(r[0] for r in rows), sorted(r[1] for r in rows)
    s.stop_services()
    return {
        "offered_per_second": rate,
        "p50_ms": round(quantile(0.5, buckets) * 1000, 1),
        "p99_ms": round(quantile(0.99, buckets) * 1000, 1),
        "db_p50_ms": ms_at(0.5, lags),
        "db_p99_ms": ms_at(0.99, lags),
        "commit_p50_ms": ms_at(0.5, commits),
        "commit_p99_ms": ms_at(0.99, commits),
    }


async def http_latency(
    s: Stack, rate: int, seconds: int, batch: int = 10, connections: int = 16
) -> dict[str, Any]:
    """POST /publish at a fixed rate; publish -> committed from the client's clock to the
    commit of each event's row.

    Requests of `batch` events leave on a fixed schedule over `connections` keep-alive
    connections; each event carries its request's scheduled send time as its timestamp, so a
    request held back (every connection busy) counts its wait too. PostgreSQL's commit time of
    the transaction that stored each row (track_commit_timestamp) ends the interval.
    """
    port = free_port()
    procs = [
        s.spawn("oncelog.consumer", METRICS_PORT=str(free_port())),
        s.spawn("oncelog.api", API_PORT=str(port), RATE_LIMIT_PER_SECOND="0"),
    ]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        await api_ready(client)
    requests = rate * seconds // batch
    idle: asyncio.Queue[Lean] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(Lean(port))
    answered: list[float] = []
    statuses: dict[int, int] = {}

    async def send(n: int, at: float) -> None:
        lean = await idle.get()
        sent = datetime.fromtimestamp(at, UTC).isoformat()
        body = json.dumps(
            {
                "events": [
                    {
                        "topic": f"bench.t{(n * batch + i) % TOPICS}",
                        "event_id": f"h-{n}-{i}",
                        "source": "http-latency",
                        "timestamp": sent,
                        "payload": PAYLOAD | {"n": n * batch + i},
                    }
                    for i in range(batch)
                ]
            }
        ).encode()
        status, _, _ = await lean.request("POST", "/publish", body)
        answered.append(time.time() - at)
        statuses[status] = statuses.get(status, 0) + 1
        idle.put_nowait(lean)

    await asyncio.sleep(1.0)  # let the consumer bind before the clock starts
    start_wall, start = time.time(), time.monotonic()
    tasks = []
    for n in range(requests):
        offset = n * batch / rate
        if (delay := start + offset - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(n, start_wall + offset)))
    await asyncio.gather(*tasks)
    if set(statuses) != {202}:
        raise RuntimeError(f"POST /publish answered {statuses}")
    await wait_received(s, requests * batch, procs, limit=120)
    conn = await asyncpg.connect(s.settings.database_url)
    try:
        lags = sorted(
            r[0]
            for r in await conn.fetch(
                "SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - ts)::float8"
                " FROM events WHERE source = 'http-latency'"
            )
        )
    finally:
        await conn.close()
    while not idle.empty():
        await idle.get_nowait().close()
    s.stop_services()
    answered.sort()
    return {
        "offered_per_second": rate,
        "batch": batch,
        "statuses": statuses,
        "p50_ms": ms_at(0.5, lags),
        "p99_ms": ms_at(0.99, lags),
        "answered_p99_ms": ms_at(0.99, answered),
    }


async def settle(s: Stack) -> None:
    """Let the store reach its steady state after a bulk load: what autovacuum would do later."""
    conn = await asyncpg.connect(s.settings.database_url)
    try:
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def queries(s: Stack, requests: int) -> dict[str, Any]:
    """Time /events?topic=X&limit=100 (first and later pages) and /stats with the backlog stored."""
    await settle(s)
    port = free_port()
    api = s.spawn("oncelog.api", API_PORT=str(port), RATE_LIMIT_PER_SECOND="0")
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        await api_ready(client)
        lean = Lean(port)
        for name, path in (
            ("events", "/events?topic=bench.t3&limit=100"),
            ("stats", "/stats"),
            ("events_desc", "/events?topic=bench.t5&limit=100&order=desc"),
        ):
            await lean.request("GET", path)  # warm the connection and the statement cache
            times = []
            next_url = path
            for _ in range(requests):
                t = time.perf_counter()
                status, headers, data = await lean.request("GET", next_url)
                times.append(time.perf_counter() - t)
                assert status == 200, data
                link = headers.get("link")
                # Walk the pages (keyset pagination), restarting at the end.
                next_url = link.split(">")[0].lstrip("<") if link else path
            times.sort()
            out[name] = {
                "p50_ms": round(statistics.median(times) * 1000, 2),
                "p99_ms": round(times[int(len(times) * 0.99) - 1] * 1000, 2),
            }
        await lean.close()
    out["api_peak_rss_mib"] = peak_rss_mib(api.pid)
    s.stop_services()
    return out


def machine() -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).date().isoformat(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Return the run with the median `key` (the lower of two), every run's `key` under `runs`."""
    ordered = sorted(runs, key=lambda run: run[key])
    return ordered[(len(ordered) - 1) // 2] | {"runs": [run[key] for run in runs]}


def spread(result: dict[str, Any], unit: str) -> str:
    """Describe the runs behind a median, as "median of 3 runs: 1-3 unit"."""
    runs = result.get("runs", [])
    if len(runs) < 2:
        return ""
    return f"median of {len(runs)} runs: {min(runs):,}-{max(runs):,} {unit}; "


def ratio_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The table's first rows: each scenario as a fraction of its ceiling in this run."""
    rows: list[tuple[str, str, str]] = []
    r = results.get("ratios", {})
    if "drain_of_ceiling" in r:
        a = results["ceiling_ack_only"]["events_per_second"]
        b = results["ceiling_store_only"]["events_per_second"]
        rows.append(
            (
                "drain = x of min(a, b)",
                f"{r['drain_of_ceiling']:.2f}",
                f"drain {results['drain']['events_per_second']:,}; (a) ack only {a:,}, "
                f"(b) store only {b:,} events/s ({results['ceiling_store_only']['messages']:,}"
                f" messages each); {r['drain_of_preload']:.2f} of the preload rate",
            )
        )
    if "http_of_live" in r:
        h = results["http"]
        runs = results["http_of_live"]["runs"]
        rows.append(
            (
                "HTTP ingestion = x of live",
                f"{r['http_of_live']:.2f}",
                f"median of {len(runs)} interleaved pairs, {min(runs):.2f}-{max(runs):.2f}; "
                f"target 0.9",
            )
        )
        empty = results["publish_of_empty_route"]["runs"]
        rows.append(
            (
                "POST /publish requests = x of GET /health",
                f"{r['publish_requests_of_empty_route']:.2f}",
                f"(c) {h['empty_route_requests_per_second']:,} empty requests/s vs "
                f"{h['publish_requests_per_second']:,} publish requests/s of 100 events; "
                f"runs {min(empty):.2f}-{max(empty):.2f}",
            )
        )
        rows.append(
            (
                "CPU per event, HTTP scenario",
                f"gateway {h['gateway_cpu_us_per_event']} µs",
                f"consumer {h['consumer_cpu_us_per_event']} µs "
                f"(live: consumer {results['live']['consumer_cpu_us_per_event']} µs)",
            )
        )
    if "http_of_drain" in r:
        rows.append(("HTTP ingestion = x of the drain", f"{r['http_of_drain']:.2f}", ""))
    if "live_of_drain" in r:
        rows.append(("live = x of the drain", f"{r['live_of_drain']:.2f}", ""))
    return rows


def render(results: dict[str, Any]) -> str:
    rows = ratio_rows(results)
    if (d := results.get("drain")) is not None:
        rows.append(
            (
                "drain, backlog at 30% duplicates",
                f"{d['events_per_second']:,} events/s",
                f"{results['backlog']:,} messages",
            )
        )
    if (ds := results.get("drain_sync_always")) is not None:
        against = f" vs {results['preload']:,}" if "preload" in results else ""
        rows.append(
            (
                "drain, broker sync_interval: always",
                f"{ds['events_per_second']:,} events/s",
                f"preload {results['preload_sync_always']:,} msg/s{against}",
            )
        )
    if (lv := results.get("live")) is not None:
        rows.append(
            (
                "live publisher + consumer",
                f"{lv['events_per_second']:,} events/s",
                f"{results['live_count']:,} messages",
            )
        )
    if (h := results.get("http")) is not None:
        rows.append(
            (
                f"HTTP POST /publish, {INFLIGHT // HTTP_BATCH} clients x {HTTP_BATCH}, e2e",
                f"{h['events_per_second']:,} events/s",
                spread(h, "events/s")
                + f"accepted at {h['accepted_per_second']:,}/s, statuses {h['statuses']}",
            )
        )
    if (lat := results.get("latency")) is not None:
        lk = results["latency_1k"]
        rows += [
            (
                f"NATS publish -> committed at {lat['offered_per_second']:,}/s",
                f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms",
                spread(lat, "ms p99") + f"(histogram, to the ack; broker -> commit exactly: p50 "
                f"{lat['commit_p50_ms']} ms, p99 {lat['commit_p99_ms']} ms)",
            ),
            (
                f"POST /publish -> committed at {results['http_latency']['offered_per_second']:,}/s",
                f"p50 {results['http_latency']['p50_ms']} ms, "
                f"p99 {results['http_latency']['p99_ms']} ms",
                spread(results["http_latency"], "ms p99")
                + f"(client's send to the row's commit; requests of "
                f"{results['http_latency']['batch']}, answered p99 "
                f"{results['http_latency']['answered_p99_ms']} ms, statuses "
                f"{results['http_latency']['statuses']})",
            ),
            (
                "NATS publish -> committed at 1,000/s",
                f"p50 {lk['p50_ms']} ms, p99 {lk['p99_ms']} ms",
                f"(broker -> commit exactly: p50 {lk['commit_p50_ms']} ms, "
                f"p99 {lk['commit_p99_ms']} ms)",
            ),
        ]
    if (q := results.get("queries")) is not None:
        rows += [
            (
                "GET /events?topic=X&limit=100",
                f"p50 {q['events']['p50_ms']} ms, p99 {q['events']['p99_ms']} ms",
                f"desc: p50 {q['events_desc']['p50_ms']} ms, p99 {q['events_desc']['p99_ms']} ms",
            ),
            (
                "GET /stats",
                f"p50 {q['stats']['p50_ms']} ms, p99 {q['stats']['p99_ms']} ms",
                f"with {results['stored']:,} events stored",
            ),
            (
                "consumer peak RSS",
                f"{results['drain']['consumer_peak_rss_mib']} MiB",
                "during the drain",
            ),
        ]
    if (t := results.get("tail")) is not None:
        with_tails = statistics.median(b["events_per_second"] for _, b in t["pairs"])
        without = statistics.median(a["events_per_second"] for a, _ in t["pairs"])
        rows.append(
            (
                "drain with 10 live-tail clients",
                f"{t['ratio']:.2f} of the drain without",
                f"ratios {min(t['ratios']):.2f}-{max(t['ratios']):.2f} over {len(t['ratios'])} "
                f"interleaved pairs; {with_tails:,} vs {without:,} events/s, "
                f"{t['backlog']:,} messages",
            )
        )
    if (r := results.get("retention")) is not None:
        rows.append(
            (
                "drain with retention expiring old rows",
                f"{r['ratio']:.2f} of the drain without",
                f"ratios {min(r['ratios']):.2f}-{max(r['ratios']):.2f} over {len(r['ratios'])} "
                f"interleaved pairs; {r['expiring']:,} rows 30 days old, RETENTION_DAYS=7, "
                f"{r['backlog']:,} messages",
            )
        )
    api_rss = [results[k]["api_peak_rss_mib"] for k in ("http", "queries") if k in results]
    if api_rss:
        rows.append(("API peak RSS", f"{max(api_rss)} MiB", "during ingestion and queries"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{'scenario':<{width[0]}}  {'result':<{width[1]}}  notes", "-" * (sum(width) + 10)]
    lines += [f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["drain", "drain\nsync always", "live", "HTTP e2e"]
    rates = [
        results["drain"]["events_per_second"],
        results["drain_sync_always"]["events_per_second"],
        results["live"]["events_per_second"],
        results["http"]["events_per_second"],
    ]
    fig, (ratio, left, right) = plt.subplots(1, 3, figsize=(16, 4))
    r = results["ratios"]
    ratio_names = {
        "drain_of_ceiling": "drain / min(ack only,\nstore only)",
        "http_of_live": "HTTP / live",
        "publish_requests_of_empty_route": "POST /publish req/s\n/ GET /health req/s",
        "http_of_drain": "HTTP / drain",
    }
    shown = [k for k in ratio_names if k in r]
    ratio.barh([ratio_names[k] for k in shown], [r[k] for k in shown], color="#3b7dd8")
    ratio.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    for y, k in enumerate(shown):
        ratio.text(r[k], y, f" {r[k]:.2f}", va="center", fontsize=8)
    ratio.set_xlabel("fraction of the ceiling, same run")
    ratio.set_title("Ratios to the machine's ceilings")
    left.bar(names, rates, color=["#3b7dd8", "#7aa6e6", "#2f9e6e", "#d9822b"])
    left.axhline(1000, color="grey", linestyle="--", linewidth=1)
    left.text(
        3.4,
        1000,
        "typical FastAPI+SQLite aggregator",
        ha="right",
        va="bottom",
        fontsize=8,
        color="grey",
    )
    left.set_ylabel("events/s")
    left.set_title("Throughput")
    q = results["queries"]
    labels = ["/events p50", "/events p99", "/stats p50", "/stats p99"]
    labels += ["NATS e2e p50", "NATS e2e p99", "HTTP e2e p50", "HTTP e2e p99"]
    values = [
        q["events"]["p50_ms"],
        q["events"]["p99_ms"],
        q["stats"]["p50_ms"],
        q["stats"]["p99_ms"],
        results["latency"]["p50_ms"],
        results["latency"]["p99_ms"],
        results["http_latency"]["p50_ms"],
        results["http_latency"]["p99_ms"],
    ]
    right.barh(labels, values, color="#6c5fc7")
    right.set_xlabel("milliseconds")
    right.set_title("Latency")
    fig.suptitle(f"oncelog on {results['machine']['cpus']} cores, {results['machine']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def tail_pairs(tmp: Path, runs: int, backlog: int) -> dict[str, Any]:
    """Drain with 0 and with 10 tailing clients, in interleaved pairs on fresh stacks, so the
    machine's drift between hours hits both alike; report the median ratio."""
    pairs = []
    for n in range(runs):
        pair = []
        for tails in (0, 10):
            with stack(tmp / f"t{n}-{tails}") as s:
                asyncio.run(preload(s, backlog, 0.3))
                pair.append(asyncio.run(tail_drain(s, backlog, tails)))
        sys.stderr.write(f"tail pair {n + 1}: {pair}\n")
        pairs.append(pair)
    ratios = [round(b["events_per_second"] / a["events_per_second"], 3) for a, b in pairs]
    return {
        "backlog": backlog,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "pairs": pairs,
    }


def ratios(values: list[float]) -> dict[str, Any]:
    """The median of per-run ratios, with every run's."""
    rounded = [round(v, 3) for v in values]
    return {"median": round(statistics.median(rounded), 3), "runs": rounded}


def ceiling_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Each scenario as a fraction of what bounds it, measured in this run."""
    out: dict[str, Any] = {}
    if "drain" in results:
        a = results["ceiling_ack_only"]["events_per_second"]
        b = results["ceiling_store_only"]["events_per_second"]
        out["drain_of_ceiling"] = round(results["drain"]["events_per_second"] / min(a, b), 3)
        out["drain_of_preload"] = round(
            results["drain"]["events_per_second"] / results["preload"], 3
        )
    if "http_of_live" in results:
        out["http_of_live"] = results["http_of_live"]["median"]
        out["publish_requests_of_empty_route"] = results["publish_of_empty_route"]["median"]
    if "drain" in results and "http" in results:
        out["http_of_drain"] = round(
            results["http"]["events_per_second"] / results["drain"]["events_per_second"], 3
        )
    if "drain" in results and "live" in results:
        out["live_of_drain"] = round(
            results["live"]["events_per_second"] / results["drain"]["events_per_second"], 3
        )
    return out


SCENARIOS = ("drain", "sync", "live", "http", "latency", "tail", "retention")


def write(results: dict[str, Any], out: Path, *, full: bool) -> None:
    """Write the JSON (and, for a full run, the plot) and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"bench-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    written = f"{out}/bench-{stamp}.json"
    if full:
        plot(results, out / f"bench-{stamp}.png")
        written += " and .png"
    sys.stdout.write(render(results) + f"\n\nresults: {written}\n")


def drain_with_ceilings(root: Path, backlog: int, quick: bool) -> dict[str, Any]:
    """The ceilings (a) and (b), then the drain and the queries, on one stack."""
    results: dict[str, Any] = {}
    with stack(root) as s:
        # The ceilings first, on the same servers: a backlog of a fifth the size
        # acked and nothing else, then the same rows stored with no NATS.
        ceiling = max(backlog // 5, 10_000)
        asyncio.run(preload(s, ceiling, 0.3))
        results["ceiling_ack_only"] = asyncio.run(ack_only(s, ceiling))
        results["ceiling_store_only"] = asyncio.run(store_only(s, ceiling))
        sys.stderr.write(
            f"ceilings: ack only {results['ceiling_ack_only']}, "
            f"store only {results['ceiling_store_only']}\n"
        )
        unique, rate = asyncio.run(preload(s, backlog, 0.3))
        results["preload"] = round(rate)
        sys.stderr.write(f"backlog of {backlog:,} ({unique:,} unique) loaded\n")
        results["drain"] = asyncio.run(drain(s, backlog))
        results["stored"] = asyncio.run(stats(s.settings.database_url))[1]
        results["queries"] = asyncio.run(queries(s, 200 if quick else 1000))
        sys.stderr.write(f"drain and queries done: {results['drain']}\n")
    return results


def live_http_pairs(tmp: Path, runs: int, count: int, http: bool) -> dict[str, Any]:
    """Live ingestion through NATS, and with `http` the same events through POST /publish.

    HTTP ingestion is judged against live ingestion: they run in interleaved pairs on fresh
    stacks, so both see the machine at the same speed, and every other pair runs HTTP first,
    so that neither side always runs second.
    """
    results: dict[str, Any] = {}
    live_runs: list[dict[str, Any]] = []
    http_runs: list[dict[str, Any]] = []
    for n in range(runs):
        for kind in ("live", "http") if n % 2 == 0 else ("http", "live"):
            if kind == "live":
                with stack(tmp / f"c{n}") as s:
                    live_runs.append(asyncio.run(live(s, count)))
            elif http:
                with stack(tmp / f"d{n}") as s:
                    http_runs.append(asyncio.run(http_ingest(s, count)))
        if http:
            sys.stderr.write(f"live/http pair {n + 1}: {live_runs[-1]} {http_runs[-1]}\n")
    results["live"] = median_run(live_runs, "events_per_second")
    if http_runs:
        results["http"] = median_run(http_runs, "events_per_second")
        results["http_of_live"] = ratios(
            [
                h["events_per_second"] / lv["events_per_second"]
                for lv, h in zip(live_runs, http_runs, strict=True)
            ]
        )
        results["publish_of_empty_route"] = ratios(
            [
                h["publish_requests_per_second"] / h["empty_route_requests_per_second"]
                for h in http_runs
            ]
        )
    return results


def run(args: argparse.Namespace, only: set[str]) -> dict[str, Any]:
    """Run the chosen scenarios, each on fresh embedded servers; return the results."""
    backlog = args.backlog or (100_000 if args.quick else 1_000_000)
    small = 20_000 if args.quick else 300_000
    # The two scenarios with targets run several times, each on a fresh stack: a shared
    # machine's speed drifts by a third within minutes, so the median is what is reported.
    runs = args.runs or (1 if args.quick else 3)
    results: dict[str, Any] = {"machine": machine(), "backlog": backlog, "live_count": small}
    with tempfile.TemporaryDirectory() as tmp:
        if "drain" in only:
            results |= drain_with_ceilings(Path(tmp) / "a", backlog, args.quick)
        if "sync" in only:
            with stack(Path(tmp) / "b", sync_always=True) as s:
                _, rate = asyncio.run(preload(s, backlog // 4, 0.3))
                results["preload_sync_always"] = round(rate)
                results["drain_sync_always"] = asyncio.run(drain(s, backlog // 4))
        if "live" in only or "http" in only:
            results |= live_http_pairs(
                Path(tmp), runs if "http" in only else 1, small, "http" in only
            )
        if "latency" in only:
            # A fixed share of what this run's drain reached, so the load means the same on a
            # fast hour and a slow one; 5,000/s when the drain did not run.
            offered = 5000
            if "drain" in results:
                offered = int(round(results["drain"]["events_per_second"] * LATENCY_SHARE, -2))
            latency_runs = []
            for n in range(runs):
                with stack(Path(tmp) / f"e{n}", commit_times=True) as s:
                    latency_runs.append(asyncio.run(latency(s, offered, 6 if args.quick else 20)))
            results["latency"] = median_run(latency_runs, "p99_ms")
            with stack(Path(tmp) / "f", commit_times=True) as s:
                results["latency_1k"] = asyncio.run(latency(s, 1000, 6 if args.quick else 20))
            # The same offered load through POST /publish, from the client's clock.
            http_latency_runs = []
            for n in range(runs):
                with stack(Path(tmp) / f"g{n}", commit_times=True) as s:
                    http_latency_runs.append(
                        asyncio.run(http_latency(s, offered, 6 if args.quick else 20))
                    )
            results["http_latency"] = median_run(http_latency_runs, "p99_ms")
        if "tail" in only:
            results["tail"] = tail_pairs(Path(tmp), runs, 50_000 if args.quick else 200_000)
        if "retention" in only:
            results["retention"] = retention_pairs(
                Path(tmp),
                runs,
                50_000 if args.quick else 200_000,
                100_000 if args.quick else 1_000_000,
            )
    results["ratios"] = ceiling_ratios(results)
    return results


# What --compare reads from each side's JSON when no --metric is given.
METRICS = {
    "drain": ["drain.events_per_second", "ratios.drain_of_ceiling"],
    "sync": ["drain_sync_always.events_per_second"],
    "live": ["live.events_per_second"],
    "http": ["http.events_per_second", "http.gateway_cpu_us_per_event", "ratios.http_of_live"],
    "latency": ["latency.p99_ms", "latency.commit_p99_ms", "http_latency.p99_ms"],
    "tail": ["tail.ratio"],
    "retention": ["retention.ratio"],
}


def lookup(results: dict[str, Any], path: str) -> float | None:
    """Return a dotted path's number from a results JSON, None where that run has none."""
    value: Any = results
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


@contextmanager
def checkout(rev: str, root: Path) -> Iterator[Path]:
    """Yield a tree of `rev` with its environment synced; "." is this checkout as it is."""
    here = Path(__file__).resolve().parent.parent
    if rev == ".":
        yield here
        return
    tree = root / f"tree-{len(list(root.iterdir()))}"
    subprocess.run(  # noqa: S603
        ["git", "-C", str(here), "worktree", "add", "--detach", str(tree), rev],  # noqa: S607
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        subprocess.run(
            ["uv", "sync", "--frozen", "--group", "bench", "--quiet"],  # noqa: S607
            cwd=tree,
            check=True,
            env=child_env(),
        )
        yield tree
    finally:
        subprocess.run(  # noqa: S603
            ["git", "-C", str(here), "worktree", "remove", "--force", str(tree)],  # noqa: S607
            check=False,
        )


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a bench of another tree: its own virtualenv, `extra` set."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return env | extra


def one_run(tree: Path, argv: list[str], out: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `tree`'s bench once with `argv`; return its results JSON."""
    subprocess.run(  # noqa: S603
        ["uv", "run", "--frozen", "--group", "bench", "python", "bench/run.py", *argv],  # noqa: S607
        cwd=tree,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (found,) = out.glob("bench-*.json")
    result: dict[str, Any] = json.loads(found.read_text())
    return result


def compare(args: argparse.Namespace) -> None:
    """Run the same scenario on two sides alternately; print each round's B/A, median, spread."""
    if args.compare_env:
        key, _, value = args.compare_env.partition("=")
        sides = [(".", {}), (".", {key: value})]
        names = ["this checkout", f"{key}={value}"]
    else:
        sides = [(args.compare[0], {}), (args.compare[1], {})]
        names = list(args.compare)
    only = args.only or ["http"]
    metrics = args.metric or [m for o in only for m in METRICS[o]]
    argv = [f"--only={o}" for o in only] + ["--runs", str(args.runs or 1)]
    argv += ["--quick"] if args.quick else []
    argv += ["--backlog", str(args.backlog)] if args.backlog else []
    values: dict[str, list[list[float | None]]] = {m: [] for m in metrics}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as trees:
        root = Path(tmp)
        paths = [trees.enter_context(checkout(rev, root)) for rev, _ in sides]
        for n in range(args.rounds):
            # Alternate which side goes first, so a drift within a round hits both alike.
            order = (0, 1) if n % 2 == 0 else (1, 0)
            got: dict[int, dict[str, Any]] = {}
            for side in order:
                out = root / f"out-{n}-{side}"
                got[side] = one_run(
                    paths[side],
                    [*argv, "--out", str(out)],
                    out,
                    child_env(**sides[side][1]),
                )
            for m in metrics:
                values[m].append([lookup(got[0], m), lookup(got[1], m)])
            sys.stderr.write(
                f"round {n + 1}: "
                + "; ".join(f"{m} {values[m][-1][0]} -> {values[m][-1][1]}" for m in metrics)
                + "\n"
            )
    sys.stdout.write(f"A = {names[0]}, B = {names[1]}, {args.rounds} interleaved rounds\n")
    for m in metrics:
        pairs = [(a, b) for a, b in values[m] if a and b is not None]
        if not pairs:
            sys.stdout.write(f"{m}: not in both sides' results\n")
            continue
        per_round = [round(b / a, 3) for a, b in pairs]
        sys.stdout.write(
            f"{m}: B/A median {statistics.median(per_round):.3f}, "
            f"spread {min(per_round):.3f}-{max(per_round):.3f}, rounds {per_round} "
            f"(A {[a for a, _ in pairs]}, B {[b for _, b in pairs]})\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="just bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small scenarios, about a minute")
    parser.add_argument("--backlog", type=int, default=None, help="messages in the drain backlog")
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable); drain includes the queries",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="runs of the http and latency scenarios, median reported (default 3, 1 with --quick)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="run --only (default http) on git revisions A and B alternately; '.' is this "
        "checkout with its uncommitted changes",
    )
    parser.add_argument(
        "--compare-env",
        metavar="KEY=VALUE",
        help="compare this checkout without (A) and with (B) an environment setting",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --compare")
    parser.add_argument(
        "--metric",
        action="append",
        help="dotted path into the results JSON that --compare reports (repeatable), "
        "e.g. http.gateway_cpu_us_per_event",
    )
    args = parser.parse_args()
    if args.compare or args.compare_env:
        compare(args)
        return
    only = set(args.only or SCENARIOS)
    results = run(args, only)
    write(results, args.out, full=only == set(SCENARIOS))


if __name__ == "__main__":
    main()
