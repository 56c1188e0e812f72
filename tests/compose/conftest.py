"""compose.yaml run for real, by `just test-compose` only.

tests/compose/run.sh starts a Docker engine of its own, builds the images and then runs these
tests with ONCELOG_TEST_COMPOSE=1 and the variables that select the stand-in images. Without
that variable (as in `just test`) nothing here is collected.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from compose.deployment import PROFILES, SERVICES, Stack
from helpers import wait_until

if os.environ.get("ONCELOG_TEST_COMPOSE") != "1":
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """Bring compose.yaml up (all but Grafana) and take it down with its volumes at the end."""
    deployment = Stack.create(tmp_path_factory.mktemp("compose"))
    try:
        await deployment.up(*SERVICES)
        async with httpx.AsyncClient(base_url=f"http://{deployment.url('API_HOST_PORT')}") as c:

            async def ready() -> bool:
                try:
                    return (await c.get("/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, within=120, interval=0.5)
        yield deployment
    finally:
        # The logs outlive the containers: run.sh prints them when a test failed.
        logs = os.environ.get("ONCELOG_COMPOSE_LOGS")
        if logs:
            result = await deployment.compose(*PROFILES, "logs", "--no-color", check=False)
            await asyncio.to_thread(Path(logs).write_text, result.out + result.err)
        await deployment.compose(
            *PROFILES, "down", "--volumes", "--remove-orphans", "--timeout", "20", check=False
        )


@pytest.fixture(scope="session")
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """Return an HTTP client of the API's published port, without a key."""
    async with httpx.AsyncClient(
        base_url=f"http://{stack.url('API_HOST_PORT')}", timeout=30
    ) as client:
        yield client


@pytest.fixture(scope="session")
async def prometheus(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """Return an HTTP client of Prometheus's published port."""
    async with httpx.AsyncClient(
        base_url=f"http://{stack.url('PROMETHEUS_HOST_PORT')}", timeout=30
    ) as client:
        yield client
