"""Stopping `python -m oncelog.consumer` while nats-server is down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import msgspec
import pytest
from nats.js import JetStreamContext

from helpers import assert_invariants, running_consumer, wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import msg_id
from oncelog.local.embedded import NatsServer, die_with_parent, free_port
from oncelog.platform import broker

BEFORE = 20
HELD = 30


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """Return a nats-server of this test alone, since the test kills it."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


def consumer_env(settings: ConsumerSettings) -> dict[str, str]:
    """Return the environment that runs `python -m oncelog.consumer` with `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    for name in ConsumerSettings.__struct_fields__:
        value = getattr(settings, name)
        env[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env | {"METRICS_PORT": str(free_port()), "CONSUMER_ID": "stop-test"}


async def publish(js: JetStreamContext, settings: ConsumerSettings, ids: range) -> None:
    """Publish one event per id with the contract's Msg-Id."""
    for i in ids:
        await js.publish(
            f"{settings.subject_prefix}.stop",
            json.dumps({"event_id": f"s-{i}"}).encode(),
            headers={"Nats-Msg-Id": msg_id("stop", f"s-{i}")},
        )


async def rows(pool: asyncpg.Pool) -> int:
    """Return the number of stored events."""
    return int(await pool.fetchval("SELECT count(*) FROM events"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_while_nats_is_down_is_clean_and_loses_nothing(
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
    nats_server: NatsServer,
    tmp_path: Path,
    signum: int,
) -> None:
    """A consumer stopped while NATS is down exits 0 with a log line, no traceback, and the batch
    it held uncommitted is redelivered and stored once when NATS is back."""
    # A short statement timeout turns the held lock below into quick retries, and a short
    # ack_wait brings the held batch back soon after the stop.
    s = msgspec.structs.replace(
        settings, nats_url=nats_server.url, ack_wait_seconds=2.0, statement_timeout_ms=500
    )
    nc = await broker.connect(s, "oncelog-tests")
    js = nc.jetstream()
    await broker.ensure_stream(js, s)
    await broker.ensure_consumer(js, s)
    await publish(js, s, range(BEFORE))
    await nc.close()

    log = tmp_path / "consumer.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "oncelog.consumer",
            env=consumer_env(s),
            stdin=subprocess.DEVNULL,
            stderr=out,
            preexec_fn=lambda: die_with_parent(signal.SIGKILL),
        )

    async def logged(text: str) -> bool:
        assert proc.returncode is None, log.read_text()
        return text in log.read_text()

    lock = await asyncpg.connect(s.database_url)
    try:
        await wait_until(lambda: _rows_are(pool, BEFORE), within=30)
        # The events table locked against inserts: the next batch is delivered but cannot commit.
        locked = lock.transaction()
        await locked.start()
        await lock.execute("LOCK TABLE events IN SHARE MODE")
        nc = await broker.connect(s, "oncelog-tests")
        await publish(nc.jetstream(), s, range(BEFORE, BEFORE + HELD))
        await nc.close()
        await wait_until(lambda: logged("store failed, retrying the batch"), within=30)

        nats_server.kill()
        await wait_until(lambda: logged("nats disconnected"), within=30)
        proc.send_signal(signum)
        code = await asyncio.wait_for(proc.wait(), 60)
        text = log.read_text()
        assert code == 0, text
        assert "Traceback" not in text
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert any(line["msg"].startswith("nats unreachable while stopping") for line in lines), (
            text
        )
        assert lines[-1]["msg"] == "consumer stopped", text
        assert await rows(pool) == BEFORE
        await locked.rollback()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(Exception):
            await lock.close()

    # The same store on the same port: the durable still holds the unacked batch.
    nats_server.start()
    nc = await broker.connect(s, "oncelog-tests")
    try:
        async with running_consumer(s, nc.jetstream(), pool):
            await wait_until(lambda: _rows_are(pool, BEFORE + HELD), within=30)
    finally:
        await nc.close()
    result = await assert_invariants(pool)
    assert result["stored"] == BEFORE + HELD
    assert result["received"] == BEFORE + HELD


async def _rows_are(pool: asyncpg.Pool, n: int) -> bool:
    return await rows(pool) == n
