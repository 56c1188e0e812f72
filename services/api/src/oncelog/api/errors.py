"""One error shape for every route, and the exceptions the routes raise."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import (
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from oncelog.api.schemas import ErrorBody, FieldError

__all__ = ["Unavailable", "exception_handlers", "invalid"]

_log = logging.getLogger("oncelog.api")


class Unavailable(HTTPException):
    """A dependency (NATS or PostgreSQL) cannot be reached; the client should retry."""

    status_code = HTTP_503_SERVICE_UNAVAILABLE


def invalid(field: str, message: str) -> ValidationException:
    """Return a 422 naming the field at fault."""
    return ValidationException(
        detail=f"{field}: {message}", extra=[{"key": field, "message": message}]
    )


def _field_errors(extra: Any) -> list[FieldError]:
    items = extra if isinstance(extra, list) else []
    return [
        FieldError(field=str(item.get("key") or ""), message=str(item.get("message", "")))
        for item in items
        if isinstance(item, dict)
    ]


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    status = exc.status_code
    # Every error may name the fields (or headers) at fault; a 422 always does.
    errors = _field_errors(exc.extra)
    if isinstance(exc, ValidationException):
        status = HTTP_422_UNPROCESSABLE_ENTITY
    headers = dict(exc.headers or {})
    if status == HTTP_503_SERVICE_UNAVAILABLE:
        headers.setdefault("Retry-After", "1")
    return Response(
        ErrorBody(status_code=status, detail=exc.detail, errors=errors),
        status_code=status,
        headers=headers,
    )


def _store_down(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    _log.warning("postgres unavailable: %r", exc)
    return Response(
        ErrorBody(status_code=503, detail="PostgreSQL is unavailable; retry later"),
        status_code=HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "1"},
    )


def _bad_value(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    # PostgreSQL refused a value taken from the request (a NUL character, a number or a time
    # out of its range): the client's input is at fault, so it gets a 4xx, never a 500.
    return Response(
        ErrorBody(
            status_code=422,
            detail="a value in the request cannot be used",
            errors=[FieldError(field="request", message=str(exc).splitlines()[0][:200])],
        ),
        status_code=HTTP_422_UNPROCESSABLE_ENTITY,
    )


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    _log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response(
        ErrorBody(status_code=500, detail="internal server error"),
        status_code=HTTP_500_INTERNAL_SERVER_ERROR,
    )


exception_handlers: dict[type[Exception] | int, Any] = {
    HTTPException: _http_error,
    asyncpg.DataError: _bad_value,
    OverflowError: _bad_value,
    asyncpg.PostgresConnectionError: _store_down,
    asyncpg.CannotConnectNowError: _store_down,
    asyncpg.InterfaceError: _store_down,
    ConnectionError: _store_down,
    OSError: _store_down,
    Exception: _internal,
}
