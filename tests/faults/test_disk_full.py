"""The disk under the broker's file store fills up while events flow (a small tmpfs)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from faults.procs import Fleet, fault_settings
from faults.scenario import Scenario
from helpers import wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import NatsServer

pytestmark = [pytest.mark.faults, pytest.mark.slow]

DISK_BYTES = 24 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """Mount a 24 MiB tmpfs for the broker's store (skipped where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        # JetStream's max_file_store is no substitute: a stream whose byte limit exceeds it
        # cannot even be created, so the limit path is the stream limits scenario's.
        pytest.skip(f"tmpfs cannot be mounted here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Grow a file until about `leave` bytes are free on `disk`, as another tenant would."""
    stat = os.statvfs(disk)
    remaining = stat.f_bavail * stat.f_frsize - leave
    filler = disk / "filler"
    with filler.open("ab") as handle:
        chunk = b"\0" * (1024 * 1024)
        while remaining > 0:
            with contextlib.suppress(OSError):  # the last chunk may not fit exactly
                handle.write(chunk[: min(len(chunk), remaining)])
            remaining -= len(chunk)
    return filler


async def test_a_full_disk_under_the_broker_loses_no_acked_event(
    settings: ConsumerSettings,
    small_disk: Path,
    tmp_path: Path,
    fleet_factory: Callable[[ConsumerSettings], Fleet],
) -> None:
    """When the broker's disk fills, publishers see timeouts and retry; after space is freed and
    nats-server restarted, no acked event is lost."""
    nats_server = NatsServer(small_disk / "store")
    nats_server.log_file = tmp_path / "nats.log"
    nats_server.start()
    try:
        s = fault_settings(settings, nats_url=nats_server.url, stream_max_bytes=12 * 1024 * 1024)
        fleet = fleet_factory(s)
        runs = 2
        async with Scenario(
            "broker disk full (tmpfs), then freed", s, fleet, rate=300.0
        ) as scenario:
            await scenario.start(consumers=2)
            for _ in range(runs):
                errors = sum(scenario.ledger.errors.values())

                async def publishers_saw_it(errors: int = errors) -> bool:
                    # Blocks emptied by the consumers free space again: keep the disk full.
                    await asyncio.to_thread(_fill, small_disk, 16 * 1024)
                    return sum(scenario.ledger.errors.values()) > errors + 10

                # A disk fills while consumers lag: paused, they free no blocks, so the
                # broker runs out of space within seconds whatever their speed.
                for member in fleet.members:
                    member.signal(signal.SIGSTOP)
                try:
                    await wait_until(publishers_saw_it, within=180, interval=0.2)
                finally:
                    for member in fleet.members:
                        member.signal(signal.SIGCONT)
                # Heal as an operator would: free the space, restart the broker.
                (small_disk / "filler").unlink()
                await asyncio.to_thread(nats_server.stop)
                await asyncio.to_thread(nats_server.start)
                await scenario.recovered(time.monotonic())
            verdict = await scenario.verdict(runs)
        assert verdict.ok, verdict
    finally:
        nats_server.stop()
