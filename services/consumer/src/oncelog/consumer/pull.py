"""A pull-request driver for the durable: one inbox, credit-based requests, status handling.

nats-py's `fetch()` awaits every message through a timeout wrapper and tops out far below what
one core can decode. This driver subscribes one inbox, sends its own pull requests to
`$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>` and keeps a bounded number of messages
requested, so deliveries flow while earlier batches are being committed. Deliveries come
straight off the wire (see `wire.py`); status messages take nats-py's path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from oncelog.platform.wire import Delivered, Delivery, install

__all__ = ["Puller"]

_log = logging.getLogger("oncelog.consumer")
_encoder = msgspec.json.Encoder()

# Status codes that end a pull request: no messages, request expired, and the 409 family
# (max waiting exceeded, leadership change, consumer deleted or paused).
_TERMINAL = frozenset({"404", "408", "409"})
_HEARTBEAT = "100"


class _Request(msgspec.Struct):
    size: int
    deadline: float


class Puller:
    """Keeps up to `window` messages requested and hands each delivered message to `deliver`."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        durable: str,
        deliver: Callable[[Delivered], None],
        *,
        batch: int,
        window: int,
        expires: float = 5.0,
    ) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.deliver = deliver
        self.batch = batch
        self.window = window
        self.expires = expires
        self.outstanding = 0
        self.requests: deque[_Request] = deque()
        self.inbox = ""
        self.sub: Subscription | None = None
        self.uninstall: Callable[[], None] = lambda: None

    async def start(self) -> None:
        """Subscribe the delivery inbox."""
        self.inbox = self.nc.new_inbox()
        # Deliveries are bounded by our own requests, so the client-side limits only have to
        # be above the window; a slow-consumer drop here would merely mean a redelivery.
        self.sub = await self.nc.subscribe(
            self.inbox, cb=self._on_msg, pending_msgs_limit=self.window * 4, pending_bytes_limit=-1
        )
        self.uninstall = install(self.nc, self.sub._id, self._on_frame)

    async def stop(self) -> None:
        """Stop receiving; anything delivered afterwards is redelivered after ack_wait."""
        self.uninstall()
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None

    def _on_frame(self, subject: bytes, reply: bytes, headers: bytes | None, data: bytes) -> bool:
        if headers is not None and not data:
            return False  # a status message: nats-py parses it and calls _on_msg
        self.outstanding -= 1
        self.deliver(Delivery(subject.decode(), reply, headers, data))
        return True

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and not msg.data and (status := headers.get("Status")):
            if status in _TERMINAL:
                self._request_ended(headers)
            elif status != _HEARTBEAT:
                _log.warning("unexpected pull status %s %s", status, headers.get("Description", ""))
            return
        self.outstanding -= 1
        self.deliver(msg)

    def _request_ended(self, headers: dict[str, str]) -> None:
        if self.requests:
            self.requests.popleft()
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None and pending.isdigit():
            self.outstanding -= int(pending)
        elif not self.requests:
            self.outstanding = 0
        self.outstanding = max(self.outstanding, 0)

    def _expire_lost_requests(self) -> None:
        """Forget requests the server never ended (it restarted, or we reconnected)."""
        now = time.monotonic()
        while self.requests and self.requests[0].deadline + 2.0 < now:
            self.requests.popleft()
        if not self.requests:
            self.outstanding = 0

    async def top_up(self, held: int) -> None:
        """Request more messages while requested + `held` (buffered or committing) < window."""
        if self.sub is None or not self.nc.is_connected:
            return
        self._expire_lost_requests()
        while (room := self.window - self.outstanding - held) >= min(self.batch, self.window):
            size = min(self.batch, room)
            body = _encoder.encode({"batch": size, "expires": int(self.expires * 1e9)})
            try:
                await self.nc.publish(self.subject, body, reply=self.inbox)
            except Exception as exc:
                _log.warning("pull request failed: %r", exc)
                return
            self.outstanding += size
            self.requests.append(_Request(size, time.monotonic() + self.expires))

    def reset(self) -> None:
        """Forget every outstanding request (after a reconnect the server has none of them)."""
        self.requests.clear()
        self.outstanding = 0
