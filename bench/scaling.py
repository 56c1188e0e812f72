"""Scaling benchmark: how fast 1, 2 and 4 consumer replicas drain the same backlog.

    just bench-scaling [--events 200000] [--replicas 1,2,4] [--dup-rate 0.3]

For each replica count it starts from an empty database and stream, preloads the backlog
(`--dup-rate` of the messages repeat an earlier event without a Nats-Msg-Id, so every copy
reaches the store layer, the consumers' worst case), starts the replicas on the one durable and
times them from the first stored event until every message is counted. Embedded nats-server and
PostgreSQL (fsync on) run on the same machine as the consumers, as with `just up`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import nats
import nats.js.errors

from oncelog import migrate
from oncelog.local.embedded import NatsServer, PostgresServer, free_port
from oncelog.platform.settings import CommonSettings, load


@dataclass
class Result:
    """One drain: how many replicas, how long, how fast."""

    replicas: int
    seconds: float
    events_per_second: float


async def reset(postgres: PostgresServer, settings: CommonSettings) -> None:
    """Give the next run an empty database, stream and durable."""
    admin = await asyncpg.connect(postgres.url())
    try:
        await admin.execute("DROP DATABASE IF EXISTS oncelog WITH (FORCE)")
        await admin.execute("CREATE DATABASE oncelog")
    finally:
        await admin.close()
    nc = await nats.connect(settings.nats_url)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(settings.stream)
    finally:
        await nc.close()
    await migrate.run(settings, [], provision=True)


async def preload(settings: CommonSettings, count: int, dup_rate: float, seed: int = 1) -> None:
    """Publish `count` messages over 8 topics, `dup_rate` of them repeats of earlier events."""
    rng = random.Random(seed)
    keys: list[tuple[str, str]] = []
    nc = await nats.connect(settings.nats_url, pending_size=64 * 1024 * 1024)
    try:
        for n in range(count):
            if keys and rng.random() < dup_rate:
                topic, event_id = keys[rng.randrange(len(keys))]
            else:
                topic = f"bench.t{rng.randrange(8)}"
                event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                keys.append((topic, event_id))
            body = json.dumps(
                {
                    "event_id": event_id,
                    "source": "bench",
                    "timestamp": "2026-11-22T00:00:00Z",
                    "payload": {"n": n, "user": n % 1000, "action": "login", "ok": True},
                }
            ).encode()
            await nc.publish(f"{settings.subject_prefix}.{topic}", body)
            if n % 20_000 == 0:
                await nc.flush()
        await nc.flush()
        js = nc.jetstream()
        deadline = time.monotonic() + 300
        while (await js.stream_info(settings.stream)).state.messages < count:
            if time.monotonic() > deadline:
                raise RuntimeError("the stream did not receive the whole backlog")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def drain(settings: CommonSettings, count: int, replicas: int) -> Result:
    """Run `replicas` consumer processes until every message is counted; time the drain."""
    env = dict(os.environ) | {
        "NATS_URL": settings.nats_url,
        "DATABASE_URL": settings.database_url,
        "LOG_LEVEL": "WARNING",
    }
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "oncelog.consumer",
            env=env | {"METRICS_PORT": str(free_port()), "CONSUMER_ID": f"bench-{i}"},
        )
        for i in range(replicas)
    ]
    conn = await asyncpg.connect(settings.database_url)
    try:
        first: tuple[float, int] | None = None
        deadline = time.monotonic() + 900
        while True:
            got = int(await conn.fetchval("SELECT coalesce(sum(received), 0) FROM topic_stats"))
            now = time.monotonic()
            if got and first is None:
                first = (now, got)
            if got >= count:
                break
            if now > deadline or any(p.returncode is not None for p in procs):
                raise RuntimeError(f"drain with {replicas} replicas stopped at {got}/{count}")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
        for p in procs:
            p.terminate()
        for p in procs:
            await asyncio.wait_for(p.wait(), 60)
    assert first is not None
    seconds = max(now - first[0], 1e-3)
    return Result(replicas, round(seconds, 2), round((count - first[1]) / seconds))


async def run(args: argparse.Namespace, root: Path) -> list[Result]:
    """Start the servers once and drain the backlog with each replica count."""
    results: list[Result] = []
    with (
        NatsServer(root / "nats") as nats_server,
        PostgresServer(
            root / "pg", settings={"shared_buffers": "512MB", "max_wal_size": "4GB"}
        ) as postgres,
    ):
        settings = load(
            CommonSettings,
            {},
            nats_url=nats_server.url,
            database_url=postgres.url("oncelog"),
            stream_max_bytes=32 * 1024**3,
        )
        for replicas in args.replicas:
            await reset(postgres, settings)
            started = time.monotonic()
            await preload(settings, args.events, args.dup_rate)
            sys.stderr.write(
                f"preloaded {args.events} messages in {time.monotonic() - started:.1f}s; "
                f"draining with {replicas} replica(s)\n"
            )
            results.append(await drain(settings, args.events, replicas))
    return results


def render(results: list[Result], args: argparse.Namespace) -> str:
    """Return the results as a Markdown table with the machine it ran on."""
    base = results[0].events_per_second
    lines = [
        f"{args.events} messages, {args.dup_rate:.0%} duplicates; {os.cpu_count()} CPUs, "
        f"{platform.machine()}, Python {platform.python_version()}; load average at the end "
        f"{os.getloadavg()[0]:.1f} (other processes share these CPUs when it exceeds them)",
        "",
        "| consumer replicas | drain seconds | events/s | vs first row |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.replicas} | {r.seconds} | {r.events_per_second:,.0f} | "
        f"{r.events_per_second / base:.2f}x |"
        for r in results
    ]
    return "\n".join(lines)


def main() -> None:
    """Entry point of `just bench-scaling`."""
    parser = argparse.ArgumentParser(prog="just bench-scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="messages in the backlog")
    parser.add_argument("--dup-rate", type=float, default=0.3, help="fraction of repeats")
    parser.add_argument(
        "--replicas",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 2, 4],
        help="comma-separated replica counts",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="oncelog-scaling-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    sys.stdout.write(render(results, args) + "\n")


if __name__ == "__main__":
    main()
