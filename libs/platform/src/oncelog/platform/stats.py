"""Writes to the statistics that happen outside the consumer: broker-layer duplicates."""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping

from oncelog.platform.db import Conn

__all__ = ["STATS_SHARDS", "add_broker_duplicates", "shard_for"]

# Writers spread each topic's counters over this many rows (see topic_stats), so replicas
# and gateways do not queue on one hot row; readers sum the shards.
STATS_SHARDS = 32

_ADD_BROKER_DUPLICATES = """
INSERT INTO topic_stats AS s (topic, shard, received, broker_duplicates)
SELECT topic, $1, n, n FROM unnest($2::text[], $3::bigint[]) AS t(topic, n)
ORDER BY topic
ON CONFLICT (topic, shard) DO UPDATE SET
    received = s.received + excluded.received,
    broker_duplicates = s.broker_duplicates + excluded.broker_duplicates
"""


def shard_for(identity: str = "") -> int:
    """Return the stats shard of a writer named `identity` (default: this process)."""
    return zlib.crc32((identity or f"{os.uname().nodename}-{os.getpid()}").encode()) % STATS_SHARDS


async def add_broker_duplicates(conn: Conn, counts: Mapping[str, int], shard: int) -> None:
    """Count messages the broker dropped as duplicates (PubAck duplicate=true) per topic."""
    topics = sorted(t for t, n in counts.items() if n)
    if topics:
        await conn.execute(_ADD_BROKER_DUPLICATES, shard, topics, [counts[t] for t in topics])
