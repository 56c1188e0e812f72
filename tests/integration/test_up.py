"""`just up` end to end: the embedded stack, the publisher, restarts that keep everything."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import free_port
from oncelog.local.up import GIVE_UP_AFTER, RESTART_BASE_SECONDS


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except (urllib.error.URLError, OSError):
        return 0, None


def wait_for(check: Any, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached within {within}s")


class Stack:
    """A `just up` process on free ports with its data in a temporary directory."""

    def __init__(self, data: Path) -> None:
        self.env = dict(os.environ)
        for key in ("NATS_URL", "DATABASE_URL"):
            self.env.pop(key, None)
        self.api_port = free_port()
        self.env |= {
            "ONCELOG_DATA_DIR": str(data),
            "NATS_PORT": str(free_port()),
            "NATS_MONITOR_PORT": str(free_port()),
            "PG_PORT": str(free_port()),
            "API_PORT": str(self.api_port),
            "METRICS_PORT": str(free_port()),
            "RETENTION_METRICS_PORT": str(free_port()),
            "DUPLICATE_WINDOW_SECONDS": "2",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data.parent / "up.log"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def up(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oncelog.local.up"], env=self.env, stderr=log
            )
        said = self.log.read_bytes().count(b"oncelog is up")
        wait_for(lambda: self.log.read_bytes().count(b"oncelog is up") > said, 60, "'is up'")
        # Once it says so, the API answers at the first try.
        assert get_json(self.api + "/health")[0] == 200
        wait_for(lambda: get_json(self.api + "/ready")[0] == 200, 60, "readiness")

    def down(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(60) == 0
        self.proc = None

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.env['PG_PORT']}/oncelog"

    def publish(self, *args: str) -> dict[str, Any]:
        env = self.env | {
            "NATS_URL": f"nats://127.0.0.1:{self.env['NATS_PORT']}",
            "DATABASE_URL": self.database_url,
        }
        out = subprocess.run(
            [sys.executable, "-m", "oncelog.publisher", "--json", "--quiet", *args],
            env=env,
            capture_output=True,
            check=True,
            timeout=300,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path / "data")
    s.up()
    yield s
    if s.proc is not None:
        s.proc.send_signal(signal.SIGINT)
        try:
            s.proc.wait(60)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


def check_invariants(stats: dict[str, Any]) -> None:
    assert stats["received"] == (
        stats["unique_processed"] + stats["duplicate_dropped"] + stats["dead_lettered"]
    )
    assert stats["duplicate_dropped"] == sum(stats["duplicates_by_layer"].values())
    for topic, t in stats["per_topic"].items():
        assert (
            t["received"] == t["unique_processed"] + t["duplicate_dropped"] + t["dead_lettered"]
        ), topic


def test_up_publish_restart_keeps_every_event_once(stack: Stack) -> None:
    """10,000 published at 30% duplicates (half past the broker window) store exactly the unique
    events, the statistics hold their invariants, and a restart finds the same rows and counts."""
    summary = stack.publish(
        "--count", "10000", "--dup-rate", "0.3", "--replay-old", "0.5", "--seed", "7"
    )
    assert summary["errors"] == 0
    assert summary["sent"] == 10000
    assert summary["old_replays"] > 1000

    def drained() -> dict[str, Any] | None:
        status, stats = get_json(stack.api + "/stats")
        return stats if status == 200 and stats["received"] == summary["sent"] else None

    stats = wait_for(drained, 120, "every message counted")
    check_invariants(stats)
    assert stats["unique_processed"] == summary["unique"]
    assert stats["duplicates_by_layer"]["broker"] == summary["broker_duplicates"]
    assert stats["duplicate_dropped"] == summary["sent"] - summary["unique"]
    # Replays past the window reach the store; two replays of one event can still meet inside
    # a fresh window, where the broker drops the second.
    assert stats["duplicates_by_layer"]["store"] > summary["old_replays"] // 2
    _, page = get_json(stack.api + f"/events?topic={stats['topics'][0]}&limit=5")
    assert len(page) == 5

    stack.down()
    stack.up()
    _, again = get_json(stack.api + "/stats")
    for key in ("received", "unique_processed", "duplicate_dropped", "per_topic"):
        assert again[key] == stats[key]
    # Every service logs JSON lines, the API's web server included; only the banner is prose.
    lines = [line for line in stack.log.read_text().splitlines() if line.strip()]
    prose = [line for line in lines if not line.startswith("{")]
    assert all(line.startswith(("oncelog is up", "Publish with")) for line in prose), prose
    loggers = {json.loads(line)["logger"] for line in lines if line.startswith("{")}
    assert {"oncelog.consumer", "oncelog.embedded"} <= loggers


def children(pid: int) -> dict[int, str]:
    """Return the live child processes of `pid` with their command lines."""
    found: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(ppid) == pid and state not in ("Z", "X"):
            found[int(stat.parent.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def child_pid(stack: Stack, marker: str) -> int | None:
    """Return the pid of the stack's child whose command line holds `marker`, if one runs."""
    assert stack.proc is not None
    pids = [pid for pid, cmd in children(stack.proc.pid).items() if marker in cmd]
    assert len(pids) <= 1, pids
    return pids[0] if pids else None


