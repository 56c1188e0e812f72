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
import nats

from oncelog.platform import broker, db, log
from oncelog.platform.embedded import NatsServer, PostgresServer, die_with_parent
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
    conn = await asyncpg.connect(settings.database_url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        await broker.ensure_stream(js, settings)
        await broker.ensure_consumer(js, settings)
    finally:
        await nc.close()


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


def main(argv: list[str] | None = None) -> None:
    """Run the whole stack until interrupted."""
    parser = argparse.ArgumentParser(prog="just up", description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=_env_int("CONSUMER_REPLICAS", 1))
    args = parser.parse_args(argv)
    log.setup(os.environ.get("LOG_LEVEL", "INFO"), "devstack")
    logging.getLogger("oncelog").setLevel(logging.INFO)

    data = Path(os.environ.get("ONCELOG_DATA_DIR", ".data")).resolve()
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    servers: list[NatsServer | PostgresServer] = []
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    children: list[subprocess.Popen[bytes]] = []
    try:
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
        settings = load(CommonSettings, env)
        asyncio.run(_prepare(postgres_url, settings, create_db=bool(postgres_url)))

        metrics_port = _env_int("METRICS_PORT", 9464)
        for replica in range(args.replicas):
            children.append(
                _spawn(
                    "oncelog.consumer",
                    env
                    | {
                        "METRICS_PORT": str(metrics_port + replica),
                        "CONSUMER_ID": f"replica-{replica}",
                    },
                )
            )
        children.append(_spawn("oncelog.api", env))
        api = f"http://{env.get('API_HOST', '127.0.0.1')}:{env.get('API_PORT', '8080')}"
        sys.stderr.write(
            f"\noncelog is up: API {api} (OpenAPI at {api}/schema), NATS {env['NATS_URL']}, "
            f"PostgreSQL {env['DATABASE_URL']}, consumer metrics on port {metrics_port}"
            f"{'+' if args.replicas > 1 else ''}.\nPublish with `just publish`; Ctrl-C stops everything.\n\n"
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
