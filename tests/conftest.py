"""Real servers for every test: one nats-server and one PostgreSQL per session, isolated per test.

Each test gets its own stream, subject prefix and database (cloned from a migrated template),
so tests never see each other's events or statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import NatsServer, PostgresServer
from oncelog.platform import broker, db
from oncelog.platform.settings import load
from oncelog.store import schema

TEMPLATE_DB = "oncelog_template"


class Servers:
    """The session's embedded servers."""

    def __init__(self, nats_server: NatsServer, postgres: PostgresServer) -> None:
        self.nats = nats_server
        self.postgres = postgres


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Start nats-server and PostgreSQL once for the whole session."""
    root = tmp_path_factory.mktemp("servers")
    with (
        NatsServer(root / "nats") as nats_server,
        PostgresServer(root / "pg", fsync=False) as postgres,
    ):
        asyncio.run(_make_template(postgres))
        yield Servers(nats_server, postgres)


async def _make_template(postgres: PostgresServer) -> None:
    conn = await asyncpg.connect(postgres.url())
    try:
        await conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await conn.close()
    conn = await asyncpg.connect(postgres.url(TEMPLATE_DB))
    try:
        await schema.migrate(conn)
    finally:
        await conn.close()


@pytest.fixture
def uid() -> str:
    """Return a short unique id for names a test creates."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def settings(servers: Servers, uid: str) -> AsyncIterator[ConsumerSettings]:
    """Return settings for a fresh database, stream and subject prefix of this test alone."""
    database = f"t_{uid}"
    admin = await asyncpg.connect(servers.postgres.url())
    try:
        await admin.execute(f"CREATE DATABASE {database} TEMPLATE {TEMPLATE_DB}")
    finally:
        await admin.close()
    settings = load(
        ConsumerSettings,
        environ={k: v for k, v in os.environ.items() if k == "ONCELOG_FAST_WIRE"},
        nats_url=servers.nats.url,
        database_url=servers.postgres.url(database),
        stream=f"EVENTS_{uid}",
        subject_prefix=f"ev{uid}",
        allow_unsafe_postgres=True,
        fetch_timeout_seconds=0.25,
        metrics_port=0,
    )
    yield settings
    nc = await nats.connect(servers.nats.url)
    try:
        js = nc.jetstream()
        for stream in (settings.stream, f"{settings.stream}_TALLY"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)
    finally:
        await nc.close()


@pytest.fixture
async def nc(settings: ConsumerSettings) -> AsyncIterator[Client]:
    """Return a NATS connection for the test."""
    client = await broker.connect(settings, "oncelog-tests")
    yield client
    await client.close()


@pytest.fixture
async def js(nc: Client, settings: ConsumerSettings) -> JetStreamContext:
    """Return a JetStream context with the test's stream and durable provisioned."""
    context = nc.jetstream()
    await broker.ensure_stream(context, settings)
    await broker.ensure_consumer(context, settings)
    return context


@pytest.fixture
async def pool(settings: ConsumerSettings) -> AsyncIterator[asyncpg.Pool]:
    """Return a pool on the test's database."""
    p = await db.create_pool(settings, "oncelog-tests")
    yield p
    await p.close()


@pytest.fixture
def repo_root() -> Path:
    """Return the repository's root directory."""
    return Path(__file__).resolve().parent.parent


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the end-to-end fuzz rounds tried and found, when any ran."""
    from fuzzing import TALLY

    if TALLY.inputs:
        terminalreporter.section("fuzzing")
        for name, value in vars(TALLY).items():
            if name != "notes":
                terminalreporter.write_line(f"{name}: {value}")
