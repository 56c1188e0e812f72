"""OpenAPI pieces Litestar cannot infer: request bodies the handlers decode themselves, error responses."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Operation

from oncelog.api.schemas import ErrorBody
from oncelog.events import Event

__all__ = ["PublishOperation", "ReplayOperation", "errors"]

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


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """Return OpenAPI responses for `codes`, all with the one error body."""
    return {
        code: ResponseSpec(data_container=ErrorBody, description=_DESCRIPTIONS[code])
        for code in codes
    }


def _event_schema(required: list[str], description: str) -> dict[str, Any]:
    """Return the schema of an event sent over HTTP, derived from the one wire Struct."""
    _, components = msgspec.json.schema_components([Event])
    schema: dict[str, Any] = copy.deepcopy(components["Event"])
    schema.pop("title", None)
    schema["description"] = description
    schema["required"] = required
    schema["properties"]["timestamp"] = {
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339; without a zone it is UTC; when absent, the gateway's clock",
    }
    schema["properties"]["source"]["description"] = 'Defaults to "http"'
    return schema


_EVENT = _event_schema(["topic", "event_id"], "An event posted over HTTP.")
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
            "schema": _event_schema(["event_id"], "A corrected event for a dead letter.")
        }
    },
}


@dataclass
class PublishOperation(Operation):
    """POST /publish decodes its body itself, so its schema is written here."""

    def to_schema(self) -> dict[str, Any]:
        """Return the operation with its request body."""
        return super().to_schema() | {"requestBody": _PUBLISH_BODY}


@dataclass
class ReplayOperation(Operation):
    """POST /dead-letters/{id}/replay takes an optional event body, decoded by the handler."""

    def to_schema(self) -> dict[str, Any]:
        """Return the operation with its request body."""
        return super().to_schema() | {"requestBody": _REPLAY_BODY}
