"""The HTTP routes: plain Litestar handlers with their state on app.state."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import msgspec
from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.params import Parameter
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE

from oncelog.api import queries
from oncelog.api.errors import invalid
from oncelog.api.schemas import (
    DuplicatesByLayer,
    Health,
    Readiness,
    Stats,
    StoredEvent,
    TopicStats,
)
from oncelog.events import utc

__all__ = ["events", "health", "ready", "stats"]

_TOPIC_QUERY = re.compile(r"^([A-Za-z0-9_-]+|\*)(\.([A-Za-z0-9_-]+|\*))*(\.>)?$|^>$")
_decode_payload = msgspec.json.Decoder(dict[str, Any])


@get("/health", summary="Liveness: the process answers", tags=["operations"])
async def health() -> Health:
    """Answer 200 while the process is alive."""
    return Health(status="ok")


@get(
    "/ready",
    summary="Readiness: NATS and PostgreSQL are reachable",
    tags=["operations"],
    responses={503: {"description": "A dependency is unreachable; the body names it."}},  # type: ignore[dict-item]
)
async def ready(state: State) -> Response[Readiness]:
    """Answer 200 when NATS and PostgreSQL both answer, 503 naming the failing part otherwise."""
    nc = state.nc
    nats_state = "ok" if nc is not None and nc.is_connected else "unreachable"
    try:
        async with state.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1", timeout=2)
        pg_state = "ok"
    except Exception:
        pg_state = "unreachable"
    ok = nats_state == pg_state == "ok"
    body = Readiness(status="ready" if ok else "not ready", nats=nats_state, postgres=pg_state)
    return Response(body, status_code=200 if ok else HTTP_503_SERVICE_UNAVAILABLE)


def _topic_query(topic: str | None) -> str | None:
    if topic is None:
        return None
    if len(topic) > 255 or not _TOPIC_QUERY.match(topic):
        raise invalid(
            "topic",
            "must be a topic or a NATS pattern of tokens [A-Za-z0-9_-], '*' and a final '>'",
        )
    return topic


@get("/events", summary="Stored events, oldest first, keyset-paginated", tags=["events"])
async def events(
    request: Request[Any, Any, Any],
    state: State,
    topic: Annotated[
        str | None,
        Parameter(
            description="A topic, or a NATS pattern: auth.* (one token) or auth.> (one or more)"
        ),
    ] = None,
    limit: Annotated[int, Parameter(ge=1, le=1000, description="Page size")] = 100,
    since: Annotated[
        datetime | None, Parameter(description="Only events at or after this RFC 3339 time")
    ] = None,
    until: Annotated[
        datetime | None, Parameter(description="Only events before this RFC 3339 time")
    ] = None,
    order: Annotated[
        Literal["asc", "desc"], Parameter(description="By (timestamp, topic, event_id)")
    ] = "asc",
    cursor: Annotated[
        str | None, Parameter(description="The opaque cursor of the Link rel=next header")
    ] = None,
) -> Response[list[StoredEvent]]:
    """Return a JSON array of events; the next page's URL is in `Link: <...>; rel="next"`."""
    pattern = _topic_query(topic)
    after = None
    if cursor is not None:
        try:
            after = queries.decode_cursor(cursor)
        except queries.CursorError as exc:
            raise invalid("cursor", str(exc)) from None
    async with state.pool.acquire() as conn:
        rows = await queries.fetch_events(
            conn,
            topic=pattern,
            since=utc(since) if since else None,
            until=utc(until) if until else None,
            after=after,
            descending=order == "desc",
            limit=limit,
        )
    page = [
        StoredEvent(
            topic=r["topic"],
            event_id=r["event_id"],
            timestamp=r["ts"],
            source=r["source"],
            payload=_decode_payload.decode(r["payload"]),
        )
        for r in rows
    ]
    headers = {}
    if len(rows) == limit:
        last = rows[-1]
        token = queries.encode_cursor(queries.Cursor(last["ts"], last["topic"], last["event_id"]))
        params = {k: v for k, v in request.query_params.items() if k != "cursor"} | {
            "cursor": token
        }
        headers["Link"] = f'<{request.url.path}?{urlencode(params)}>; rel="next"'
    return Response(page, headers=headers)


@get("/stats", summary="Exact, persistent statistics", tags=["stats"])
async def stats(state: State) -> Stats:
    """Return counters summed over topics; cost grows with topics, never with stored events."""
    async with state.pool.acquire() as conn:
        rows = await queries.fetch_stats(conn)
    per_topic: dict[str, TopicStats] = {}
    total = dict.fromkeys(
        (
            "received",
            "stored",
            "store_duplicates",
            "broker_duplicates",
            "dead_lettered",
            "redelivered",
            "conflicting",
        ),
        0,
    )
    for r in rows:
        for key in total:
            total[key] += r[key]
        per_topic[r["topic"]] = TopicStats(
            received=r["received"],
            unique_processed=r["stored"],
            duplicate_dropped=r["store_duplicates"] + r["broker_duplicates"],
            duplicates_by_layer=DuplicatesByLayer(
                broker=r["broker_duplicates"], store=r["store_duplicates"]
            ),
            dead_lettered=r["dead_lettered"],
            redelivered=r["redelivered"],
            conflicting_duplicates=r["conflicting"],
            first_timestamp=r["first_ts"],
            last_timestamp=r["last_ts"],
        )
    dropped = total["store_duplicates"] + total["broker_duplicates"]
    topics = [t for t, s in per_topic.items() if s.unique_processed > 0]
    return Stats(
        received=total["received"],
        unique_processed=total["stored"],
        duplicate_dropped=dropped,
        dedup_rate_percent=round(100.0 * dropped / total["received"], 2)
        if total["received"]
        else 0.0,
        topics=topics,
        topic_count=len(topics),
        uptime_seconds=round(time.monotonic() - state.started, 3),
        duplicates_by_layer=DuplicatesByLayer(
            broker=total["broker_duplicates"], store=total["store_duplicates"]
        ),
        dead_lettered=total["dead_lettered"],
        redelivered=total["redelivered"],
        conflicting_duplicates=total["conflicting"],
        per_topic=per_topic,
    )
