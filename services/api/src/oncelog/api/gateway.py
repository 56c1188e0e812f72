"""The HTTP gateway: POST /publish and dead-letter replay, answered only after every PubAck."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from litestar import Request, post
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.params import PathParameter
from litestar.status_codes import (
    HTTP_202_ACCEPTED,
    HTTP_409_CONFLICT,
    HTTP_415_UNSUPPORTED_MEDIA_TYPE,
)
from nats.js import JetStreamContext
from nats.js.api import PubAck

from oncelog.api import queries
from oncelog.api.errors import Unavailable, whole_number
from oncelog.api.ingest import BodyError, prepare, prepare_one
from oncelog.api.openapi import INT64_MAX, PublishOperation, ReplayOperation, errors
from oncelog.api.protect import guard_publish
from oncelog.api.schemas import PublishResult, ReplayResult
from oncelog.api.state import AppState
from oncelog.api.tally import publish_tally
from oncelog.events import (
    MAX_EVENT_BYTES,
    Decoded,
    decode_message,
    msg_id,
    subject_for,
    topic_error,
)
from oncelog.platform.publish import Outbound, PublishError, publish_many

__all__ = ["publish", "replay"]

_log = logging.getLogger("oncelog.api")


def _rejected(exc: BodyError) -> ValidationException:
    fields = ", ".join(e.field for e in exc.errors[:5])
    return ValidationException(
        detail=f"invalid events, nothing was published: {fields}",
        extra=[{"key": e.field, "message": e.message} for e in exc.errors],
    )


def _json_body(request: Request[Any, Any, Any], *, optional: bool = False) -> None:
    """Refuse a body not declared as JSON (415), so no web page can post events cross-origin.

    Browsers send text/plain, form and multipart bodies to any origin without asking
    (a CORS "simple request"); a JSON body needs a preflight, which this API never grants.
    `application/json` with any parameters and `application/<x>+json` are JSON. With
    `optional`, a request without a body needs no Content-Type.
    """
    declared = request.headers.get("content-type")
    if declared is None and optional and request.headers.get("content-length", "0") == "0":
        return
    media = (declared or "").partition(";")[0].strip().lower()
    kind, _, subtype = media.partition("/")
    if kind == "application" and (subtype == "json" or subtype.endswith("+json")):
        return
    raise HTTPException(
        status_code=HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        detail=f"Content-Type must be application/json, not {(declared or 'missing')[:100]!r}",
        extra=[{"key": "Content-Type", "message": "must be application/json"}],
    )


def _broker(state: AppState) -> tuple[JetStreamContext, int]:
    """Return the JetStream context and the server's max_payload, or 503 while NATS is away."""
    nc, js = state.nc, state.js
    if nc is None or js is None:
        raise Unavailable(detail="NATS is not connected; retry the same body later")
    return js, int(nc.max_payload)


async def _publish_all(
    state: AppState, js: JetStreamContext, messages: Sequence[Outbound]
) -> list[PubAck]:
    """Publish every event; record the broker's duplicates; 503 unless all were acked.

    Events go out in slices of PUBLISH_INFLIGHT, each slice with PUBLISH_TIMEOUT_SECONDS from
    when it starts, so a large body takes as long as the broker keeps acknowledging, while a
    broker that is away costs one timeout. Duplicates seen are recorded even when a slice
    fails: they were dropped either way, and the client's retry of the same body is counted
    again as what it is.
    """
    settings = state.settings
    size = settings.publish_inflight
    acks: list[PubAck] = []
    dups: Counter[str] = Counter()
    failed = 0
    why = f"got no PubAck from the broker in {settings.publish_timeout_seconds:g}s"
    for start in range(0, len(messages), size):
        part = messages[start : start + size]
        try:
            got: Sequence[PubAck | None] = await publish_many(
                js,
                part,
                deadline=time.monotonic() + settings.publish_timeout_seconds,
                fast_wire=settings.oncelog_fast_wire,
            )
        except PublishError as exc:
            got = exc.acks
            failed = len(messages) - start - sum(ack is not None for ack in got)
        except OSError as exc:
            # A socket error on the way to NATS (nats-py writes inline when its flusher task is
            # gone) is the broker's, never PostgreSQL's: nothing of the slice counts as acked.
            _log.warning("nats connection failed while publishing: %r", exc)
            got = ()
            failed = len(messages) - start
            why = "could not be sent: the connection to NATS failed"
        for message, ack in zip(part, got, strict=False):
            if ack is None:
                continue
            acks.append(ack)
            if ack.duplicate:
                dups[message.topic] += 1
        if failed:
            break
    metrics = state.metrics
    metrics.published.inc(len(acks))
    if dups:
        await _count_broker_duplicates(state, js, dups, len(acks))
    if failed:
        metrics.publish_failures.inc(failed)
        raise Unavailable(
            detail=f"{failed} of {len(messages)} events {why}; "
            "retry the same body (duplicates are dropped)",
        )
    return acks


