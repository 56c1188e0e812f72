"""The publisher service's settings, read once from the environment (see oncelog.platform.settings)."""

from __future__ import annotations

from oncelog.platform.settings import CommonSettings

__all__ = ["PublisherSettings"]


class PublisherSettings(CommonSettings, frozen=True, kw_only=True):
    """Settings of the publisher service (the CLI takes the rest as flags)."""

    record_broker_duplicates: bool = True
