"""At-least-once publishing: the same Msg-Id on every retry, within a deadline."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck

__all__ = ["RETRYABLE", "Outbound", "PublishError", "publish_many"]

# Failures worth another try with the same Msg-Id: the broker may or may not have stored the
# message, and its duplicate window makes the retry safe either way. A full stream (discard=new)
# answers with an APIError, so it is retried too until the deadline.
RETRYABLE = (
    TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.APIError,
)


class PublishError(Exception):
    """The broker did not acknowledge a message before the deadline; the cause is the last error.

    `acks` holds what did arrive, in the order of the messages (None where none came), so a
    caller can still account for the duplicates the broker reported.
    """

    def __init__(self, message: str, acks: Sequence[PubAck | None] = ()) -> None:
        super().__init__(message)
        self.acks = list(acks)


class Outbound(NamedTuple):
    """One message to publish: its subject, body and broker dedup id."""

    subject: str
    body: bytes
    msg_id: str


async def publish_many(
    js: JetStreamContext,
    messages: Sequence[Outbound],
    *,
    deadline: float,
    attempt_timeout: float = 2.0,
    backoff_cap: float = 1.0,
    on_retry: Callable[[int], None] | None = None,
) -> list[PubAck]:
    """Publish every message and wait for all PubAcks; return them in the order given.

    All messages go out back to back on one shared reply subscription (nats-py's
    publish_async) and their acks are awaited together, which costs a fraction of one
    request-reply per message. Messages without an ack (timeout, error, full stream) are sent
    again with the same Msg-Id, under jittered backoff, until `deadline` (monotonic) passes;
    then PublishError names how many are missing. `on_retry` hears how many are sent again.
    """
    acks: list[PubAck | None] = [None] * len(messages)
    todo = list(range(len(messages)))
    attempt = 0
    last: BaseException | None = None
    while todo:
        attempt += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PublishError(
                f"{len(todo)} of {len(messages)} messages got no PubAck", acks
            ) from last
        futures, last = await _send(js, messages, todo, remaining)
        if futures:
            done, pending = await asyncio.wait(futures, timeout=min(attempt_timeout, remaining))
            for future in pending:
                future.cancel()
            last = _collect(done, futures, acks) or last
        todo = [i for i in todo if acks[i] is None]
        if todo:
            if on_retry is not None:
                on_retry(len(todo))
            delay = random.uniform(0, min(backoff_cap, 0.02 * 2**attempt))
            if time.monotonic() + delay >= deadline:
                raise PublishError(
                    f"{len(todo)} of {len(messages)} messages got no PubAck"
                ) from last
            await asyncio.sleep(delay)
    return [ack for ack in acks if ack is not None]


async def _send(
    js: JetStreamContext, messages: Sequence[Outbound], todo: list[int], remaining: float
) -> tuple[dict[asyncio.Future[PubAck], int], BaseException | None]:
    """Publish the messages `todo` names; return their ack futures and any send error."""
    futures: dict[asyncio.Future[PubAck], int] = {}
    try:
        # No wait_stall: nats-py would wrap every message in asyncio.wait_for, which yields to
        # the loop and so flushes the socket once per message. One timeout around the whole
        # send lets the messages leave in a few large writes.
        async with asyncio.timeout(remaining):
            for i in todo:
                m = messages[i]
                future = await js.publish_async(
                    m.subject, m.body, headers={"Nats-Msg-Id": m.msg_id}
                )
                futures[future] = i
    except RETRYABLE as exc:
        return futures, exc
    return futures, None


def _collect(
    done: set[asyncio.Future[PubAck]],
    futures: dict[asyncio.Future[PubAck], int],
    acks: list[PubAck | None],
) -> BaseException | None:
    """Store the acks that arrived; return the last retryable error, raise any other."""
    last: BaseException | None = None
    for future in done:
        if future.cancelled():
            continue
        error = future.exception()
        if error is None:
            acks[futures[future]] = future.result()
        elif isinstance(error, RETRYABLE):
            last = error
        else:
            raise error
    return last
