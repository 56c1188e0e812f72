"""The HTTP API's settings, read once from the environment (see oncelog.platform.settings)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from oncelog.platform.settings import CommonSettings, Port, Positive, PositiveFloat

__all__ = ["ApiSettings"]


class ApiSettings(CommonSettings, frozen=True, kw_only=True):
    """Settings of the HTTP API."""

    # 0 (not CommonSettings' 1): the pool connects on first use, so the API starts and answers
    # 503 naming PostgreSQL while the database is away, instead of failing to start.
    db_pool_min: Annotated[int, msgspec.Meta(ge=0)] = 0
    api_host: str = "127.0.0.1"
    api_port: Port = 8080
    max_body_bytes: Positive = 1024 * 1024
    publish_timeout_seconds: PositiveFloat = 5.0
    # Publishes one request keeps in flight at once; more would only queue inside the client.
    publish_inflight: Positive = 256
    # Comma-separated keys accepted in X-API-Key; when a list is empty its routes are open.
    api_keys_publish: str = ""
    api_keys_read: str = ""
    # Token bucket per API key (or client address when there is none); 0 turns it off. Off by
    # default, as in the FastAPI aggregators this replaces, whose clients never expect a 429;
    # compose.yaml turns it on for the deployment (see docs/api.md#protection).
    rate_limit_per_second: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    rate_limit_burst: Positive = 200
    # Payload text one page of GET /events may hold; the rest comes on the next page.
    events_page_bytes: Positive = 8 * 1024 * 1024
    # The live tail (GET /events/stream): open streams per process; events and bytes of frames
    # buffered per stream before a slow one reads on from the store (streams taking the same
    # rows share them, so this bounds the worst case); the poll behind NOTIFY; keep-alives.
    tail_max_streams: Positive = 100
    tail_buffer: Positive = 10_000
    tail_buffer_bytes: Positive = 4 * 1024 * 1024
    tail_poll_seconds: PositiveFloat = 1.0
    tail_keepalive_seconds: PositiveFloat = 15.0
