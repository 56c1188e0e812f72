"""At-least-once publishing of one message: the same Msg-Id on every retry, within a deadline."""

from __future__ import annotations

import asyncio
import random
import time

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck

__all__ = ["RETRYABLE", "PublishError", "publish_until"]

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
    """The broker did not acknowledge a message before the deadline; the cause is the last error."""


async def publish_until(
    js: JetStreamContext,
    subject: str,
    body: bytes,
    msg_id: str,
    *,
    deadline: float,
    attempt_timeout: float = 2.0,
    backoff_cap: float = 1.0,
) -> PubAck:
    """Publish with `Nats-Msg-Id: msg_id` until a PubAck arrives or `deadline` (monotonic) passes.

    Retries wait a random time under an exponential ceiling (full jitter), so many concurrent
    publishers spread out instead of hammering a recovering broker together.
    """
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PublishError(f"no PubAck for {msg_id!r} after {attempt - 1} attempts")
        try:
            return await js.publish(
                subject,
                body,
                timeout=min(attempt_timeout, remaining),
                headers={"Nats-Msg-Id": msg_id},
            )
        except RETRYABLE as exc:
            delay = random.uniform(0, min(backoff_cap, 0.02 * 2**attempt))
            if time.monotonic() + delay >= deadline:
                raise PublishError(f"no PubAck for {msg_id!r} after {attempt} attempts") from exc
            await asyncio.sleep(delay)
