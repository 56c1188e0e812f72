"""`just up`: embedded NATS and PostgreSQL, then the consumer and the API, in the foreground.

Ctrl-C (or SIGTERM) stops the services first, letting them drain, then the servers. Data lives
under ONCELOG_DATA_DIR (default `.data/`), so the next `up` finds it all again. NATS_URL and
DATABASE_URL point the services at external servers instead of starting embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from oncelog.platform import log, migrate
from oncelog.platform.embedded import (
    EmbeddedError,
    NatsServer,
    PostgresServer,
    PrometheusServer,
    die_with_parent,
    prometheus_config,
)
from oncelog.platform.settings import CommonSettings, load

__all__ = ["main"]

_log = logging.getLogger("oncelog.devstack")
DATABASE = "oncelog"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        sys.exit(f"invalid setting: {name}={value!r} is not a port number")


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


def _start_prometheus(data: Path, replicas: int, metrics_port: int, api: str) -> PrometheusServer:
    """Run Prometheus on PROMETHEUS_PORT (9090) scraping every replica and the API."""
    rules = Path("deploy/prometheus/alerts.yml").resolve()
    config = data / "prometheus.yml"
    config.write_text(
        prometheus_config(
            {
                "oncelog-consumer": [f"127.0.0.1:{metrics_port + i}" for i in range(replicas)],
                "oncelog-api": [api],
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


def _stop_all(children: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


Server = NatsServer | PostgresServer | PrometheusServer


def _start_servers(data: Path, env: dict[str, str], servers: list[Server]) -> None:
    """Start embedded NATS and PostgreSQL unless NATS_URL/DATABASE_URL name external ones."""
    if "NATS_URL" not in env:
        nats_server = NatsServer(
            data / "nats",
            port=_env_int("NATS_PORT", 4222),
            monitor_port=_env_int("NATS_MONITOR_PORT", 8222),
        ).start()
        servers.append(nats_server)
        env["NATS_URL"] = nats_server.url
    postgres_url = ""
    if "DATABASE_URL" not in env:
        postgres = PostgresServer(data / "postgres", port=_env_int("PG_PORT", 5432)).start()
        servers.append(postgres)
        postgres_url = postgres.url()
        env["DATABASE_URL"] = postgres.url(DATABASE)
    asyncio.run(_prepare(postgres_url, load(CommonSettings, env), create_db=bool(postgres_url)))


def _start_services(
    env: dict[str, str], replicas: int, metrics_port: int
) -> list[subprocess.Popen[bytes]]:
    """Run the consumer replicas (metrics on consecutive ports) and the API."""
    children = [
        _spawn(
            "oncelog.consumer",
            env | {"METRICS_PORT": str(metrics_port + i), "CONSUMER_ID": f"replica-{i}"},
        )
        for i in range(replicas)
    ]
    children.append(_spawn("oncelog.api", env))
    return children


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
    log.setup(os.environ.get("LOG_LEVEL", "INFO"), "devstack")
    logging.getLogger("oncelog").setLevel(logging.INFO)

    data = Path(os.environ.get("ONCELOG_DATA_DIR", ".data")).resolve()
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    servers: list[Server] = []
    children: list[subprocess.Popen[bytes]] = []
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        _start_servers(data, env, servers)
        metrics_port = _env_int("METRICS_PORT", 9464)
        children = _start_services(env, args.replicas, metrics_port)
        api_address = f"{env.get('API_HOST', '127.0.0.1')}:{env.get('API_PORT', '8080')}"
        extra = ""
        if args.observability:
            prometheus = _start_prometheus(data, args.replicas, metrics_port, api_address)
            servers.append(prometheus)
            extra = f", Prometheus {prometheus.url}"
        sys.stderr.write(
            f"\noncelog is up: API http://{api_address} (OpenAPI at /schema), NATS {env['NATS_URL']}, "
            f"PostgreSQL {env['DATABASE_URL']}, consumer metrics on port {metrics_port}"
            f"{'+' if args.replicas > 1 else ''}{extra}.\n"
            "Publish with `just publish`; Ctrl-C stops everything.\n\n"
        )
        while not stop_requested:
            if any(child.poll() is not None for child in children):
                _log.error("a service exited; stopping the stack")
                break
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_all(children)
        for server in reversed(servers):
            server.stop()
        _log.info("stack stopped; data kept in %s", data)
    failed = [c.returncode for c in children if c.returncode not in (0, -signal.SIGTERM, None)]
    if failed and not stop_requested:
        sys.exit(1)


if __name__ == "__main__":
    main()
