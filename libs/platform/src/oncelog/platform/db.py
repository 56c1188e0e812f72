"""The PostgreSQL pool every service uses."""

from __future__ import annotations

import asyncpg

from oncelog.platform.settings import CommonSettings

__all__ = ["create_pool"]


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Return a connection to the pool as it is.

    asyncpg's default reset costs a round trip per release (`RESET ALL`, `UNLISTEN *`, unlock
    all advisory locks, `CLOSE ALL`). oncelog's sessions change none of these: settings come
    with the connection, the one advisory lock is released where it is taken, and nothing
    listens or keeps a cursor. An open transaction is still rolled back by the pool itself.
    """


async def create_pool(settings: CommonSettings, application: str) -> asyncpg.Pool:
    """Open a pool whose sessions carry the service's name and statement timeout."""
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        server_settings={
            "application_name": application,
            "statement_timeout": str(settings.statement_timeout_ms),
        },
        reset=_keep_session,
    )
    assert pool is not None  # asyncpg only returns None when asked not to initialise.
    return pool
