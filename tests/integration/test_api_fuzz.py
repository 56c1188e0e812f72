"""Schema-driven fuzzing of the whole API: schemathesis, with every check it has, against the
OpenAPI schema Litestar serves."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import strategies as st
from nats.js import JetStreamContext
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema

from helpers import api_settings, running_consumer, wait_until
from oncelog.api import queries
from oncelog.api.app import create_app
from oncelog.api.openapi import DEAD_LETTER_CURSOR_FORMAT, EVENT_CURSOR_FORMAT
from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import free_port

# Examples per operation and generation mode; raise it for a longer hunt (FUZZ_EXAMPLES=500).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
READ_KEY = "fuzz-read-key"
PUBLISH_KEY = "fuzz-publish-key"
# A stream that never ends cannot be judged by a request/response check; the live tail has its
# own tests (tests/integration/test_tail.py).
NOT_FUZZED = ("/events/stream",)

# Only the API can tell a cursor it issued from any other base64url string (that is a 422, as
# the schema's description says), so valid cursors are drawn as the API makes them. They
# carry values PostgreSQL can compare: no NUL, timestamps inside years 1-9999.
_TEXT = st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=20)
schemathesis.openapi.format(
    EVENT_CURSOR_FORMAT,
    st.builds(
        queries.Cursor,
        st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
            lambda ts: ts.replace(tzinfo=UTC)
        ),
        _TEXT,
        _TEXT,
        st.booleans(),
    ).map(queries.encode_cursor),
)
schemathesis.openapi.format(
    DEAD_LETTER_CURSOR_FORMAT,
    st.builds(queries.DeadCursor, st.integers(1, 2**63 - 1)).map(queries.encode_cursor),
)


@pytest.fixture
def server(settings: ConsumerSettings, js: JetStreamContext) -> Iterator[str]:
    """Serve the API over real HTTP with uvicorn in a thread; return its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(
            api_settings(
                settings,
                rate_limit_per_second=0,
                api_keys_read=READ_KEY,
                api_keys_publish=PUBLISH_KEY,
            )
        ),
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


def _in_range(timestamp: Any) -> bool:
    """Whether a generated timestamp stays inside years 1-9999 once in UTC (or is no string)."""
    if not isinstance(timestamp, str):
        return True
    try:
        parsed = datetime.fromisoformat(timestamp)
    except ValueError:
        return True
    try:
        parsed.astimezone(UTC)
    except OverflowError:
        return False
    return True


# Constraints between two parameters, which JSON Schema cannot state: the schema's descriptions
# do, and a request breaking one is a 422 naming the field, however valid each part is alone.
CROSS_FIELD = ("cursor: was issued for the other order",)


def _cross_field(check: str, body: bytes) -> bool:
    """Whether a positive case was refused only for a documented cross-parameter rule."""
    if check != "positive_data_acceptance":
        return False
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return False
    return detail in CROSS_FIELD


def _events_of(body: Any) -> list[Any]:
    if isinstance(body, list):
        return body
    if isinstance(body, dict) and isinstance(body.get("events"), list):
        return list(body["events"])
    return [body]


def fuzz(base: str) -> list[str]:
    """Run schemathesis's whole engine (examples, coverage, fuzzing and stateful phases) with
    every check; return what failed."""
    config = SchemathesisConfig.from_dict(
        {
            "seed": 1,
            "checks": {"enabled": True},
            "generation": {"max-examples": EXAMPLES, "database": "none", "no-shrink": True},
            "phases": {
                "stateful": {"max-steps": 10, "generation": {"max-examples": 10}},
            },
            "auth": {
                "openapi": {
                    "ReadKey": {"api_key": READ_KEY},
                    "PublishKey": {"api_key": PUBLISH_KEY},
                }
            },
            "request-timeout": 15,
        }
        # With a time limit schemathesis repeats its phases until the limit, for a longer hunt
        # (FUZZ_MAX_TIME=600); without one it runs each phase once.
        | ({"max-time": int(os.environ["FUZZ_MAX_TIME"])} if "FUZZ_MAX_TIME" in os.environ else {})
    )
    schema = schemathesis.openapi.from_url(base + "/schema/openapi.json", config=config).exclude(
        path=list(NOT_FUZZED)
    )

    @schema.hook
    def filter_body(ctx: Any, body: Any) -> bool:
        # `timestamp: format: date-time` cannot say "within years 1-9999 once in UTC"
        # (0001-01-01T00:00:00+01:00 is valid RFC 3339); the description does, and a positive
        # case must not draw one. Negative cases are judged on what they break anyway.
        return all(
            _in_range(event.get("timestamp"))
            for event in _events_of(body)
            if isinstance(event, dict)
        )

    @schema.hook
    def map_query(ctx: Any, query: Any) -> Any:
        # A cursor remembers its order (with the other one it is a 422, as documented); the
        # generated order follows the generated cursor so that a valid pair is drawn.
        if not isinstance(query, dict) or not isinstance(query.get("cursor"), str):
            return query
        try:
            cursor = queries.decode_cursor(query["cursor"], queries.Cursor)
        except queries.CursorError:
            return query
        if query.get("order") in {"asc", "desc", None}:
            return query | {"order": "desc" if cursor.descending else "asc"}
        return query

    failures: list[str] = []
    started = time.monotonic()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished) and event.status == Status.FAILURE:
            for case_id, checks in event.recorder.checks.items():
                interaction = event.recorder.interactions.get(case_id)
                body = interaction.response.content if interaction and interaction.response else b""
                for check in checks:
                    if check.failure_info is not None and not _cross_field(check.name, body):
                        failures.append(
                            f"{event.recorder.label} {check.name}: {check.failure_info.failure.title}: "
                            f"{check.failure_info.failure.message[:300]}"
                            f"\n{check.failure_info.code_sample}"
                        )
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"error: {event!r}")
        elif isinstance(event, (events.PhaseStarted, events.PhaseFinished)):
            print(type(event).__name__, event.phase.name, f"{time.monotonic() - started:.1f}s")  # noqa: T201
        elif isinstance(event, events.ScenarioFinished):
            print("  ", event.phase.name, event.label, f"{event.elapsed_time:.1f}s")  # noqa: T201
        elif isinstance(event, events.EngineFinished):
            print(f"schemathesis: {time.monotonic() - started:.1f}s")  # noqa: T201
    return failures


async def test_fuzzing_the_schema_finds_no_5xx_and_no_response_off_schema(
    server: str, pool: asyncpg.Pool, consuming: None
) -> None:
    """Generated valid and invalid requests to every route never get a 5xx, and every response
    matches the status codes, content types, headers and bodies the schema documents."""
    seed = [{"topic": "fuzz.seed", "event_id": str(i), "payload": {"i": i}} for i in range(5)]
    async with httpx.AsyncClient(base_url=server) as http:
        published = await http.post("/publish", json=seed, headers={"X-API-Key": PUBLISH_KEY})
        assert published.status_code == 202
    await wait_until(lambda: _stored(pool, 5))
    failures = await asyncio.to_thread(fuzz, server)
    assert not failures, "\n\n".join(dict.fromkeys(failures))


async def _stored(pool: asyncpg.Pool, n: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM events") >= n)
