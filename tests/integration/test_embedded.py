"""The embedded PostgreSQL of `just up` and the tests: it leaves the machine as it found it."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg
import pytest

from oncelog.local.embedded import PostgresServer, postgres_bin_dir


def _modes(path: Path) -> dict[Path, int]:
    return {p: p.stat().st_mode for p in [path, *path.parents]}


async def test_postgres_starts_in_a_private_tree_without_loosening_any_directory(
    tmp_path: Path,
) -> None:
    """PostgreSQL runs on data below a 0700 directory, and no directory above its data or its
    binaries changes mode (run as root, it runs in a user namespace instead)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    data = private / "deep" / "pg"
    before = _modes(private) | _modes(postgres_bin_dir())
    with PostgresServer(data, fsync=False) as postgres:
        conn = await asyncpg.connect(postgres.url())
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    assert _modes(private) | _modes(postgres_bin_dir()) == before
    assert data.stat().st_uid == os.geteuid()
    assert (data / "PG_VERSION").stat().st_uid == os.geteuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand a directory to another user")
async def test_a_data_directory_an_older_oncelog_gave_away_is_taken_back(tmp_path: Path) -> None:
    """Data a system user owned (older oncelog ran PostgreSQL so) is given back to root and used."""
    data = tmp_path / "pg"
    with PostgresServer(data, fsync=False):
        pass
    for root, dirs, files in os.walk(data):
        for name in dirs + files:
            os.chown(Path(root, name), 4242, 4242, follow_symlinks=False)
    os.chown(data, 4242, 4242)
    with PostgresServer(data, fsync=False) as postgres:
        conn = await asyncpg.connect(postgres.url())
        await conn.close()
    assert (data / "PG_VERSION").stat().st_uid == 0
