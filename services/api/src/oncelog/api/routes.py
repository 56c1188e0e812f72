"""The read routes: events, one event's provenance, statistics, topics, dead letters."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import msgspec
from litestar import Request, Response, get
from litestar.datastructures import ResponseHeader
from litestar.exceptions import NotFoundException
from litestar.openapi.spec import OpenAPIFormat, OpenAPIType
from litestar.params import Parameter, PathParameter

from oncelog.api import queries
from oncelog.api.errors import invalid
from oncelog.api.openapi import (
    DEAD_LETTER_CURSOR_FORMAT,
    EVENT_CURSOR_FORMAT,
    TEXT_PATTERN,
    TOPIC_QUERY_PATTERN,
    ReadOperation,
    errors,
)
from oncelog.api.protect import guard_read
from oncelog.api.schemas import (
    DeadLetter,
    DuplicatesByLayer,
    EventDetail,
    Provenance,
    Stats,
    TopicInfo,
    TopicStats,
)
from oncelog.api.state import AppState
from oncelog.events import Event, pattern_error, to_utc, topic_error
from oncelog.events.subjects import TOPIC_PATTERN
from oncelog.store.stats import Counts, totals

__all__ = ["dead_letters", "event", "events", "stats", "topics"]

_decode_headers = msgspec.json.Decoder(dict[str, Any])
_READ_ERRORS = errors(400, 401, 422, 429, 503)
_NEXT = [
    ResponseHeader(
        name="Link",
        description='<url>; rel="next" when another page may follow',
        # Its schema is added by ReadOperation (a ResponseHeader can only infer one from `value`).
        documentation_only=True,
    )
]


def _optional_string(**schema: Any) -> dict[str, Any]:
    # Litestar documents `str | None` as oneOf string or null; a query string is never JSON
    # null, so the parameter is a string that may be left out.
    return {"one_of": None, "type": OpenAPIType.STRING} | schema


TopicQuery = Annotated[
    str | None,
    Parameter(
        description="A topic, or a NATS pattern: auth.* (one token) or auth.> (one or more)",
        max_length=255,
        schema_extra=_optional_string(pattern=TOPIC_QUERY_PATTERN, min_length=1),
    ),
]


def _cursor(format_: str) -> Any:
    return Parameter(
        description="The opaque cursor of the Link rel=next header. Only a cursor this API "
        "issued, for the same route (and, on /events, the same order), is accepted; any other "
        "value is a 422 naming `cursor`.",
        max_length=2048,
        # The format alone: a pattern would promise that any base64url text is accepted.
        schema_extra=_optional_string(format=format_, min_length=1),
    )


def _instant_query(description: str) -> Any:
    return Parameter(
        description=description + "; RFC 3339, without zone = UTC; an instant before year 1 "
        "or after year 9999 in UTC bounds nothing (since) or everything (until)",
        schema_extra=_optional_string(format=OpenAPIFormat.DATE_TIME),
    )


def topic_query(topic: str | None) -> str | None:
    """Return a `topic` parameter checked as a topic or NATS pattern (a 422 naming it if not)."""
    if topic is None:
        return None
    if (bad := pattern_error(topic)) is not None:
        raise invalid("topic", bad)
    return topic


def _whole_number(request: Request[Any, Any, Any], name: str) -> None:
    """Refuse a number parameter not written as plain decimal digits (1e3, 10.0, +5, 0x10).

    Litestar converts query strings leniently, so "1e3" would become 1000: a client that sends
    such a value has a bug, and a clear 422 shows it sooner than a silently different page.
    """
    value = request.query_params.get(name)
    if value is not None and not (value.isascii() and value.isdigit()):
        raise invalid(name, f"must be a whole number written in digits, not {value[:40]!r}")


def _time(name: str, value: str | None) -> datetime | None:
    """Read a query time as RFC 3339, strictly: Litestar's own conversion would take `null` as
    "not given" and a number as a Unix time, silently widening or moving the query."""
    if value is None:
        return None
    try:
        return msgspec.convert(value, datetime)
    except msgspec.ValidationError:
        raise invalid(name, f"must be an RFC 3339 time, not {value[:40]!r}") from None


_BEFORE, _AFTER = "before", "after"


def _instant(value: datetime | None) -> datetime | str | None:
    """Read a query time as UTC, or say it lies before year 1 or after year 9999 in UTC.

    Such a time is a valid RFC 3339 value (0001-01-01T00:00:00+01:00) that Python cannot hold
    in UTC; no stored event lies beyond it, so it bounds a query exactly as well.
    """
    if value is None:
        return None
    try:
        return to_utc(value)
    except OverflowError:
        offset = value.utcoffset() or timedelta(0)
        return _BEFORE if offset > timedelta(0) else _AFTER


def _window(
    since: datetime | None, until: datetime | None
) -> tuple[datetime | None, datetime | None] | None:
    """Return the query's (since, until) in UTC, or None when no event can lie between them."""
    low, high = _instant(since), _instant(until)
    if low == _AFTER or high == _BEFORE:
        return None
    return (
        low if isinstance(low, datetime) else None,
        high if isinstance(high, datetime) else None,
    )