async def _count_broker_duplicates(
    state: AppState, js: JetStreamContext, dups: Counter[str], acked: int
) -> None:
    """Journal what the broker dropped in the tally stream, or answer 503 so the client retries.

    The events are in the stream either way. A retry of the same body is dropped by the broker
    again and counted then, so the statistics count each answered request once; a 202 with
    unjournalled duplicates, or a 500, would leave them uncounted and the client unsure. The
    API's applier adds journalled counts to topic_stats (see oncelog.api.tally).
    """
    dropped = sum(dups.values())
    settings = state.settings
    try:
        await publish_tally(
            js,
            settings,
            dups,
            deadline=time.monotonic() + settings.publish_timeout_seconds,
            fast_wire=settings.oncelog_fast_wire,
        )
    except (PublishError, OSError) as exc:
        _log.warning("could not journal broker duplicates: %r", exc)
        raise Unavailable(
            detail=f"the {acked} events are in the stream, but the broker did not record the "
            f"{dropped} it dropped as duplicates ({type(exc).__name__}); "
            "retry the same body (duplicates are dropped, and counted then)",
        ) from exc
    state.metrics.duplicates.labels("broker").inc(dropped)


@post(
    "/publish",
    summary="Publish events durably: one event, an array, or {events: [...]}",
    tags=["events"],
    status_code=HTTP_202_ACCEPTED,
    guards=[guard_publish],
    operation_class=PublishOperation,
    response_description="Every event is durably in the stream (or was already).",
    responses=errors(401, 413, 415, 422, 429, 503),
)
async def publish(request: Request[Any, Any, Any], state: AppState) -> PublishResult:
    """Validate every event, publish all with their Msg-Ids, answer once every PubAck arrived."""
    _json_body(request)
    raw = await request.body()
    js, max_payload = _broker(state)
    try:
        messages = prepare(
            raw,
            now=datetime.now(UTC),
            subject_prefix=state.settings.subject_prefix,
            max_payload=max_payload,
        )
    except BodyError as exc:
        raise _rejected(exc) from None
    acks = await _publish_all(state, js, messages)
    duplicates = sum(1 for ack in acks if ack.duplicate)
    return PublishResult(
        accepted=len(acks), duplicates=duplicates, published=len(acks) - duplicates
    )


async def _stored_bytes(state: AppState, letter: Any) -> Outbound:
    """Return a dead letter's own bytes as an event to publish again, or say why they cannot be."""
    raw: bytes = letter["raw"]
    if letter["raw_size"] > len(raw):
        raise HTTPException(
            status_code=HTTP_409_CONFLICT,
            detail=f"only the first {len(raw)} of {letter['raw_size']} bytes were kept; "
            "send a corrected event as the body",
        )
    prefix = state.settings.subject_prefix
    decoded = decode_message(
        letter["subject"], raw, datetime.now(UTC), prefix, max_bytes=MAX_EVENT_BYTES
    )
    if not isinstance(decoded, Decoded):
        raise ValidationException(
            detail=f"the stored message is still not a valid event: {decoded.reason}; "
            "send a corrected event as the body",
            extra=[{"key": "body", "message": decoded.reason}],
        )
    return Outbound(
        subject_for(decoded.topic, prefix),
        raw,
        msg_id(decoded.topic, decoded.event_id),
        decoded.topic,
        decoded.event_id,
    )


@post(
    # A str read by whole_number: an id that Litestar cannot parse as int would be a 404, and
    # one it can (١٢, 1_0, +5) should not be taken.
    "/dead-letters/{letter_id:str}/replay",
    summary="Publish a dead letter again, as stored or corrected",
    tags=["dead letters"],
    status_code=HTTP_202_ACCEPTED,
    guards=[guard_publish],
    operation_class=ReplayOperation,
    response_description="The event is durably in the stream (or was already).",
    responses=errors(400, 401, 404, 409, 413, 415, 422, 429, 503),
)
async def replay(
    request: Request[Any, Any, Any],
    state: AppState,
    letter_id: Annotated[
        str,
        PathParameter(
            description="The dead letter's id: digits, 1 to 2^63-1; anything else is a 422",
            schema_extra={
                "type": "integer",
                "format": "int64",
                "minimum": 1,
                "maximum": INT64_MAX,
            },
        ),
    ],
) -> ReplayResult:
    """Publish the letter with the contract's Msg-Id; replaying twice never stores it twice."""
    number = whole_number("letter_id", letter_id, low=1, high=INT64_MAX)
    _json_body(request, optional=True)
    raw = await request.body()
    async with state.connection() as conn:
        letter = await queries.fetch_dead_letter(conn, number)
    if letter is None:
        raise NotFoundException(detail=f"no dead letter {number}")
    js, max_payload = _broker(state)
    if raw.strip():
        default_topic = letter["topic"] if topic_error(letter["topic"]) is None else None
        try:
            event = prepare_one(
                raw,
                now=datetime.now(UTC),
                subject_prefix=state.settings.subject_prefix,
                max_payload=max_payload,
                default_topic=default_topic,
            )
        except BodyError as exc:
            raise _rejected(exc) from None
    else:
        event = await _stored_bytes(state, letter)
    (ack,) = await _publish_all(state, js, [event])
    async with state.connection() as conn:
        replayed_at = await queries.mark_replayed(conn, number)
    _log.info(
        "dead letter replayed",
        extra={"dead_letter": number, "topic": event.topic, "duplicate": bool(ack.duplicate)},
    )
    return ReplayResult(
        dead_letter_id=number,
        topic=event.topic,
        event_id=event.event_id,
        stream_seq=ack.seq,
        duplicate=bool(ack.duplicate),
        replayed_at=replayed_at,
    )
