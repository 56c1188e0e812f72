"""The deployment one-shot: migrate PostgreSQL, create login users, provision JetStream.

    python -m oncelog.migrate [--provision] [--login NAME:GROUP:PASSWORD_VARIABLE ...]

DATABASE_URL must name a superuser (or a role with CREATEROLE that is a member of
oncelog_owner). Each `--login` creates or updates a login user in one of the group roles that
the migrations create (oncelog_ingest, oncelog_reader, oncelog_retention, oncelog_owner), with
the password read from the named environment variable and the statement timeout of
STATEMENT_TIMEOUT_MS.
`--provision` creates or updates the EVENTS stream and its durable as the NATS user in the
environment (the `provisioner` of deploy/nats/auth.conf); the services themselves may not.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from oncelog.platform import broker, log
from oncelog.platform.settings import CommonSettings, SettingsError, load
from oncelog.store import schema

__all__ = ["GROUPS", "Login", "create_logins", "main", "parse_login", "run"]

_log = logging.getLogger("oncelog.migrate")

GROUPS = ("oncelog_owner", "oncelog_ingest", "oncelog_reader", "oncelog_retention")


@dataclass(frozen=True)
class Login:
    """A login user to create in one of the group roles."""

    name: str
    group: str
    password: str


def parse_login(spec: str, environ: Mapping[str, str]) -> Login:
    """Parse `NAME:GROUP:PASSWORD_VARIABLE`, reading the password from `environ`."""
    parts = spec.split(":")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"--login {spec!r}: expected NAME:GROUP:PASSWORD_VARIABLE")
    name, group, variable = parts
    if group not in GROUPS:
        raise ValueError(f"--login {spec!r}: group must be one of {', '.join(GROUPS)}")
    if name in GROUPS:
        # PostgreSQL refuses to make a role a member of itself, and a login named like another
        # group would take that group's objects and grants.
        raise ValueError(f"--login {spec!r}: the login must not be named like a group")
    password = environ.get(variable, "")
    if not password:
        raise ValueError(f"--login {spec!r}: the environment variable {variable} is empty")
    return Login(name, group, password)


async def create_logins(
    conn: schema.Conn, logins: Sequence[Login], statement_timeout_ms: int
) -> None:
    """Create each login user, or update its password, and make it a member of its group."""
    for login in logins:
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", login.name)
        verb = "ALTER" if exists else "CREATE"
        # format() quotes the name and the password on the server; DDL takes no parameters.
        for template, args in (
            (f"{verb} ROLE %I LOGIN PASSWORD %L", (login.name, login.password)),
            ("GRANT %I TO %I", (login.group, login.name)),
            ("ALTER ROLE %I SET statement_timeout = %L", (login.name, str(statement_timeout_ms))),
        ):
            await conn.execute(
                await conn.fetchval(f"SELECT format('{template}', $1::text, $2::text)", *args)
            )
        _log.info("login user ready", extra={"user": login.name, "group": login.group})


async def run(settings: CommonSettings, logins: Sequence[Login], provision: bool) -> list[str]:
    """Migrate, create the logins and optionally provision JetStream; return applied migrations."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await schema.migrate(conn)
        await create_logins(conn, logins, settings.statement_timeout_ms)
    finally:
        await conn.close()
    if provision:
        nc = await broker.connect(settings, "oncelog-migrate", connect_timeout=5)
        try:
            js = nc.jetstream()
            await broker.ensure_stream(js, settings)
            await broker.ensure_consumer(js, settings)
            await broker.ensure_tally(js, settings)
        finally:
            await nc.close()
        _log.info("streams and durables provisioned", extra={"stream": settings.stream})
    return applied


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m oncelog.migrate`."""
    parser = argparse.ArgumentParser(
        prog="python -m oncelog.migrate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--provision", action="store_true", help="also provision JetStream")
    parser.add_argument(
        "--login",
        action="append",
        default=[],
        metavar="NAME:GROUP:PASSWORD_VARIABLE",
        help="create or update a login user in a group role (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load(CommonSettings)
        logins = [parse_login(spec, os.environ) for spec in args.login]
    except (SettingsError, ValueError) as exc:
        sys.exit(str(exc))
    log.setup(settings.log_level, "migrate")
    applied = asyncio.run(run(settings, logins, args.provision))
    _log.info("schema is current", extra={"applied": applied})
