"""A pull-request driver for the durable: one inbox, credit-based requests, status handling.

nats-py's `fetch()` awaits every message through a timeout wrapper and tops out far below what
one core can decode. This driver subscribes one inbox, sends its own pull requests to
`$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>` and keeps a bounded number of messages
requested, so deliveries flow while earlier batches are being committed. Deliveries come
straight off the wire (see `wire.py`); status messages take nats-py's path, and so does
everything when the fast path is off, each delivery then made into the same `Delivery`.

Requests are bounded in bytes as well as in messages: each carries `max_bytes`, so the bytes
requested plus the bytes held stay within a budget whatever the size of the messages. The
server counts a message as subject + reply + headers + body, and so does `Delivery.size`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from oncelog.platform.wire import Delivery, route

__all__ = ["REQUEST_HEADROOM", "Puller"]

_log = logging.getLogger("oncelog.consumer")
_encoder = msgspec.json.Encoder()

# Status codes that end a pull request: no messages, request expired, and the 409 family
# (max waiting exceeded, leadership change, consumer deleted or paused).
_TERMINAL = frozenset({"404", "408", "409"})
_HEARTBEAT = "100"

# A request must have room for the largest message the server accepts (`max_payload`) plus its
# subject and reply, or the server ends it with 409 and that message would never be delivered.
REQUEST_HEADROOM = 64 * 1024
# A request the server has not ended this long after its expiry is taken to be lost.
_LOST_AFTER = 2.0


class _Request(msgspec.Struct):
    size: int
    deadline: float


class Puller:
    """Keeps up to `window` messages and `max_bytes` requested or held; hands each to `deliver`.

    `max_bytes` is raised to what one request needs for the largest message the server takes.
    With `fast_wire` off, deliveries come through nats-py's subscription callback only.
    `credit` is set when room for requests may have come free: here when a request ends, and
    by whoever holds deliveries when it releases them.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        durable: str,
        deliver: Callable[[Delivery], None],
        *,
        batch: int,
        window: int,
        max_bytes: int,
        expires: float = 5.0,
        fast_wire: bool = True,
    ) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.deliver = deliver
        self.batch = batch
        self.window = window
        self.expires = expires
        self.max_bytes = max_bytes
        # Split over as many requests as the window holds batches, so several stay in flight.
        self.request_bytes = max_bytes // max(1, -(-window // batch))
        self.outstanding = 0
        self.outstanding_bytes = 0
        self.requests: deque[_Request] = deque()
        self.inbox = ""
        self.sub: Subscription | None = None
        self.uninstall: Callable[[], None] = lambda: None
        self.fast_wire = fast_wire
        self.credit = asyncio.Event()

    async def start(self) -> None:
        """Subscribe the delivery inbox."""
        least = self.nc.max_payload + REQUEST_HEADROOM
        if self.request_bytes < least:
            _log.warning(
                "byte budget below one message of the server's max_payload; raised",
                extra={"max_inflight_bytes": self.max_bytes, "raised_to": least},
            )
            self.request_bytes = least
            self.max_bytes = max(self.max_bytes, least)
        self.inbox = self.nc.new_inbox()
        # Deliveries are bounded by our own requests, so the client-side limits only have to
        # be above the window; a slow-consumer drop here would merely mean a redelivery.
        self.sub = await self.nc.subscribe(
            self.inbox, cb=self._on_msg, pending_msgs_limit=self.window * 4, pending_bytes_limit=-1
        )
        if self.fast_wire:
            self.uninstall = await route(self.nc, self.sub, self._on_frame) or self.uninstall

    async def stop(self) -> None:
        """Stop receiving; anything delivered afterwards is redelivered after ack_wait."""
        self.uninstall()
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None

    def _on_frame(self, subject: bytes, reply: bytes, headers: bytes | None, data: bytes) -> bool:
        if not reply:
            # A status message (a request's end, a heartbeat) has no reply subject, while every
            # delivery carries its ack subject: nats-py parses the status and calls _on_msg.
            return False
        # NATS takes any bytes in a subject, UTF-8 or not; the undecodable ones are kept (as
        # surrogates) for the validator to refuse, rather than raised inside the read loop.
        self._take(Delivery(subject.decode(errors="surrogateescape"), reply, headers, data))
        return True

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and not msg.data and (status := headers.get("Status")):
            if status in _TERMINAL:
                self._request_ended(headers)
            elif status != _HEARTBEAT:
                _log.warning("unexpected pull status %s %s", status, headers.get("Description", ""))
            return
        self._take(Delivery.from_msg(msg))

    def _take(self, delivery: Delivery) -> None:
        # A delivery moves a message from requested to held: it frees no credit by itself.
        self.outstanding -= 1
        self.outstanding_bytes -= delivery.size
        self.deliver(delivery)

    def _request_ended(self, headers: dict[str, str]) -> None:
        if self.requests:
            self.requests.popleft()
        pending = headers.get("Nats-Pending-Messages")
        pending_bytes = headers.get("Nats-Pending-Bytes")
        if pending is not None and pending.isdigit():
            self.outstanding -= int(pending)
        if pending_bytes is not None and pending_bytes.isdigit():
            self.outstanding_bytes -= int(pending_bytes)
        if not self.requests:
            # The last request we know of has ended: nothing more is on its way.
            self.outstanding = self.outstanding_bytes = 0
        self.outstanding = max(self.outstanding, 0)
        self.outstanding_bytes = max(self.outstanding_bytes, 0)
        self.credit.set()

    def _expire_lost_requests(self) -> None:
        """Forget requests the server never ended (it restarted, or we reconnected)."""
        now = time.monotonic()
        while self.requests and self.requests[0].deadline + _LOST_AFTER <= now:
            self.requests.popleft()
        if not self.requests:
            self.outstanding = self.outstanding_bytes = 0

    def until_lost(self) -> float | None:
        """Return the seconds until the oldest request is taken to be lost; None without one."""
        if not self.requests:
            return None
        return max(0.0, self.requests[0].deadline + _LOST_AFTER - time.monotonic())

    async def top_up(self, held: int, held_bytes: int) -> None:
        """Request more while requested + held (buffered or committing) fit the window and budget.

        `held` and `held_bytes` count the messages delivered and not yet acked or handed back.
        """
        if self.sub is None or not self.nc.is_connected:
            return
        self._expire_lost_requests()
        while (room := self.window - self.outstanding - held) >= min(self.batch, self.window):
            room_bytes = self.max_bytes - self.outstanding_bytes - held_bytes
            if room_bytes < self.request_bytes:
                return
            size = min(self.batch, room)
            body = _encoder.encode(
                {
                    "batch": size,
                    "max_bytes": self.request_bytes,
                    "expires": int(self.expires * 1e9),
                }
            )
            try:
                await self.nc.publish(self.subject, body, reply=self.inbox)
            except Exception as exc:
                _log.warning("pull request failed: %r", exc)
                return
            self.outstanding += size
            self.outstanding_bytes += self.request_bytes
            self.requests.append(_Request(size, time.monotonic() + self.expires))

    def reset(self) -> None:
        """Forget every outstanding request (after a reconnect the server has none of them)."""
        self.requests.clear()
        self.outstanding = self.outstanding_bytes = 0