def _next_link(request: Request[Any, Any, Any], token: str) -> str:
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
    return f'<{request.url.path}?{urlencode([*params, ("cursor", token)])}>; rel="next"'


@get(
    "/events",
    summary="Stored events as a JSON array, keyset-paginated",
    tags=["events"],
    response_headers=_NEXT,
    guards=[guard_read],
    operation_class=ReadOperation,
    responses=_READ_ERRORS,
)
async def events(
    request: Request[Any, Any, Any],
    state: AppState,
    topic: TopicQuery = None,
    limit: Annotated[int, Parameter(ge=1, le=1000, description="Page size (max 1000)")] = 100,
    since: Annotated[str | None, _instant_query("Only events at or after this time")] = None,
    until: Annotated[str | None, _instant_query("Only events before this time")] = None,
    order: Annotated[
        Literal["asc", "desc"], Parameter(description="By (timestamp, topic, event_id)")
    ] = "asc",
    cursor: Annotated[str | None, _cursor(EVENT_CURSOR_FORMAT)] = None,
) -> Response[list[Event]]:
    """Return a JSON array of events; the next page's URL is in `Link: <...>; rel="next"`."""
    _whole_number(request, "limit")
    pattern = topic_query(topic)
    descending = order == "desc"
    after = None
    if cursor is not None:
        try:
            after = queries.decode_cursor(cursor, queries.Cursor)
        except queries.CursorError as exc:
            raise invalid("cursor", str(exc)) from None
        if after.descending != descending:
            raise invalid("cursor", "was issued for the other order")
    window = _window(_time("since", since), _time("until", until))
    if window is None:
        return Response([])
    async with state.connection() as conn:
        # One row more than asked tells whether a next page exists without another query.
        rows, cut = await queries.fetch_events(
            conn,
            topic=pattern,
            since=window[0],
            until=window[1],
            after=after,
            descending=descending,
            limit=limit + 1,
            max_bytes=state.settings.events_page_bytes,
        )
    page = [queries.event_of(r) for r in rows[:limit]]
    headers = {}
    if cut or len(rows) > limit:
        last = rows[len(page) - 1]
        token = queries.encode_cursor(
            queries.Cursor(last["ts"], last["topic"], last["event_id"], descending)
        )
        headers["Link"] = _next_link(request, token)
    return Response(page, headers=headers)


@get(
    "/events/{topic:str}/{event_id:str}",
    summary="One stored event with its provenance",
    tags=["events"],
    guards=[guard_read],
    operation_class=ReadOperation,
    responses=errors(400, 401, 404, 422, 429, 503),
)
async def event(
    state: AppState,
    topic: Annotated[
        str,
        PathParameter(
            description="The event's topic (not a pattern); any other value is a 422",
            min_length=1,
            max_length=255,
            pattern=TOPIC_PATTERN,
        ),
    ],
    event_id: Annotated[
        str,
        PathParameter(
            description="The event's id; one holding '/' cannot be addressed here",
            min_length=1,
            max_length=255,
            pattern=TEXT_PATTERN,
        ),
    ],
) -> EventDetail:
    """Return the event, its stream sequence, when it was stored, and its dropped copies."""
    if (bad := topic_error(topic)) is not None:
        raise invalid("topic", bad)
    async with state.connection() as conn:
        row = await queries.fetch_event(conn, topic, event_id)
    if row is None:
        raise NotFoundException(detail=f"no event {event_id!r} in topic {topic!r}")
    return EventDetail(
        event=queries.event_of(row),
        provenance=Provenance(
            stream_seq=row["stream_seq"],
            received_at=row["received_at"],
            first_stored_at=row["stored_at"],
            store_duplicates=row["duplicates"],
            last_duplicate_at=row["last_duplicate_at"],
        ),
    )


