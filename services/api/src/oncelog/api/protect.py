"""API keys and a per-client token bucket, as Litestar guards."""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, TooManyRequestsException
from litestar.handlers.base import BaseRouteHandler

from oncelog.api.settings import ApiSettings

if TYPE_CHECKING:
    # The state module imports this one (AppState holds a Protection), so the guards name
    # its type for mypy only.
    from oncelog.api.state import AppState

__all__ = ["API_KEY_HEADER", "Protection", "TokenBuckets", "guard_publish", "guard_read"]

API_KEY_HEADER = "X-API-Key"


def _keys(value: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in value.split(",") if key.strip())


class TokenBuckets:
    """One token bucket per client, refilled at `rate` tokens a second up to `burst`."""

    def __init__(
        self,
        rate: float,
        burst: int,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        # Any monotonic clock in seconds; a fake one makes refill testable without waiting.
        self.clock = clock
        # The least recently seen client is forgotten first; it comes back with a full bucket,
        # which only ever errs towards letting a request through.
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> float:
        """Take a token for `client`; return 0 when it got one, else seconds until it will."""
        now = self.clock()
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


class Protection:
    """Who may call which routes, and how often."""

    def __init__(self, settings: ApiSettings) -> None:
        self.publish_keys = _keys(settings.api_keys_publish)
        self.read_keys = _keys(settings.api_keys_read)
        self.buckets = (
            TokenBuckets(settings.rate_limit_per_second, settings.rate_limit_burst)
            if settings.rate_limit_per_second > 0
            else None
        )

    def check(self, connection: ASGIConnection[Any, Any, Any, Any], keys: tuple[str, ...]) -> None:
        """Refuse with 429 when the client is over its rate, with 401 when its key is wrong."""
        given = connection.headers.get(API_KEY_HEADER, "")
        valid = bool(given) and _matches(given, self.publish_keys + self.read_keys)
        if self.buckets is not None:
            # Keyed on a key this API issued, else on the socket's peer address: never on a
            # header the client chooses freely, such as X-Forwarded-For or an unknown key.
            client = "key:" + given if valid else "addr:" + _peer(connection)
            if (wait := self.buckets.take(client)) > 0:
                raise TooManyRequestsException(
                    detail="rate limit exceeded; retry after the Retry-After delay",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        if keys and not (valid and _matches(given, keys)):
            raise NotAuthorizedException(
                detail=f"a valid {API_KEY_HEADER} header is required for this route",
                headers={"WWW-Authenticate": API_KEY_HEADER},
            )


def _matches(given: str, keys: tuple[str, ...]) -> bool:
    # Compare with every key in constant time, so timing does not reveal a key's prefix.
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


def _peer(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    client = connection.scope.get("client")
    return str(client[0]) if client else "unknown"


# The guards are coroutines: Litestar runs a plain function guard in a worker thread, which
# cost a thread hop per request and would let requests race on the token buckets.
async def guard_read(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard of the read routes: API_KEYS_READ, when set, and the rate limit."""
    protection = cast("AppState", connection.app.state).protection
    protection.check(connection, protection.read_keys)


async def guard_publish(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard of the write routes: API_KEYS_PUBLISH, when set, and the rate limit."""
    protection = cast("AppState", connection.app.state).protection
    protection.check(connection, protection.publish_keys)
