"""The API's Prometheus metrics on an injected registry, and the middleware that fills them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import asyncpg
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    # The state module imports this one (AppState holds the ApiMetrics), so the middleware
    # names its type for mypy only.
    from oncelog.api.state import AppState

__all__ = ["ApiMetrics", "MetricsMiddleware", "count_unmatched"]

# Methods outside this set share one label value, so a client cannot mint label values.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


def _method(scope: Scope) -> str:
    method = str(scope.get("method", ""))
    return method if method in _METHODS else "OTHER"


class ApiMetrics:
    """Counters, histograms and gauges the API exports at /metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "oncelog_http_requests_total",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "oncelog_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.pool = Gauge(
            "oncelog_db_pool_connections",
            "PostgreSQL pool connections, by state.",
            ["state"],
            registry=registry,
        )
        self.published = Counter(
            "oncelog_gateway_events_published_total",
            "Events POST /publish got a PubAck for, duplicates included.",
            registry=registry,
        )
        self.duplicates = Counter(
            "oncelog_duplicates_total",
            "Duplicates dropped, by the layer that dropped them.",
            ["layer"],
            registry=registry,
        )
        self.publish_failures = Counter(
            "oncelog_gateway_publish_failures_total",
            "Events POST /publish could not get a PubAck for before its deadline.",
            registry=registry,
        )
        # Exported at 0 from the start, so the first broker duplicate after a restart is an
        # increase from 0 that rate() and increase() see, not a series born at 1. The gateway
        # only sees the broker layer; the consumers export the store layer.
        self.duplicates.labels("broker")

    def watch_pool(self, pool: asyncpg.Pool) -> None:
        """Report `pool`'s connections at every scrape."""
        self.pool.labels("in_use").set_function(lambda: pool.get_size() - pool.get_idle_size())
        self.pool.labels("idle").set_function(pool.get_idle_size)


class MetricsMiddleware(ASGIMiddleware):
    """Count and time every routed request under its route template, never its raw path."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        """Pass the request on and record its status and duration."""
        metrics = cast("AppState", scope["litestar_app"].state).metrics
        started = time.perf_counter()
        status = 500

        async def recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await next_app(scope, receive, recording)
        finally:
            route = scope.get("path_template") or UNMATCHED
            method = _method(scope)
            metrics.requests.labels(route, method, str(status)).inc()
            metrics.duration.labels(route, method).observe(time.perf_counter() - started)


async def count_unmatched(message: Message, scope: Scope) -> None:
    """Count answers to requests no route matched (404, 405): the middleware never sees them."""
    # Scope's type declares route_handler always present; before routing it is not.
    routed = "route_handler" in cast("Mapping[str, Any]", scope)
    if message["type"] != "http.response.start" or routed:
        return
    metrics = cast("AppState", scope["litestar_app"].state).metrics
    metrics.requests.labels(UNMATCHED, _method(scope), str(message["status"])).inc()
