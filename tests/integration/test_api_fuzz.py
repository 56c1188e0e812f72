"""Schema-driven fuzzing of the whole API: schemathesis against the OpenAPI schema Litestar serves."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import hypothesis
import hypothesis.errors
import pytest
import requests
import schemathesis
import uvicorn
from hypothesis import HealthCheck
from nats.js import JetStreamContext
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from helpers import api_settings, running_consumer, wait_until
from oncelog.api.app import create_app
from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import free_port

# Examples per operation and generation mode; raise it for a longer hunt (FUZZ_EXAMPLES=500).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def server(settings: ConsumerSettings, js: JetStreamContext) -> Iterator[str]:
    """Serve the API over real HTTP with uvicorn in a thread; return its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(api_settings(settings, rate_limit_per_second=0)),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    else:
        pytest.fail("the API did not become ready")
    yield base
    uv.should_exit = True
    thread.join(30)


@pytest.fixture
async def consuming(
    settings: ConsumerSettings, js: JetStreamContext, pool: asyncpg.Pool
) -> AsyncIterator[None]:
    """Keep a consumer storing what the fuzzer publishes, so reads return what it wrote."""
    async with running_consumer(settings, js, pool):
        yield


def fuzz(base: str) -> None:
    """Run every operation of the schema with positive and negative examples."""
    schema = schemathesis.openapi.from_url(base + "/schema/openapi.json")
    session = requests.Session()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case[Any]) -> None:
                response = case.call(session=session, timeout=15)
                case.validate_response(response, checks=CHECKS)

            started = time.monotonic()
            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                # An operation without parameters or body has no invalid form to generate.
                assert mode is GenerationMode.NEGATIVE, operation.label
            print(f"{operation.label} {mode}: {time.monotonic() - started:.1f}s")  # noqa: T201


async def test_fuzzing_the_schema_finds_no_5xx_and_no_response_off_schema(
    server: str, pool: asyncpg.Pool, consuming: None
) -> None:
    """Generated valid and invalid requests to every route never get a 5xx, and every response
    matches the status codes, content types, headers and bodies the schema documents."""
    seed = [{"topic": "fuzz.seed", "event_id": str(i), "payload": {"i": i}} for i in range(5)]
    async with httpx.AsyncClient(base_url=server) as http:
        assert (await http.post("/publish", json=seed)).status_code == 202
    await wait_until(lambda: _stored(pool, 5))
    await asyncio.to_thread(fuzz, server)


async def _stored(pool: asyncpg.Pool, n: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM events") >= n)
