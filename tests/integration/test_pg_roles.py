"""PostgreSQL least privilege: the API's role reads, the consumer's role appends, neither destroys."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import asyncpg
import nats
import pytest

from helpers import wait_until
from oncelog import migrate
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import msg_id
from oncelog.platform import broker
from oncelog.store import schema

DENIED = asyncpg.exceptions.InsufficientPrivilegeError  # SQLSTATE 42501


def other_database(url: str, database: str) -> str:
    """Return `url` pointing at another database of the same server."""
    return f"{url.rsplit('/', 1)[0]}/{database}"


def as_user(url: str, user: str) -> str:
    """Return `url` with the user replaced (the embedded server trusts loopback logins)."""
    return url.replace("postgres@", f"{user}:secret@", 1)


@pytest.fixture
async def logins(settings: ConsumerSettings, uid: str) -> AsyncIterator[dict[str, str]]:
    """Create an ingest and a reader login user for the test's database; drop them after."""
    names = {"ingest": f"ingest_{uid}", "reader": f"reader_{uid}"}
    admin = await asyncpg.connect(settings.database_url)
    try:
        await migrate.create_logins(
            admin,
            [
                migrate.Login(names["ingest"], "oncelog_ingest", "secret"),
                migrate.Login(names["reader"], "oncelog_reader", "secret"),
            ],
            statement_timeout_ms=4321,
        )
    finally:
        await admin.close()
    yield {role: as_user(settings.database_url, name) for role, name in names.items()}
    admin = await asyncpg.connect(other_database(settings.database_url, "postgres"))
    try:
        for name in names.values():
            await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
    finally:
        await admin.close()


SAMPLE = (
    "INSERT INTO events (topic, event_id, ts, source, payload, stream_seq, received_at) "
    "VALUES ($1, 'e-1', now(), 'test', '{}', 1, now())"
)


async def test_reader_cannot_write_events(logins: dict[str, str]) -> None:
    """The API's role reads every table but cannot insert, update, delete or drop events."""
    conn = await asyncpg.connect(logins["reader"])
    try:
        for table in ("events", "duplicates", "dead_letters", "topic_stats"):
            await conn.fetchval(f"SELECT count(*) FROM {table}")
        for statement in (
            SAMPLE.replace("$1", "'a.b'"),
            "UPDATE events SET source = 'x'",
            "DELETE FROM events",
            "TRUNCATE events",
            "DROP TABLE events",
            "DELETE FROM dead_letters",
            "UPDATE dead_letters SET reason = 'x'",
            "CREATE TABLE mine (x int)",
        ):
            with pytest.raises(DENIED):
                await conn.execute(statement)
        # What it may write: broker-duplicate counts and the replay mark of a dead letter.
        await conn.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = -1")
        await conn.execute(
            "INSERT INTO topic_stats (topic, shard, received, broker_duplicates) "
            "VALUES ('a.b', 0, 1, 1)"
        )
    finally:
        await conn.close()


async def test_ingest_appends_but_cannot_destroy(logins: dict[str, str]) -> None:
    """The consumer's role inserts events but cannot update, delete, truncate or drop them."""
    conn = await asyncpg.connect(logins["ingest"])
    try:
        await conn.execute(SAMPLE, "a.b")
        assert await conn.fetchval("SELECT count(*) FROM events") == 1
        for statement in (
            "UPDATE events SET source = 'x'",
            "DELETE FROM events",
            "TRUNCATE events",
            "DROP TABLE events",
            "DELETE FROM topic_stats",
            "CREATE TABLE mine (x int)",
        ):
            with pytest.raises(DENIED):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_login_users_carry_the_statement_timeout(logins: dict[str, str]) -> None:
    """Login users get the configured statement_timeout even when a client does not set one."""
    for url in logins.values():
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SHOW statement_timeout") == "4321ms"
        finally:
            await conn.close()


async def test_least_privileged_services_see_a_current_schema(logins: dict[str, str]) -> None:
    """The migration as the consumer's role finds the schema current without needing DDL rights."""
    conn = await asyncpg.connect(logins["ingest"])
    try:
        assert await schema.migrate(conn) == []
    finally:
        await conn.close()


async def test_roles_migration_runs_where_the_roles_exist(
    settings: ConsumerSettings, uid: str
) -> None:
    """A fresh database migrates cleanly although the cluster already has the roles."""
    admin = await asyncpg.connect(other_database(settings.database_url, "postgres"))
    try:
        existing = await admin.fetchval(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1)", list(migrate.GROUPS)
        )
        assert existing == len(migrate.GROUPS)
        await admin.execute(f"CREATE DATABASE fresh_{uid}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(other_database(settings.database_url, f"fresh_{uid}"))
    try:
        applied = await schema.migrate(conn)
        assert applied[:2] == ["0001_init.sql", "0002_roles.sql"]
        owner = await conn.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = 'events'")
        assert owner == "oncelog_owner"
    finally:
        await conn.close()


def test_login_specs_are_checked() -> None:
    """--login needs NAME:GROUP:VARIABLE, a known group and a non-empty password variable."""
    env = {"PW": "s3cret"}
    assert migrate.parse_login("api:oncelog_reader:PW", env) == migrate.Login(
        "api", "oncelog_reader", "s3cret"
    )
    for bad in (
        "api:oncelog_reader",
        "api:superuser:PW",
        "api:oncelog_reader:MISSING",
        "oncelog_retention:oncelog_retention:PW",
        "oncelog_owner:oncelog_reader:PW",
    ):
        with pytest.raises(ValueError, match="--login"):
            migrate.parse_login(bad, env)


async def test_consumer_stores_events_as_the_ingest_role(
    settings: ConsumerSettings, logins: dict[str, str]
) -> None:
    """The consumer service runs and stores events with only the ingest role's privileges."""
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        await broker.ensure_stream(js, settings)
        await broker.ensure_consumer(js, settings)
        for i in range(20):
            await js.publish(
                f"{settings.subject_prefix}.roles.test",
                f'{{"event_id":"r-{i}","source":"t"}}'.encode(),
                headers={"Nats-Msg-Id": msg_id("roles.test", f"r-{i}")},
            )
    finally:
        await nc.close()
    env = os.environ | {
        "NATS_URL": settings.nats_url,
        "DATABASE_URL": logins["ingest"],
        "STREAM": settings.stream,
        "SUBJECT_PREFIX": settings.subject_prefix,
        "ALLOW_UNSAFE_POSTGRES": "true",
        "METRICS_PORT": "0",
    }
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "oncelog.consumer", env=env)
    try:
        reader = await asyncpg.connect(logins["reader"])
        try:

            async def stored() -> bool:
                return bool(await reader.fetchval("SELECT count(*) FROM events") == 20)

            await wait_until(stored, within=30)
        finally:
            await reader.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
