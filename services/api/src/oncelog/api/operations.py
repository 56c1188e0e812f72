"""Operational routes: liveness, readiness, broker queue state and Prometheus metrics."""

from __future__ import annotations

import logging
from typing import Any

import nats.errors
import nats.js.errors
from litestar import Request, Response, get
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import choose_encoder

from oncelog.api.errors import Unavailable
from oncelog.api.openapi import OpenOperation, ReadOperation, errors
from oncelog.api.protect import guard_read
from oncelog.api.schemas import (
    ConsumerState,
    ErrorBody,
    FieldError,
    Health,
    QueueStats,
    Readiness,
    StreamState,
)
from oncelog.api.state import AppState
from oncelog.store.health import stuck as stuck_consumers

__all__ = ["health", "metrics", "queue_stats", "ready"]

_log = logging.getLogger("oncelog.api")


@get("/health", summary="Liveness: the process answers", tags=["operations"])
async def health() -> Health:
    """Answer 200 while the process is alive."""
    return Health(status="ok")


@get(
    "/ready",
    summary="Readiness: NATS and PostgreSQL are reachable and no consumer is stuck",
    tags=["operations"],
    operation_class=OpenOperation,
    responses=errors(503),
)
async def ready(state: AppState) -> Response[Readiness | ErrorBody]:
    """Answer 200 when NATS and PostgreSQL answer and no live consumer replica is stuck on a
    batch; 503 naming each failing part otherwise."""
    failing: list[FieldError] = []
    nc = state.nc
    if nc is None or not nc.is_connected:
        failing.append(FieldError(field="nats", message="unreachable"))
    try:
        async with state.connection(acquire_timeout=2) as conn:
            stuck = await stuck_consumers(conn)
    except Exception as exc:
        _log.warning("readiness: postgres unreachable: %r", exc)
        failing.append(FieldError(field="postgres", message="unreachable"))
    else:
        # A replica that keeps failing to commit a batch holds those events back: the
        # pipeline is not doing its job even though every server answers.
        failing.extend(
            FieldError(
                field=f"consumer {s.consumer_id}",
                message=f"{s.stuck_batches} batch(es) failing to commit since "
                f"{s.stuck_since.isoformat() if s.stuck_since else 'recently'}: {s.last_error}",
            )
            for s in stuck
        )
    if failing:
        names = " and ".join(f.field for f in failing)
        return Response(
            ErrorBody(status_code=503, detail=f"not ready: {names}", errors=failing),
            status_code=HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "1"},
        )
    return Response(Readiness(status="ready", nats="ok", postgres="ok"))


@get(
    "/queue/stats",
    summary="Stream and durable consumer state: pending, ack pending, redelivered",
    tags=["operations"],
    guards=[guard_read],
    operation_class=ReadOperation,
    responses=errors(401, 429, 503),
)
async def queue_stats(state: AppState) -> QueueStats:
    """Return what waits in the stream and how far the durable consumer has got."""
    settings = state.settings
    nc, js = state.nc, state.js
    if nc is None or js is None or not nc.is_connected:
        raise Unavailable(detail="NATS is not connected; retry later")
    try:
        info = await js.stream_info(settings.stream)
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
        raise Unavailable(detail=f"stream {settings.stream} is unavailable: {exc}") from None
    consumer = None
    try:
        c = await js.consumer_info(settings.stream, settings.durable)
    except nats.js.errors.NotFoundError:
        c = None
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
        raise Unavailable(detail=f"consumer {settings.durable} is unavailable: {exc}") from None
    if c is not None:
        consumer = ConsumerState(
            name=c.name,
            pending=c.num_pending or 0,
            ack_pending=c.num_ack_pending or 0,
            redelivered=c.num_redelivered or 0,
            waiting=c.num_waiting or 0,
            last_delivered_at=c.delivered.last_active if c.delivered else None,
            last_acked_at=c.ack_floor.last_active if c.ack_floor else None,
        )
    s = info.state
    return QueueStats(
        stream=StreamState(
            name=info.config.name or settings.stream,
            messages=s.messages,
            bytes=s.bytes,
            first_seq=s.first_seq,
            last_seq=s.last_seq,
            consumer_count=s.consumer_count,
            max_bytes=info.config.max_bytes or -1,
        ),
        consumer=consumer,
    )


@get(
    "/metrics",
    summary="Prometheus metrics",
    tags=["operations"],
    media_type=CONTENT_TYPE_LATEST,
)
async def metrics(request: Request[Any, Any, Any], state: AppState) -> Response[bytes]:
    """Return the API's metrics in the format the scraper asks for (Prometheus text or
    OpenMetrics), with prometheus_client's own Content-Type, byte for byte."""
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    # An explicit header: Litestar would otherwise append a second charset to a text/ type.
    return Response(encode(state.metrics.registry), headers={"content-type": content_type})
