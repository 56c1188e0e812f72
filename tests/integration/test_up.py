"""`just up` end to end: the embedded stack, the publisher, a restart that keeps everything."""

from __future__ import annotations

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

import pytest

from oncelog.platform.embedded import free_port


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
                [sys.executable, "-m", "oncelog.platform.devstack"], env=self.env, stderr=log
            )
        wait_for(lambda: get_json(self.api + "/ready")[0] == 200, 60, "readiness")

    def down(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(60) == 0
        self.proc = None

    def publish(self, *args: str) -> dict[str, Any]:
        env = self.env | {
            "NATS_URL": f"nats://127.0.0.1:{self.env['NATS_PORT']}",
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{self.env['PG_PORT']}/oncelog",
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
