"""The OpenAPI schema the API serves: a valid document that says what the code enforces."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient
from openapi_spec_validator import validate

from helpers import api_settings
from oncelog.api import queries
from oncelog.api.app import create_app
from oncelog.api.openapi import (
    CURSOR_PATTERN,
    PUBLISH_SCHEME,
    READ_SCHEME,
    TEXT_PATTERN,
    TOPIC_QUERY_PATTERN,
)
from oncelog.api.protect import RATE_LIMIT_HEADERS, guard_publish, guard_read
from oncelog.api.settings import ApiSettings
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import pattern_error, text_problem

# Characters a topic pattern is made of, with some that are never part of one.
_TOPICISH = st.text(alphabet="ab_-.*>9 \n\x00é/", max_size=12)


def _schema() -> dict[str, Any]:
    app = create_app(msgspec.convert({}, ApiSettings))
    return app.openapi_schema.to_schema()


async def test_the_served_schema_is_a_valid_openapi_document(client: AsyncTestClient[Any]) -> None:
    """/schema/openapi.json passes openapi-spec-validator, with every response header typed."""
    resp = await client.get("/schema/openapi.json")
    assert resp.status_code == 200
    schema = resp.json()
    validate(schema)
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                for name, header in (response.get("headers") or {}).items():
                    assert "schema" in header, (method, path, status, name)


def test_every_guarded_route_declares_its_key_and_its_headers(
    settings: ConsumerSettings,
) -> None:
    """A route behind guard_read declares the ReadKey scheme, one behind guard_publish the
    PublishKey scheme, and every answer of both declares the RateLimit headers; a route with no
    guard declares no security."""
    app = create_app(api_settings(settings, api_keys_read="r", api_keys_publish="p"))
    schema = app.openapi_schema.to_schema()
    schemes = schema["components"]["securitySchemes"]
    for name in (READ_SCHEME, PUBLISH_SCHEME):
        assert schemes[name] == schemes[name] | {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
        }
        assert "open" in schemes[name]["description"]
    seen = 0
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if "/schema" in route.path or not handler.include_in_schema:
                continue
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
            for method in handler.http_methods:
                operation = schema["paths"][path][method.lower()]
                guards = handler.guards or []
                expected: list[dict[str, list[str]]] | None = (
                    [{READ_SCHEME: []}]
                    if guard_read in guards
                    else [{PUBLISH_SCHEME: []}]
                    if guard_publish in guards
                    else None
                )
                assert operation.get("security") == expected, (method, path)
                for status, response in operation["responses"].items():
                    declared = set(response.get("headers") or {})
                    assert (set(RATE_LIMIT_HEADERS) <= declared) == bool(expected), (path, status)
                    if status in {"429", "503"}:
                        assert "Retry-After" in declared, (path, status)
                    if status == "401":
                        assert "WWW-Authenticate" in declared, (path, status)
                seen += 1
    assert seen >= 10


def test_the_letter_id_is_declared_as_the_int64_range_the_route_takes() -> None:
    """letter_id is an integer from 1 to 2^63-1, written exactly (not as a float)."""
    (parameter,) = _schema()["paths"]["/dead-letters/{letter_id}/replay"]["post"]["parameters"]
    assert parameter["schema"] | {"description": ""} == {
        "type": "integer",
        "format": "int64",
        "minimum": 1,
        "maximum": 9223372036854775807,
        "description": "",
    }
    assert isinstance(parameter["schema"]["maximum"], int)


@given(value=_TOPICISH | st.text(max_size=260))
def test_the_topic_query_pattern_is_the_contracts(value: str) -> None:
    """The pattern declared for `topic` (with its length bounds) accepts exactly what
    oncelog.events.pattern_error accepts."""
    declared = re.fullmatch(TOPIC_QUERY_PATTERN, value) is not None and 1 <= len(value) <= 255
    assert declared == (pattern_error(value) is None)


@given(value=st.text(min_size=1, max_size=20))
def test_the_text_pattern_is_the_contracts(value: str) -> None:
    """The pattern declared for event_id and source refuses exactly the control characters
    that oncelog.events.text_problem refuses."""
    assert (re.fullmatch(TEXT_PATTERN, value) is not None) == (text_problem(value) is None)


@given(
    ts=st.datetimes(timezones=st.just(UTC)),
    topic=st.text(max_size=40),
    event_id=st.text(max_size=40),
    descending=st.booleans(),
    dead=st.integers(1, 2**63 - 1),
)
def test_cursors_the_api_issues_match_the_declared_pattern(
    ts: datetime, topic: str, event_id: str, descending: bool, dead: int
) -> None:
    """Every cursor the API can issue matches the pattern its parameters declare."""
    for cursor in (
        queries.Cursor(ts, topic, event_id, descending),
        queries.DeadCursor(dead),
    ):
        assert re.fullmatch(CURSOR_PATTERN, queries.encode_cursor(cursor))
