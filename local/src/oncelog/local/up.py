"""`just up`: embedded NATS and PostgreSQL, then the services (consumer, API, retention).

Every process it starts is supervised: one that ends unasked is restarted with a bounded,
jittered exponential backoff, on the same data; one that keeps crashing right after its start
stops the stack (see docs/operations.md). Ctrl-C (or SIGTERM) stops the services first, letting
them drain, then the servers. Data lives under ONCELOG_DATA_DIR (default `.data/`), so the next
`up` finds it all again. NATS_URL and DATABASE_URL point the services at external servers
instead of starting embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from oncelog import migrate
from oncelog.local.embedded import (
    EmbeddedError,
    NatsServer,
    PostgresServer,
    PrometheusServer,
    die_with_parent,
    prometheus_config,
)
from oncelog.platform import log
from oncelog.platform.settings import (
    EMBEDDED_DATABASE,
    EMBEDDED_HOST,
    CommonSettings,
    SettingsError,
    embedded_port,
    load,
)

__all__ = [
    "GIVE_UP_AFTER",
    "RESTART_BASE_SECONDS",
    "RESTART_MAX_SECONDS",
    "STABLE_AFTER_SECONDS",
    "Supervised",
    "main",
    "supervise",
]

_log = logging.getLogger("oncelog.up")
DATABASE = EMBEDDED_DATABASE

# The first restart waits about RESTART_BASE_SECONDS, each further one twice as long up to
# RESTART_MAX_SECONDS, every delay drawn between half and all of that so replicas that crashed
# together do not come back in lockstep. A process that ran STABLE_AFTER_SECONDS was healthy:
# its next crash starts the backoff over. GIVE_UP_AFTER crashes in a row, each sooner than that
# after the start, mean it cannot run (a bad setting, a port taken): the stack stops.
RESTART_BASE_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
STABLE_AFTER_SECONDS = 30.0
GIVE_UP_AFTER = 5
# How long `just up` waits for the API and the consumers to answer before it says the stack is up.
SERVING_TIMEOUT_SECONDS = 60.0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        sys.exit(f"invalid setting: {name}={value!r} is not a port number")


def _port(name: str, env: dict[str, str]) -> int:
    try:
        return embedded_port(name, env)
    except SettingsError as exc:
        sys.exit(str(exc))


async def _prepare(postgres_url: str, settings: CommonSettings, create_db: bool) -> None:
    """Create the database when embedded, migrate it, and provision the stream and consumer."""
    if create_db:
        admin = await asyncpg.connect(postgres_url)
        try:
            if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
                await admin.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await admin.close()
    await migrate.run(settings, [], provision=True)


def _start_prometheus(
    data: Path, replicas: int, metrics_port: int, api: str, retention: str
) -> PrometheusServer:
    """Run Prometheus on PROMETHEUS_PORT (9090) scraping every replica, the API and retention."""
    rules = Path("deploy/prometheus/alerts.yml").resolve()
    config = data / "prometheus.yml"
    config.write_text(
        prometheus_config(
            {
                "oncelog-consumer": [f"127.0.0.1:{metrics_port + i}" for i in range(replicas)],
                "oncelog-api": [api],
                "oncelog-retention": [retention],
            },
            rules=[rules] if rules.exists() else None,
        )
    )
    server = PrometheusServer(data / "prometheus", config, port=_env_int("PROMETHEUS_PORT", 9090))
    try:
        return server.start()
    except EmbeddedError as exc:
        sys.exit(f"--observability: {exc}")


def _spawn(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - runs this interpreter on oncelog's own modules
        [sys.executable, "-m", module],
        env=env,
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),  # noqa: PLW1509
    )


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


Server = NatsServer | PostgresServer | PrometheusServer


class Supervised:
    """A process `just up` keeps running: an embedded server, or a service run from a module."""

    def __init__(
        self,
        name: str,
        *,
        server: Server | None = None,
        dependency: bool = False,
        module: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.server = server
        # NATS and PostgreSQL: the services need them, so they are restarted first.
        self.dependency = dependency
        self.module = module
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        # Crashes in a row that came sooner than STABLE_AFTER_SECONDS after a start.
        self.quick_crashes = 0
        self.restarts = 0
        # When the process is down, the monotonic time it is due to be started again.
        self.restart_at: float | None = None

    def start(self) -> None:
        """Start the process (a server: wait until it is ready)."""
        # Taken before the attempt, so a start that fails counts as a crash right after it.
        self.started_at = time.monotonic()
        if self.server is not None:
            self.server.start()
        else:
            self.proc = _spawn(self.module, self.env)

    def returncode(self) -> int | None:
        """Return the exit status once the process has ended, else None."""
        if self.server is not None:
            return self.server.returncode()
        return None if self.proc is None else self.proc.poll()

    def reap(self) -> None:
        """Clean up after a process that ended by itself."""
        if self.server is not None:
            self.server.reap()
        self.proc = None

    def crashed(self, why: str) -> str | None:
        """Schedule the restart after a crash and log it; return why to give up instead."""
        now = time.monotonic()
        up = now - self.started_at
        self.quick_crashes = self.quick_crashes + 1 if up < STABLE_AFTER_SECONDS else 1
        if self.quick_crashes >= GIVE_UP_AFTER:
            return (
                f"{self.name} {why}; it crashed {self.quick_crashes} times in a row, each within"
                f" {STABLE_AFTER_SECONDS:.0f} s of its start, so it is not restarted again"
            )
        nominal = min(RESTART_MAX_SECONDS, RESTART_BASE_SECONDS * 2 ** (self.quick_crashes - 1))
        delay = nominal * random.uniform(0.5, 1.0)
        self.restart_at = now + delay
        self.restarts += 1
        at = datetime.now(UTC) + timedelta(seconds=delay)
        _log.warning(
            "%s %s after %.1f s; restarting it in %.1f s",
            self.name,
            why,
            up,
            delay,
            extra={
                "child": self.name,
                "exit": why,
                "uptime_seconds": round(up, 3),
                "restart_in_seconds": round(delay, 3),
                "restart_at": at.isoformat(timespec="milliseconds"),
                "restarts": self.restarts,
            },
        )
        return None


def _stop_all(children: list[Supervised], timeout: float = 30.0) -> None:
    """Stop the services together, so they drain in parallel, killing them after `timeout`."""
    running = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_servers(data: Path, env: dict[str, str], servers: list[Supervised]) -> None:
    """Start embedded NATS and PostgreSQL unless NATS_URL/DATABASE_URL name external ones."""
    # Host and ports come from oncelog.platform.settings, whose stack_environ() the other tools
    # (the publisher) use to find this stack: both read NATS_PORT and PG_PORT alike.
    if "NATS_URL" not in env:
        nats_server = NatsServer(
            data / "nats",
            host=EMBEDDED_HOST,
            port=_port("NATS_PORT", env),
            monitor_port=_port("NATS_MONITOR_PORT", env),
        )
        servers.append(Supervised("nats-server", server=nats_server, dependency=True))
        servers[-1].start()
        env["NATS_URL"] = nats_server.url
    postgres_url = ""
    if "DATABASE_URL" not in env:
        postgres = PostgresServer(data / "postgres", host=EMBEDDED_HOST, port=_port("PG_PORT", env))
        servers.append(Supervised("postgres", server=postgres, dependency=True))
        servers[-1].start()
        postgres_url = postgres.url()
        env["DATABASE_URL"] = postgres.url(DATABASE)
    asyncio.run(_prepare(postgres_url, load(CommonSettings, env), create_db=bool(postgres_url)))


def _start_services(
    env: dict[str, str], replicas: int, metrics_port: int, retention_port: int
) -> list[Supervised]:
    """Run the consumer replicas (metrics on consecutive ports), the API and retention."""
    children = [
        Supervised(
            f"consumer replica-{i}",
            module="oncelog.consumer",
            env=env | {"METRICS_PORT": str(metrics_port + i), "CONSUMER_ID": f"replica-{i}"},
        )
        for i in range(replicas)
    ]
    children.append(Supervised("api", module="oncelog.api", env=env))
    # Its own process, because deleting stored rows takes a role the consumer must not have.
    children.append(
        Supervised(
            "retention",
            module="oncelog.retention",
            env=env | {"METRICS_PORT": str(retention_port)},
        )
    )
    for child in children:
        child.start()
    return children


def _notice(p: Supervised) -> str:
    """If `p` has ended, clean up after it and schedule its restart; return why to give up."""
    if p.restart_at is not None:
        return ""
    code = p.returncode()
    if code is None:
        return ""
    try:
        p.reap()
    except EmbeddedError as exc:
        return f"{p.name} {_describe(code)} and could not be cleaned up: {exc}"
    return p.crashed(_describe(code)) or ""


def _restart_when_due(p: Supervised) -> str:
    """Start `p` again once its backoff has passed; return why to give up."""
    if p.restart_at is None or time.monotonic() < p.restart_at:
        return ""
    try:
        p.start()
    except (EmbeddedError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return p.crashed(f"failed to start ({first})") or ""
    p.restart_at = None
    return ""


def supervise(processes: list[Supervised], stopping: Callable[[], bool]) -> str:
    """Restart whatever ends until `stopping()`; return "" then, or why it gave up."""
    dependencies = [p for p in processes if p.dependency]
    others = [p for p in processes if not p.dependency]
    while not stopping():
        for p in processes:
            # Checked before each: a Ctrl-C reaches the services too, and those that end
            # because of it must not be taken for crashes.
            if stopping():
                return ""
            if reason := _notice(p):
                return reason
        for p in dependencies:
            if stopping():
                return ""
            if reason := _restart_when_due(p):
                return reason
        # While NATS or PostgreSQL is down the services' restarts wait: a consumer started
        # without its database would only crash again and use up its restarts.
        if any(p.restart_at is not None for p in dependencies):
            time.sleep(0.2)
            continue
        for p in others:
            if stopping():
                return ""
            if reason := _restart_when_due(p):
                return reason
        time.sleep(0.2)
    return ""


def _serving(urls: list[str], deadline: float, stopping: Callable[[], bool]) -> bool:
    """Wait until every URL answers 200 (loopback only); False at the deadline or on a stop."""
    pending = list(urls)
    while pending and not stopping() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(pending[0], timeout=1) as response:  # noqa: S310 - loopback URLs built here
                if response.status == 200:
                    pending.pop(0)
                    continue
        except OSError:
            pass
        time.sleep(0.1)
    return not pending


def setup_logging(program: str) -> None:
    """Log as JSON at LOG_LEVEL; a level logging does not know ends the program naming it."""
    try:
        log.setup(load(CommonSettings).log_level, program)
    except SettingsError as exc:
        sys.exit(str(exc))


def main(argv: list[str] | None = None) -> None:
    """Run the whole stack until interrupted."""
    parser = argparse.ArgumentParser(prog="just up", description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=_env_int("CONSUMER_REPLICAS", 1))
    parser.add_argument(
        "--observability",
        action="store_true",
        help="also run Prometheus (the system's `prometheus` binary) scraping the stack",
    )
    args = parser.parse_args(argv)
    setup_logging("up")
    logging.getLogger("oncelog").setLevel(logging.INFO)

    data = Path(os.environ.get("ONCELOG_DATA_DIR", ".data")).resolve()
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    servers: list[Supervised] = []
    children: list[Supervised] = []
    stop_requested = False
    gave_up = ""

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        _start_servers(data, env, servers)
        metrics_port = _env_int("METRICS_PORT", 9464)
        retention_port = _env_int("RETENTION_METRICS_PORT", 9470)
        children = _start_services(env, args.replicas, metrics_port, retention_port)
        api_address = f"{env.get('API_HOST', '127.0.0.1')}:{env.get('API_PORT', '8080')}"
        extra = ""
        if args.observability:
            prometheus = _start_prometheus(
                data, args.replicas, metrics_port, api_address, f"127.0.0.1:{retention_port}"
            )
            # Started ready by _start_prometheus; supervised like the services, stopped last.
            servers.append(Supervised("prometheus", server=prometheus))
            servers[-1].started_at = time.monotonic()
            extra = f", Prometheus {prometheus.url}"
        # "Up" means answering: wait for the API and every replica's metrics before saying so.
        waiting = [f"http://{api_address}/health"] + [
            f"http://127.0.0.1:{metrics_port + i}/metrics" for i in range(args.replicas)
        ]
        if not _serving(
            waiting, time.monotonic() + SERVING_TIMEOUT_SECONDS, lambda: stop_requested
        ):
            _log.warning(
                "the stack is not answering yet; it keeps starting", extra={"waiting": waiting}
            )
        sys.stderr.write(
            f"\noncelog is up: API http://{api_address} (OpenAPI at /schema), NATS {env['NATS_URL']}, "
            f"PostgreSQL {env['DATABASE_URL']}, consumer metrics on port {metrics_port}"
            f"{'+' if args.replicas > 1 else ''}{extra}.\n"
            "Publish with `just publish`; Ctrl-C stops everything.\n\n"
        )
        gave_up = supervise(servers + children, lambda: stop_requested)
        if gave_up:
            _log.error("giving up: %s; stopping the stack", gave_up)
    except EmbeddedError as exc:
        gave_up = str(exc)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_all(children)
        for supervised in reversed(servers):
            if supervised.server is not None:
                supervised.server.stop()
        _log.info("stack stopped; data kept in %s", data)
    if gave_up:
        sys.exit(f"just up: {gave_up}")


if __name__ == "__main__":
    main()
