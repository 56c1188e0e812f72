"""Settings that match the evidence: the shipped NATS config syncs before acking; fsync=off is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from faults.procs import consumer_env
from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import NatsServer, free_port, nats_server_binary

pytestmark = pytest.mark.faults


def test_the_shipped_nats_config_is_valid(repo_root: Path) -> None:
    """nats-server accepts deploy/nats/nats.conf as it is shipped."""
    result = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(repo_root / "deploy/nats/nats.conf")],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr.decode()


def test_the_shipped_nats_config_syncs_every_write_before_acking(
    repo_root: Path, tmp_path: Path
) -> None:
    """A nats-server started from deploy/nats/nats.conf reports sync_always and a 1 MiB max_payload."""
    config = repo_root / "deploy/nats/nats.conf"
    with NatsServer(tmp_path / "nats", config_file=config) as server:
        url = f"http://127.0.0.1:{server.monitor_port}/varz"
        with urllib.request.urlopen(url, timeout=5) as resp:
            varz = json.loads(resp.read())
    assert varz["jetstream"]["config"]["sync_always"] is True
    assert varz["max_payload"] == 1024 * 1024


def test_the_consumer_refuses_a_postgres_without_fsync(settings: ConsumerSettings) -> None:
    """`python -m oncelog.consumer` against a PostgreSQL with fsync=off exits non-zero and says why."""
    env = consumer_env(settings, METRICS_PORT=str(free_port()))
    env.pop("ALLOW_UNSAFE_POSTGRES")
    result = subprocess.run(
        [sys.executable, "-m", "oncelog.consumer"],
        env=env,
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert result.returncode != 0
    assert "fsync=off" in result.stderr.decode()
    assert "ALLOW_UNSAFE_POSTGRES=true" in result.stderr.decode()
