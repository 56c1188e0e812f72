"""The store's schema: versioned migrations, and the safety checks services run at start."""

from __future__ import annotations

import logging
import re
from importlib import resources

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = ["Conn", "Queryable", "UnsafePostgresError", "check_durable", "is_current", "migrate"]

_log = logging.getLogger("oncelog.store")

# A connection of its own or one borrowed from a pool: both run queries alike.
Conn = asyncpg.Connection | PoolConnectionProxy
# What a single read may go through: a connection, or the pool itself.
Queryable = Conn | asyncpg.Pool

# Any constant works: it only has to be the same for every process that migrates this database.
_MIGRATION_LOCK = 0x6F6E63656C6F67
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class UnsafePostgresError(RuntimeError):
    """PostgreSQL runs with settings that can lose committed events."""


def _migrations() -> list[tuple[int, str, str]]:
    return sorted(
        (int(match.group(1)), entry.name, entry.read_text("utf-8"))
        for entry in (resources.files("oncelog.store") / "migrations").iterdir()
        if (match := _MIGRATION_NAME.match(entry.name))
    )


async def is_current(conn: Conn) -> bool:
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return False
    done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    return all(version in done for version, _, _ in _migrations())


async def migrate(conn: Conn) -> list[str]:
    """Apply the migrations this database lacks, each in its own transaction; return their names.

    An advisory lock makes concurrent starters take turns, so replicas may all call this. A
    current schema is recognised with reads alone, so least-privileged services may call it too.
    """
    if await is_current(conn):
        return []
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now()
               )"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in _migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            _log.info("applied migration %s", name)
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def check_durable(conn: Conn, *, allow_unsafe: bool) -> None:
    """Refuse to run on a PostgreSQL that does not fsync, unless told it is a throwaway setup."""
    fsync = await conn.fetchval("SHOW fsync")
    if fsync == "off" and not allow_unsafe:
        raise UnsafePostgresError(
            "PostgreSQL runs with fsync=off, so a power loss can lose acknowledged events; "
            "turn fsync on, or set ALLOW_UNSAFE_POSTGRES=true for a throwaway setup"
        )
    if fsync == "off":
        _log.warning(
            "PostgreSQL runs with fsync=off: acknowledged events can be lost on power loss"
        )
