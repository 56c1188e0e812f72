"""The publisher's command line, run as a newcomer runs it: its exit, its messages, its progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import NatsServer, free_port


def _env(**extra: str) -> dict[str, str]:
    """Return this environment without the URLs and ports that would point elsewhere."""
    dropped = ("NATS_URL", "DATABASE_URL", "NATS_PORT", "PG_PORT")
    return {k: v for k, v in os.environ.items() if k not in dropped} | extra


def _publisher(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oncelog.publisher", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_with_no_nats_it_ends_within_the_connect_timeout_with_one_clear_line() -> None:
    """Nothing on NATS_PORT: exit 1 within the bound, one line naming the URL and `just up`."""
    port = free_port()
    started = time.monotonic()
    done = _publisher(
        "--count", "10", "--connect-timeout", "2", env=_env(NATS_PORT=str(port)), timeout=30
    )
    assert time.monotonic() - started < 15
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = [x for x in done.stderr.splitlines() if not x.startswith("{")]
    assert line.startswith(f"oncelog-publisher: no NATS server answered at nats://127.0.0.1:{port}")
    assert "within 2 s" in line
    assert "uv run just up" in line
    assert done.stdout == ""


def test_it_finds_nats_on_nats_port_and_prints_progress_lines_in_a_pipe(
    settings: ConsumerSettings,
) -> None:
    """With only NATS_PORT set it reaches that server; with stderr a pipe, progress comes as
    whole lines every --progress-every seconds, never a carriage return."""
    # The session's server is on loopback: NATS_PORT alone must lead there.
    assert settings.nats_url.startswith("nats://127.0.0.1:")
    env = _env(
        NATS_PORT=settings.nats_url.rpartition(":")[2],
        DATABASE_URL=settings.database_url,
        STREAM=settings.stream,
        SUBJECT_PREFIX=settings.subject_prefix,
    )
    done = _publisher(
        "--count", "1500", "--rate", "600", "--dup-rate", "0", "--progress-every", "0.5",
        env=env,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    progress = [x for x in done.stderr.splitlines() if x.startswith("publisher: sent ")]
    # 2.5 s at 600/s, a line every 0.5 s and a last one.
    assert len(progress) >= 3, done.stderr
    assert progress[-1].startswith("publisher: sent 1,500/1,500  acked 1,500")
    assert "ev/s while publishing" in progress[-1]
    assert "\r" not in done.stderr
    assert "events/s (publishing)" in done.stdout
    assert "sent                            1500" in done.stdout


def test_a_broker_restart_mid_run_is_waited_out(tmp_path: Path, settings: ConsumerSettings) -> None:
    """The bound is on the first connection only: a nats-server that stops mid-run and comes
    back on the same port gets every event acked, with no error."""
    server = NatsServer(tmp_path / "nats").start()
    env = _env(
        NATS_URL=server.url,
        DATABASE_URL=settings.database_url,
        STREAM=settings.stream,
        SUBJECT_PREFIX=settings.subject_prefix,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "oncelog.publisher", "--json", "--count", "2000", "--rate", "400",
         "--dup-rate", "0", "--progress-every", "0.2", "--connect-timeout", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        # Progress lines come every 0.2 s until the run ends, so this read cannot hang.
        for line in proc.stderr:
            if line.startswith("publisher: sent"):
                break
        server.stop()
        server.start()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["acked"] == summary["sent"] == 2000
    assert summary["errors"] == 0
