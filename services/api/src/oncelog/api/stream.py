"""GET /events/stream: the live tail as Server-Sent Events (the machinery is in tail.py)."""

from __future__ import annotations

from typing import Annotated

from litestar import get
from litestar.openapi.spec import OpenAPIType
from litestar.params import HeaderParameter, Parameter
from litestar.response import Stream

from oncelog.api.errors import Unavailable, invalid
from oncelog.api.openapi import ReadOperation, errors
from oncelog.api.protect import guard_read
from oncelog.api.routes import TopicQuery, topic_query
from oncelog.api.state import AppState
from oncelog.api.tail import events, matcher
from oncelog.store.tail import POSITION_PATTERN, Position, PositionError

__all__ = ["stream_events"]

_AFTER_DOC = (
    "Resume after this position (an SSE id this API sent); the Last-Event-ID header, which"
    " EventSource sends when it reconnects, takes precedence"
)


# Documented as a string that may be left out (never JSON null), in the one format parse() reads.
_POSITION = {"one_of": None, "type": OpenAPIType.STRING, "pattern": POSITION_PATTERN}


@get(
    "/events/stream",
    summary="Live tail: stored events as Server-Sent Events, once each, in commit order",
    tags=["events"],
    guards=[guard_read],
    operation_class=ReadOperation,
    responses=errors(401, 422, 429, 503),
    media_type="text/event-stream",
)
async def stream_events(
    state: AppState,
    topic: TopicQuery = None,
    after: Annotated[str | None, Parameter(description=_AFTER_DOC, schema_extra=_POSITION)] = None,
    last_event_id: Annotated[
        str | None,
        HeaderParameter(
            name="Last-Event-ID",
            description="The id of the last event received, sent by EventSource on reconnect",
            schema_extra=_POSITION,
        ),
    ] = None,
) -> Stream:
    """Stream every stored event matching `topic` as `id: <position>` / `data: <event JSON>`,
    as soon as its batch commits; with a position, first everything stored after it."""
    topic = topic_query(topic)
    resume: Position | None = None
    for field, value in (("Last-Event-ID", last_event_id), ("after", after)):
        if value is not None:
            try:
                resume = Position.parse(value)
            except PositionError as exc:
                raise invalid(field, str(exc)) from None
            break
    follower = state.follower
    if follower.full:
        state.tail_metrics.refused.inc()
        raise Unavailable(
            detail=f"{follower.max_streams} live-tail streams are open (TAIL_MAX_STREAMS)",
            headers={"Retry-After": "5"},
        )
    matches, sql, params = matcher(topic)
    try:
        stream = await follower.open(matches, wait=5.0)
    except TimeoutError:
        raise Unavailable(detail="PostgreSQL is unreachable; the live tail cannot start") from None
    metrics = state.tail_metrics
    body = events(
        follower,
        stream,
        resume,
        (sql, params),
        state.connection,
        state.settings.tail_keepalive_seconds,
        on_resync=metrics.resyncs.inc,
        on_sent=metrics.sent.inc,
        closing=state.closing,
    )
    return Stream(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
