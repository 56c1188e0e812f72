"""OpenAPI pieces Litestar cannot infer: request bodies the handlers decode themselves, error
responses, response headers, the API-key security schemes and the formats of parameters."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPI,
    OpenAPIType,
    Operation,
    Reference,
    Schema,
    SecurityScheme,
)

from oncelog.api.protect import API_KEY_HEADER, RATE_LIMIT_HEADERS
from oncelog.api.schemas import ErrorBody
from oncelog.events import Event

__all__ = [
    "COMPONENTS",
    "CURSOR_PATTERN",
    "DEAD_LETTER_CURSOR_FORMAT",
    "EVENT_CURSOR_FORMAT",
    "INT64_MAX",
    "LINK_PATTERN",
    "PUBLISH_SCHEME",
    "READ_SCHEME",
    "TEXT_PATTERN",
    "TOPIC_QUERY_PATTERN",
    "OpenOperation",
    "PublishOperation",
    "ReadOperation",
    "ReplayOperation",
    "add_components",
    "errors",
    "with_headers",
]

# The largest id a PostgreSQL bigint holds: a dead letter's id is one.
INT64_MAX = 2**63 - 1
# A topic or a NATS pattern over topics, as oncelog.events.pattern_error reads it (the unit test
# test_openapi_patterns_agree_with_the_contract holds the two together).
TOPIC_QUERY_PATTERN = r"^(>|([A-Za-z0-9_-]+|\*)(\.([A-Za-z0-9_-]+|\*))*(\.>)?)$"
# What oncelog.events.text_problem allows in event_id and source: no C0 or C1 control character.
TEXT_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"
# Cursors are unpadded base64url; which tokens are cursors only the API that issued them knows.
CURSOR_PATTERN = "^[A-Za-z0-9_-]+$"
EVENT_CURSOR_FORMAT = "oncelog-event-cursor"
DEAD_LETTER_CURSOR_FORMAT = "oncelog-dead-letter-cursor"
LINK_PATTERN = '^<[^>]+>; rel="next"$'

PUBLISH_SCHEME = "PublishKey"
READ_SCHEME = "ReadKey"
_OPEN = (
    " When the list is empty (the default of `just up`) the routes it guards are open and the"
    " header is ignored."
)
COMPONENTS = Components(
    security_schemes={
        PUBLISH_SCHEME: SecurityScheme(
            type="apiKey",
            name=API_KEY_HEADER,
            security_scheme_in="header",
            description="One of the keys of API_KEYS_PUBLISH: POST /publish and dead-letter replay."
            + _OPEN,
        ),
        READ_SCHEME: SecurityScheme(
            type="apiKey",
            name=API_KEY_HEADER,
            security_scheme_in="header",
            description="One of the keys of API_KEYS_READ: the read routes (a publish key does not "
            "read)." + _OPEN,
        ),
    }
)

_DESCRIPTIONS = {
    400: "The request could not be read.",
    401: "X-API-Key is missing or not one of the configured keys.",
    404: "Nothing is stored under this key.",
    409: "The request conflicts with what is stored.",
    413: "The body is over the configured limit (MAX_BODY_BYTES).",
    415: "The body is not sent as Content-Type: application/json.",
    422: "Invalid input; `errors` names each field at fault.",
    429: "Over the client's rate limit; retry after the Retry-After delay.",
    503: "NATS or PostgreSQL is unavailable; retry after the Retry-After delay.",
}


_SECONDS = {"type": "integer", "minimum": 1}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before the same request may be retried.",
        "required": True,
        "schema": _SECONDS,
    }
}
_RATE_LIMIT = {
    "RateLimit-Limit": {
        "description": "The client's token bucket size (RATE_LIMIT_BURST). Sent on every answer "
        "of a rate-limited route while RATE_LIMIT_PER_SECOND is above 0.",
        "schema": {"type": "integer", "minimum": 1},
    },
    "RateLimit-Remaining": {
        "description": "Requests the client may still send at once.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "RateLimit-Reset": {
        "description": "Seconds until the bucket is full again.",
        "schema": {"type": "integer", "minimum": 0},
    },
}
assert tuple(_RATE_LIMIT) == RATE_LIMIT_HEADERS
_HEADERS_BY_STATUS: dict[str, dict[str, Any]] = {
    "401": {
        "WWW-Authenticate": {
            "description": "The header that carries the key.",
            "required": True,
            "schema": {"type": "string", "enum": [API_KEY_HEADER]},
        }
    },
    "429": _RETRY_AFTER,
    "503": _RETRY_AFTER,
}


# Schemas of the headers routes declare with a Litestar ResponseHeader, which has no schema.
_DECLARED = {"Link": {"type": "string", "pattern": LINK_PATTERN}}


def with_headers(responses: dict[str, Any], *, rate_limited: bool) -> dict[str, Any]:
    """Return `responses` with the headers each status carries declared, with schemas."""
    out = {}
    for status, response in responses.items():
        headers = {
            name: header if "schema" in header else header | {"schema": _DECLARED[name]}
            for name, header in (response.get("headers") or {}).items()
        }
        headers |= _HEADERS_BY_STATUS.get(str(status), {})
        if rate_limited:
            headers |= _RATE_LIMIT
        out[status] = response | {"headers": headers} if headers else response
    return out


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """Return OpenAPI responses for `codes`, all with the one error body."""
    return {
        code: ResponseSpec(data_container=ErrorBody, description=_DESCRIPTIONS[code])
        for code in codes
    }


# A JSON value PostgreSQL's jsonb stores: no \u0000 in any string or key. The other limits of
# a payload (nesting, number range) have no JSON Schema spelling; its description names them.
_JSON_VALUE = "#/components/schemas/StorableJson"
_NO_NUL = "^[^\\u0000]*$"
_STORABLE_JSON = Schema(
    description="Any JSON value without \\u0000 in a string or key.",
    any_of=[
        Schema(type=OpenAPIType.STRING, pattern=_NO_NUL),
        Schema(type=[OpenAPIType.NUMBER, OpenAPIType.BOOLEAN, OpenAPIType.NULL]),
        Schema(type=OpenAPIType.ARRAY, items=Reference(ref=_JSON_VALUE)),
        Schema(
            type=OpenAPIType.OBJECT,
            property_names=Schema(pattern=_NO_NUL),
            additional_properties=Reference(ref=_JSON_VALUE),
        ),
    ],
)
_PAYLOAD_RULES = (
    "A JSON object that PostgreSQL's jsonb stores: no \\u0000 in any string or key, nested at "
    "most 100 levels, every number within a 64-bit float (|x| <= 1.8e308, written in at most "
    "400 characters). Anything else is a 422 naming `payload`."
)


def _event_schema(required: list[str], description: str, *, topic_null: bool) -> dict[str, Any]:
    """Return the schema of an event sent over HTTP, derived from the one wire Struct.

    It says what the gateway accepts: `source` and `timestamp` may be null, read as absent
    (clients of the FastAPI aggregators send their unset Optional fields as null).
    """
    _, components = msgspec.json.schema_components([Event])
    schema: dict[str, Any] = copy.deepcopy(components["Event"])
    schema.pop("title", None)
    schema["description"] = description
    schema["required"] = required
    properties = schema["properties"]
    properties["event_id"] |= {
        "pattern": TEXT_PATTERN,
        "description": "Unique per topic (a UUIDv4 is recommended); no control characters; "
        "never trimmed or altered",
    }
    properties["timestamp"] = {
        "type": ["string", "null"],
        "format": "date-time",
        "description": "RFC 3339, within years 1-9999 once converted to UTC (else a 422); "
        "without a zone it is UTC; absent or null: the gateway's clock",
    }
    properties["source"] |= {
        "type": ["string", "null"],
        "pattern": TEXT_PATTERN,
        "description": 'No control characters; absent or null: "http"',
    }
    properties["payload"] = {
        "type": "object",
        "description": _PAYLOAD_RULES,
        "propertyNames": {"pattern": _NO_NUL},
        "additionalProperties": {"$ref": _JSON_VALUE},
        "default": {},
    }
    if topic_null:
        properties["topic"] = {
            "anyOf": [properties["topic"], {"type": "null"}],
            "description": "Absent or null: the dead letter's topic",
        }
    schema["additionalProperties"] = True
    return schema


def add_components(openapi: OpenAPI) -> None:
    """Add the schemas the hand-written bodies refer to, which Litestar cannot generate.

    Litestar replaces the configured component schemas with those it generates, so these are
    added to the built document instead.
    """
    schemas = dict(openapi.components.schemas or {})
    schemas["StorableJson"] = _STORABLE_JSON
    openapi.components.schemas = schemas


_EVENT = _event_schema(["topic", "event_id"], "An event posted over HTTP.", topic_null=False)
_PUBLISH_BODY = {
    "required": True,
    "description": 'One event, a JSON array of events, or {"events": [...]}.',
    "content": {
        "application/json": {
            "schema": {
                "anyOf": [
                    _EVENT,
                    {"type": "array", "items": _EVENT},
                    {
                        "type": "object",
                        "properties": {"events": {"type": "array", "items": _EVENT}},
                        "required": ["events"],
                        # An object with an event_id is one event, whatever else it holds.
                        "not": {"required": ["event_id"]},
                    },
                ]
            }
        }
    },
}
_REPLAY_BODY = {
    "required": False,
    "description": "A corrected event; its topic defaults to the dead letter's. Without a body the "
    "stored bytes are published again.",
    "content": {
        "application/json": {
            "schema": _event_schema(
                ["event_id"], "A corrected event for a dead letter.", topic_null=True
            )
        }
    },
}


@dataclass
class _GuardedOperation(Operation):
    """An operation behind a guard of oncelog.api.protect: keyed by `scheme`, rate-limited."""

    scheme = ""

    def to_schema(self) -> dict[str, Any]:
        """Return the operation with its security and every response's headers declared."""
        schema = super().to_schema()
        schema["security"] = [{self.scheme: []}]
        schema["responses"] = with_headers(schema["responses"], rate_limited=True)
        return schema


@dataclass
class OpenOperation(Operation):
    """A route no guard protects (probes, metrics): its responses' headers declared."""

    def to_schema(self) -> dict[str, Any]:
        """Return the operation with every response's headers declared."""
        schema = super().to_schema()
        schema["responses"] = with_headers(schema["responses"], rate_limited=False)
        return schema


@dataclass
class ReadOperation(_GuardedOperation):
    """A read route: guard_read, API_KEYS_READ."""

    scheme = READ_SCHEME


@dataclass
class PublishOperation(_GuardedOperation):
    """POST /publish decodes its body itself, so its schema is written here."""

    scheme = PUBLISH_SCHEME

    def to_schema(self) -> dict[str, Any]:
        """Return the operation with its request body."""
        return super().to_schema() | {"requestBody": _PUBLISH_BODY}


@dataclass
class ReplayOperation(_GuardedOperation):
    """POST /dead-letters/{id}/replay takes an optional event body, decoded by the handler."""

    scheme = PUBLISH_SCHEME

    def to_schema(self) -> dict[str, Any]:
        """Return the operation with its request body."""
        return super().to_schema() | {"requestBody": _REPLAY_BODY}