def postmaster_pid(data: Path) -> int | None:
    """Return the pid in the cluster's postmaster.pid, if the file is there."""
    try:
        return int((data / "postgres" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def restart_lines(stack: Stack) -> list[dict[str, Any]]:
    """Return the supervisor's restart lines logged so far."""
    lines = [json.loads(x) for x in stack.log.read_text().splitlines() if x.startswith("{")]
    return [x for x in lines if x["logger"] == "oncelog.up" and "restart_in_seconds" in x]


def stored_rows(stack: Stack) -> tuple[int, int]:
    """Return the events table's row count and its count of distinct (topic, event_id)."""

    async def query() -> tuple[int, int]:
        conn = await asyncpg.connect(stack.database_url)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, count(DISTINCT (topic, event_id)) AS u FROM events"
            )
        finally:
            await conn.close()
        assert row is not None
        return int(row["n"]), int(row["u"])

    return asyncio.run(query())


def test_up_restarts_a_killed_consumer_nats_and_postgres(stack: Stack, tmp_path: Path) -> None:
    """A consumer, nats-server and PostgreSQL killed with SIGKILL come back on their data, each
    restart is logged, and every event published around the kills is stored exactly once."""
    data = tmp_path / "data"
    sent = unique = 0

    def publish(seed: int, dup_rate: str = "0.2", *, again: bool = False) -> None:
        nonlocal sent, unique
        summary = stack.publish("--count", "2000", "--dup-rate", dup_rate, "--seed", str(seed))
        assert summary["errors"] == 0, summary
        sent += summary["sent"]
        unique += 0 if again else summary["unique"]

    def drained() -> dict[str, Any] | None:
        status, stats = get_json(stack.api + "/stats")
        return stats if status == 200 and stats["received"] == sent else None

    def killed_and_back(name: str, find: Any) -> int:
        """Kill the process `find()` names with SIGKILL; return the pid it comes back with."""
        old = find()
        assert old is not None, f"no {name} running"
        before = len(restart_lines(stack))
        os.kill(old, signal.SIGKILL)
        line = wait_for(
            lambda: next((x for x in restart_lines(stack)[before:] if x["child"] == name), None),
            30,
            f"{name}'s restart line",
        )
        assert line["exit"] == "was killed by SIGKILL", line
        assert 0 < line["restart_in_seconds"] <= 30, line
        return int(wait_for(lambda: (pid := find()) not in (None, old) and pid, 60, f"{name} back"))

    publish(1)
    wait_for(drained, 60, "the first events stored")

    # The consumer dies; what is published meanwhile waits in the stream for its successor.
    killed_and_back("consumer replica-0", lambda: child_pid(stack, "oncelog.consumer"))
    publish(2)
    wait_for(drained, 60, "events published around the consumer's restart stored")

    killed_and_back("nats-server", lambda: child_pid(stack, "nats-server"))
    wait_for(lambda: get_json(stack.api + "/ready")[0] == 200, 60, "readiness after NATS")
    publish(3)
    wait_for(drained, 60, "events published after NATS's restart stored")

    # Published while PostgreSQL restarts (no duplicates: the publisher then needs no database):
    # the consumer keeps the batches until it can commit them.
    pg = killed_and_back("postgres", lambda: postmaster_pid(data))
    assert stack.proc is not None
    assert pg in children(stack.proc.pid), "postgres restarted by the stack"
    publish(4, dup_rate="0")
    wait_for(drained, 60, "events published around PostgreSQL's restart stored")

    # The first events again, long past the broker's window: the store drops every one.
    publish(1, again=True)
    stats = wait_for(drained, 60, "the replayed events counted")
    check_invariants(stats)
    assert stats["unique_processed"] == unique
    assert stored_rows(stack) == (stats["unique_processed"],) * 2
    assert stats["duplicate_dropped"] == sent - stats["unique_processed"]

    stack.down()
    # The stop ended what ran without taking it for crashes.
    assert [x["child"] for x in restart_lines(stack)] == [
        "consumer replica-0",
        "nats-server",
        "postgres",
    ]
    assert postmaster_pid(data) is None


def test_up_gives_up_on_a_service_that_crashes_at_every_start(
    settings: ConsumerSettings, tmp_path: Path
) -> None:
    """With external servers only the services run; one that fails at every start is restarted
    with a doubling delay until its fifth quick crash, then the stack stops with exit code 1."""
    env = dict(os.environ) | {
        "NATS_URL": settings.nats_url,
        "DATABASE_URL": settings.database_url,
        "STREAM": settings.stream,
        "SUBJECT_PREFIX": settings.subject_prefix,
        "ALLOW_UNSAFE_POSTGRES": "true",
        "ONCELOG_DATA_DIR": str(tmp_path / "data"),
        "API_PORT": str(free_port()),
        "METRICS_PORT": str(free_port()),
        "RETENTION_METRICS_PORT": str(free_port()),
        # Refused by the consumer's settings, as a typo in a deployment would be.
        "BATCH_SIZE": "0",
    }
    out = subprocess.run(
        [sys.executable, "-m", "oncelog.local.up"],
        env=env,
        capture_output=True,
        check=False,
        timeout=120,
    )
    err = out.stderr.decode()
    assert out.returncode == 1, err
    assert (
        err.rstrip()
        .splitlines()[-1]
        .startswith("just up: consumer replica-0 exited with code 1; it crashed 5 times in a row")
    ), err
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    delays = [x["restart_in_seconds"] for x in lines if "restart_in_seconds" in x]
    assert len(delays) == GIVE_UP_AFTER - 1, err
    # Each delay is drawn from the upper half of its doubling step.
    for step, delay in enumerate(delays):
        nominal = RESTART_BASE_SECONDS * 2**step
        assert nominal / 2 <= delay <= nominal, delays
    assert not [x for x in lines if x["logger"] == "oncelog.embedded"], err