def _counts(c: Counts) -> dict[str, Any]:
    return {
        "received": c.received,
        "unique_processed": c.stored,
        "duplicate_dropped": c.duplicates,
        "duplicates_by_layer": DuplicatesByLayer(
            broker=c.broker_duplicates, store=c.store_duplicates
        ),
        "dead_lettered": c.dead_lettered,
        "redelivered": c.redelivered,
        "conflicting_duplicates": c.conflicting,
        "expired": c.expired,
        "dead_letters_expired": c.dead_expired,
        "first_timestamp": c.first_ts,
        "last_timestamp": c.last_ts,
    }


@get(
    "/stats",
    summary="Exact, persistent statistics",
    tags=["stats"],
    guards=[guard_read],
    operation_class=ReadOperation,
    responses=errors(401, 429, 503),
)
async def stats(state: AppState) -> Stats:
    """Return counters summed over topics; cost grows with topics, never with stored events."""
    async with state.connection() as conn:
        by_topic = await queries.fetch_stats(conn)
    total = totals(by_topic)
    per_topic = {name: TopicStats(**_counts(c)) for name, c in by_topic.items()}
    names = [name for name, c in by_topic.items() if c.stored > 0]
    return Stats(
        received=total.received,
        unique_processed=total.stored,
        duplicate_dropped=total.duplicates,
        dedup_rate_percent=round(100.0 * total.duplicates / total.received, 2)
        if total.received
        else 0.0,
        topics=names,
        topic_count=len(names),
        uptime_seconds=round(time.monotonic() - state.started, 3),
        duplicates_by_layer=DuplicatesByLayer(
            broker=total.broker_duplicates, store=total.store_duplicates
        ),
        dead_lettered=total.dead_lettered,
        redelivered=total.redelivered,
        conflicting_duplicates=total.conflicting,
        expired=total.expired,
        dead_letters_expired=total.dead_expired,
        per_topic=per_topic,
    )


@get(
    "/topics",
    summary="Topics with their counts and first/last timestamps",
    tags=["stats"],
    guards=[guard_read],
    operation_class=ReadOperation,
    responses=_READ_ERRORS,
)
async def topics(state: AppState, topic: TopicQuery = None) -> list[TopicInfo]:
    """Return every topic seen (or those matching `topic`), in name order."""
    pattern = topic_query(topic)
    async with state.connection() as conn:
        by_topic = await queries.fetch_stats(conn, pattern)
    return [
        TopicInfo(topic=name, last_stored_at=c.last_stored_at, **_counts(c))
        for name, c in by_topic.items()
    ]


def _text(raw: bytes) -> str | None:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


@get(
    "/dead-letters",
    summary="Messages that could not become events, newest first, with reasons",
    tags=["dead letters"],
    response_headers=_NEXT,
    guards=[guard_read],
    operation_class=ReadOperation,
    responses=_READ_ERRORS,
)
async def dead_letters(
    request: Request[Any, Any, Any],
    state: AppState,
    topic: TopicQuery = None,
    limit: Annotated[int, Parameter(ge=1, le=200, description="Page size (max 200)")] = 50,
    cursor: Annotated[str | None, _cursor(DEAD_LETTER_CURSOR_FORMAT)] = None,
) -> Response[list[DeadLetter]]:
    """Return dead letters with their raw bytes (base64) and reasons; next page in Link."""
    _whole_number(request, "limit")
    pattern = topic_query(topic)
    before = None
    if cursor is not None:
        try:
            before = queries.decode_cursor(cursor, queries.DeadCursor).id
        except queries.CursorError as exc:
            raise invalid("cursor", str(exc)) from None
    async with state.connection() as conn:
        rows = await queries.fetch_dead_letters(conn, topic=pattern, before=before, limit=limit + 1)
    page = [
        DeadLetter(
            id=r["id"],
            stream_seq=r["stream_seq"],
            subject=r["subject"],
            topic=r["topic"],
            headers=_decode_headers.decode(r["headers"]),
            reason=r["reason"],
            raw=r["raw"],
            raw_size=r["raw_size"],
            truncated=r["raw_size"] > len(r["raw"]),
            text=_text(r["raw"]),
            received_at=r["received_at"],
            dead_at=r["dead_at"],
            replayed_at=r["replayed_at"],
        )
        for r in rows[:limit]
    ]
    headers = {}
    if len(rows) > limit:
        token = queries.encode_cursor(queries.DeadCursor(rows[limit - 1]["id"]))
        headers["Link"] = _next_link(request, token)
    return Response(page, headers=headers)
