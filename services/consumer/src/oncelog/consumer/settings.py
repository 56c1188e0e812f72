"""The consumer replica's settings, read once from the environment (see oncelog.platform.settings)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from oncelog.platform.settings import CommonSettings, Port, Positive, PositiveFloat

__all__ = ["ConsumerSettings"]


class ConsumerSettings(CommonSettings, frozen=True, kw_only=True):
    """Settings of one consumer replica."""

    batch_size: Positive = 4000
    # Transactions in flight at once per replica; each commits a batch while others fill.
    commit_workers: Annotated[int, msgspec.Meta(ge=1, le=16)] = 2
    # Bytes of messages one replica has requested, buffered or committing at once; raised to
    # what one message of the server's max_payload needs if set lower.
    max_inflight_bytes: Positive = 64 * 1024 * 1024
    # Lifetime of one pull request; the consumer re-issues them continuously.
    fetch_timeout_seconds: PositiveFloat = 2.0
    metrics_port: Port = 9464
    metrics_host: str = "127.0.0.1"
    # Topics beyond this many share the metric label value "_other".
    topic_label_cap: Positive = 50
    consumer_id: str = ""
    retry_max_seconds: PositiveFloat = 30.0
    max_event_bytes: Positive = 1024 * 1024
    # Refusing fsync=off protects acknowledged events; only a throwaway setup may opt out.
    allow_unsafe_postgres: bool = False
