"""Consumer replicas as real processes, the API in-process, and the fault scenarios' settings."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import msgspec
from litestar.testing import AsyncTestClient

from helpers import ApiClient, api_settings, wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import die_with_parent, free_port

__all__ = [
    "FAULT_SETTINGS",
    "ConsumerProcess",
    "Fleet",
    "api_client",
    "consumer_env",
    "fault_settings",
]

# Settings every fault scenario runs its consumers with: short ack_wait so a dead or frozen
# replica's batch comes back quickly, small batches so a kill lands inside one, and a retry
# ceiling that keeps recovery after an outage in seconds rather than half a minute.
FAULT_SETTINGS: dict[str, Any] = {
    "ack_wait_seconds": 3.0,
    "batch_size": 100,
    "fetch_timeout_seconds": 0.5,
    "retry_max_seconds": 2.0,
    "allow_unsafe_postgres": True,
    "log_level": "WARNING",
}


def consumer_env(settings: ConsumerSettings, **extra: str) -> dict[str, str]:
    """Return the environment that runs `python -m oncelog.consumer` with `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    for name in ConsumerSettings.__struct_fields__:
        value = getattr(settings, name)
        env[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(extra)
    return env


class ConsumerProcess:
    """One `python -m oncelog.consumer` replica that can be killed, frozen and restarted."""

    def __init__(self, settings: ConsumerSettings, log: Path, name: str) -> None:
        self.name = name
        self.metrics_port = free_port()
        self.env = consumer_env(settings, METRICS_PORT=str(self.metrics_port), CONSUMER_ID=name)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def application_name(self) -> str:
        """Return the application_name its PostgreSQL sessions carry."""
        return f"oncelog-consumer {self.name}"

    def start(self) -> ConsumerProcess:
        """Spawn the replica (it dies with the test process)."""
        self._log_handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oncelog.consumer"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: die_with_parent(signal.SIGKILL),  # noqa: PLW1509
        )
        self.starts += 1
        return self

    def serving(self) -> bool:
        """Whether it answers on its metrics port, which opens once it consumes."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def metric(self, name: str) -> float:
        """Return the sum of a metric's samples on its /metrics page (0 when unreachable)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
        except (urllib.error.URLError, OSError):
            return 0.0
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#")
        )

    def wait_serving(self, within: float = 60.0) -> None:
        """Wait until it consumes, failing with its log if it exits or takes too long."""
        deadline = time.monotonic() + within
        while not self.serving():
            if not self.alive or time.monotonic() > deadline:
                raise AssertionError(f"consumer {self.name} did not start:\n{self.tail()}")
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        """Send `sig` to the replica."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """Kill it with SIGKILL, as a crash would, and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(30)
        self._close_log()

    def stop(self) -> int | None:
        """Stop it with SIGTERM (it drains), killing it after 30 s; return its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        code = self.proc.returncode
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def tail(self, chars: int = 3000) -> str:
        """Return the end of its log."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Fleet:
    """The consumer replicas of one scenario, all bound to the one durable."""

    def __init__(self, settings: ConsumerSettings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.members: list[ConsumerProcess] = []

    def start(self, count: int) -> list[ConsumerProcess]:
        """Start `count` more replicas and wait until each consumes."""
        new = [
            ConsumerProcess(
                self.settings,
                self.logs / f"consumer-{len(self.members) + i}.log",
                f"c{len(self.members) + i}",
            ).start()
            for i in range(count)
        ]
        self.members += new
        for member in new:
            member.wait_serving()
        return new

    def restart(self, member: ConsumerProcess) -> None:
        """Start a killed replica again under the same name."""
        member.start()
        member.wait_serving()

    def pids(self) -> list[int | None]:
        """Return each replica's pid (None when not running)."""
        return [m.proc.pid if m.proc is not None and m.alive else None for m in self.members]

    def close(self) -> None:
        """Stop every replica, gracefully when possible."""
        for member in self.members:
            member.stop()


def fault_settings(base: ConsumerSettings, **overrides: Any) -> ConsumerSettings:
    """Return `base` with the fault scenarios' consumer settings and `overrides`."""
    return msgspec.structs.replace(base, **(FAULT_SETTINGS | overrides))


@contextlib.asynccontextmanager
async def api_client(settings: ConsumerSettings) -> AsyncIterator[AsyncTestClient[Any]]:
    """Run the API in this process on the scenario's stream and database."""
    from oncelog.api.app import create_app

    async with ApiClient(create_app(api_settings(settings))) as client:

        async def ready() -> bool:
            return (await client.get("/ready")).status_code == 200

        await wait_until(ready, within=60)
        yield client
