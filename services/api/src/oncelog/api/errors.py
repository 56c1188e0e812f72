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

__all__ = ["StoreUnreachableError", "Unavailable", "exception_handlers", "invalid", "whole_number"]

_log = logging.getLogger("oncelog.api")


class Unavailable(HTTPException):
    """A dependency (NATS or PostgreSQL) cannot be reached; the client should retry."""

    status_code = HTTP_503_SERVICE_UNAVAILABLE


class StoreUnreachableError(Exception):
    """A socket error on the way to PostgreSQL: refused, reset, timed out, host unknown."""


def invalid(field: str, message: str) -> ValidationException:
    """Return a 422 naming the field at fault."""
    return ValidationException(
        detail=f"{field}: {message}", extra=[{"key": field, "message": message}]
    )


def whole_number(field: str, value: str, *, low: int, high: int) -> int:
    """Read a number written in ASCII digits between `low` and `high`, or raise a 422 naming it.

    int() would also take "١٢", "1_0", "+5" and " 5", and a converter "1e3" or "10.0": a
    client sending any of them has a bug that a clear 422 shows sooner than a different answer.
    """
    if not (value.isascii() and value.isdigit()):
        raise invalid(field, f"must be a whole number written in digits, not {value[:40]!r}")
    # Past 19 digits the number is out of range whatever they are; int() is not asked to read
    # a huge string.
    number = int(value) if len(value.lstrip("0")) <= 19 else high + 1
    if not low <= number <= high:
        raise invalid(field, f"must be between {low} and {high}")
    return number


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


def _retry_later(detail: str) -> Response[ErrorBody]:
    return Response(
        ErrorBody(status_code=503, detail=detail),
        status_code=HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "1"},
    )


def _store_down(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    _log.warning("postgres unavailable: %r", exc)
    return _retry_later("PostgreSQL is unavailable; retry later")


def _store_busy(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    # statement_timeout, lock_timeout or a deadlock: PostgreSQL is up but did not answer in
    # time, so the same request may succeed a moment later.
    _log.warning("postgres did not answer in time: %r", exc)
    return _retry_later("PostgreSQL did not answer in time; retry later")


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


# Only errors known to be PostgreSQL's answer "PostgreSQL is unavailable". A bare OSError says
# nothing about where it came from (asyncpg's socket errors are wrapped as StoreUnreachableError
# where the pool lends a connection; NATS failures are the gateway's Unavailable), so any other
# OSError is a 500 with its traceback in the log.
exception_handlers: dict[type[Exception] | int, Any] = {
    HTTPException: _http_error,
    asyncpg.DataError: _bad_value,
    OverflowError: _bad_value,
    StoreUnreachableError: _store_down,
    # The connection failed, was lost or was refused by the server.
    asyncpg.PostgresConnectionError: _store_down,
    asyncpg.InterfaceError: _store_down,
    # The server is starting, shutting down, restarting after a crash, or out of connections.
    asyncpg.CannotConnectNowError: _store_down,
    asyncpg.AdminShutdownError: _store_down,
    asyncpg.CrashShutdownError: _store_down,
    asyncpg.TooManyConnectionsError: _store_down,
    # Cancelled by statement_timeout, or a lock not granted in time, or a deadlock victim.
    asyncpg.QueryCanceledError: _store_busy,
    asyncpg.LockNotAvailableError: _store_busy,
    asyncpg.DeadlockDetectedError: _store_busy,
    Exception: _internal,
}
