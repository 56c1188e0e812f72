"""API keys and a per-client token bucket, as Litestar guards, and the RateLimit headers."""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from litestar.connection import ASGIConnection
from litestar.datastructures import MutableScopeHeaders
from litestar.exceptions import NotAuthorizedException, TooManyRequestsException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Message, Scope

from oncelog.api.settings import ApiSettings

if TYPE_CHECKING:
    # The state module imports this one (AppState holds a Protection), so the guards name
    # its type for mypy only.
    from oncelog.api.state import AppState

__all__ = [
    "API_KEY_HEADER",
    "RATE_LIMIT_HEADERS",
    "Protection",
    "Quota",
    "TokenBuckets",
    "guard_publish",
    "guard_read",
    "send_rate_limit_headers",
]

API_KEY_HEADER = "X-API-Key"
# The draft-ietf-httpapi-ratelimit-headers fields that express-rate-limit (standardHeaders
# "draft-6"), Kong and Traefik clients read, sent on every answer of a rate-limited route.
RATE_LIMIT_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
# Where the guard leaves a request's quota for the hook that writes it into the answer.
_QUOTA_KEY = "oncelog.quota"


def _keys(value: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in value.split(",") if key.strip())


class Quota(NamedTuple):
    """What taking a token left: `wait` seconds until the next token (0 when this request got
    one), the whole tokens `remaining`, and seconds until the bucket is full again (`reset`)."""

    wait: float
    remaining: int
    reset: float

    def headers(self, limit: int) -> dict[str, str]:
        """Return the RateLimit headers of this quota for a bucket of `limit` tokens."""
        return {
            "RateLimit-Limit": str(limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset)),
        }


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

    def take(self, client: str) -> Quota:
        """Take a token for `client`; the quota's `wait` is 0 when it got one, else the seconds
        until it will."""
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
        return Quota(wait, math.floor(tokens), (self.burst - tokens) / self.rate)


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
            quota = self.buckets.take(client)
            # Every answer of this request carries the quota, whatever its status (see
            # send_rate_limit_headers); a 401 or 422 spent a token too.
            scope = cast("dict[str, Any]", connection.scope)
            scope[_QUOTA_KEY] = quota.headers(int(self.buckets.burst))
            if quota.wait > 0:
                raise TooManyRequestsException(
                    detail="rate limit exceeded; retry after the Retry-After delay",
                    headers={"Retry-After": str(max(1, math.ceil(quota.wait)))},
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


async def send_rate_limit_headers(message: Message, scope: Scope) -> None:
    """Add the RateLimit headers the guard computed to the answer (2xx and errors alike)."""
    if message["type"] != "http.response.start":
        return
    headers = cast("Mapping[str, Any]", scope).get(_QUOTA_KEY)
    if headers:
        response = MutableScopeHeaders.from_message(message)
        for name, value in headers.items():
            response[name] = value
