"""The retention service's settings, read once from the environment (see oncelog.platform.settings)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import msgspec

from oncelog.platform.settings import CommonSettings, Port, Positive
from oncelog.retention.policy import MAX_DAYS, Rule, parse_rules

__all__ = ["OPTIONAL", "Days", "RetentionSettings", "environ"]

# Unset means forever; a set value is a whole number of days, 1 to a century.
Days = Annotated[int, msgspec.Meta(ge=1, le=MAX_DAYS)]


# Settings whose empty value means "not set" (forever, or no rules), so that a compose file can
# pass `RETENTION_DAYS: ${RETENTION_DAYS:-}` through whether or not `.env` sets it.
OPTIONAL = (
    "RETENTION_DAYS",
    "RETENTION_TOPICS",
    "DEDUP_HORIZON_DAYS",
    "DEAD_LETTER_RETENTION_DAYS",
    "DUPLICATES_RETENTION_DAYS",
)


def environ(env: Mapping[str, str]) -> dict[str, str]:
    """Return `env` without the optional retention settings that are set to the empty string."""
    return {k: v for k, v in env.items() if v or k not in OPTIONAL}


class RetentionSettings(CommonSettings, frozen=True, kw_only=True):
    """Settings of the retention service."""

    # Events older than this (by their timestamp) expire; unset keeps them forever.
    retention_days: Days | None = None
    # Per topic pattern, first match wins: `auth.> = 90d, debug.> = 3d, audit.> = forever`.
    retention_topics: str = ""
    # How long the key of an expired event keeps a replay a duplicate, counted from when the
    # event was stored; at least the longest retention. Unset: forever.
    dedup_horizon_days: Days | None = None
    dead_letter_retention_days: Days | None = None
    duplicates_retention_days: Days | None = None
    retention_interval_seconds: Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)] = 3600.0
    # Rows per transaction: each holds its locks only for the rows it deletes.
    retention_batch_size: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 5000
    # A pause between two batches, to leave the store to ingestion on a small machine.
    retention_pause_seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.0
    # The share of time the job works while it has rows to expire: after a batch that took t
    # seconds it rests t * (1 / duty - 1). 1 works without rest.
    retention_duty_cycle: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.25
    metrics_port: Port = 9470
    metrics_host: str = "127.0.0.1"
    # Topics beyond this many share the metric label value "_other".
    topic_label_cap: Positive = 50

    def __post_init__(self) -> None:
        longest = max((d for d in self.retention_days_all() if d is not None), default=None)
        if (
            self.dedup_horizon_days is not None
            and longest is not None
            and self.dedup_horizon_days < longest
        ):
            raise ValueError(
                f"DEDUP_HORIZON_DAYS={self.dedup_horizon_days} is shorter than the longest"
                f" retention ({longest} days): a replay of an event expired after it would be"
                " stored again"
            )

    def rules(self) -> tuple[Rule, ...]:
        """Return the per-pattern rules of RETENTION_TOPICS, in the order they apply."""
        return parse_rules(self.retention_topics, "RETENTION_TOPICS")

    def retention_days_all(self) -> list[int | None]:
        """Return every retention in force: the default's and each rule's (None: forever)."""
        return [self.retention_days, *(rule.days for rule in self.rules())]
