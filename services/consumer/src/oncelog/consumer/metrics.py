"""The consumer's Prometheus metrics, registered on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from oncelog.events import REJECTION_CODES
from oncelog.platform.metrics import OTHER, BulkHistogram, TopicLabels

__all__ = ["ConsumerMetrics"]

# Publish -> committed latency, in seconds; the target is p99 under 50 ms at steady load.
LATENCY_BUCKETS = (
    0.002,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
# How old a dropped duplicate's original is: compare with the broker's duplicate window.
AGE_BUCKETS = (1, 10, 30, 60, 120, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)


class _Topics(TopicLabels):
    """Topic labels that start a new topic's store-duplicate series at 0 with its first batch.

    A topic's duplicates mostly arrive in later batches than its originals (retries come
    after), so by then Prometheus has scraped the 0 and sees the first duplicate as an
    increase instead of a series born at its first count.
    """

    def __init__(self, cap: int, duplicates: Counter) -> None:
        super().__init__(cap)
        self._duplicates = duplicates

    def __call__(self, topic: str) -> str:
        """Return the label value for `topic`."""
        label = self._known.get(topic)
        if label is None:
            label = super().__call__(topic)
            if label != OTHER:  # _other is exported from the start
                self._duplicates.labels("store", label)
        return label


class ConsumerMetrics:
    """What one consumer replica exports."""

    def __init__(self, registry: CollectorRegistry, topic_cap: int = 50) -> None:
        self.received = Counter(
            "oncelog_events_received_total",
            "Messages delivered and committed by this replica, first deliveries and redeliveries.",
            ["topic"],
            registry=registry,
        )
        self.stored = Counter(
            "oncelog_events_stored_total",
            "Events committed to the store.",
            ["topic"],
            registry=registry,
        )
        self.duplicates = Counter(
            "oncelog_duplicates_total",
            "Duplicates dropped, by the layer that dropped them.",
            ["layer", "topic"],
            registry=registry,
        )
        self.topic: TopicLabels = _Topics(topic_cap, self.duplicates)
        self.conflicting = Counter(
            "oncelog_conflicting_duplicates_total",
            "Dropped duplicates whose payload differed from the stored copy (kept in duplicates).",
            registry=registry,
        )
        self.dead = Counter(
            "oncelog_dead_letters_total",
            "Messages written to dead_letters, by reason.",
            ["reason"],
            registry=registry,
        )
        self.redelivered = Counter(
            "oncelog_redeliveries_total",
            "Messages JetStream delivered more than once.",
            registry=registry,
        )
        self.batches = Counter(
            "oncelog_batches_committed_total", "Batches committed and acked.", registry=registry
        )
        self.commit_failures = Counter(
            "oncelog_commit_failures_total",
            "Batch transactions that failed and were retried.",
            registry=registry,
        )
        self.stuck_batches = Gauge(
            "oncelog_consumer_stuck_batches",
            "Batches whose commit has failed STUCK_AFTER times or more in a row and is still"
            " being retried.",
            registry=registry,
        )
        self.isolated = Counter(
            "oncelog_consumer_isolated_batches_total",
            "Batches the store refused as a whole and that were split to isolate the culprits.",
            registry=registry,
        )
        self.batch_size = Histogram(
            "oncelog_batch_size_messages",
            "Messages per committed batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "oncelog_commit_duration_seconds",
            "Time to store one batch, from BEGIN to COMMIT.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.latency = BulkHistogram(
            "oncelog_end_to_end_latency_seconds",
            "Time from the broker receiving a message to its batch being committed.",
            LATENCY_BUCKETS,
            registry,
        )
        self.duplicate_age = BulkHistogram(
            "oncelog_duplicate_age_seconds",
            "Time between the stored copy's arrival and a dropped duplicate's arrival.",
            AGE_BUCKETS,
            registry,
        )
        self.last_commit = Gauge(
            "oncelog_last_commit_timestamp_seconds",
            "Unix time of this replica's last committed batch.",
            registry=registry,
        )
        self.pending = Gauge(
            "oncelog_consumer_pending_messages",
            "Messages in the stream not yet delivered to the durable consumer (lag).",
            registry=registry,
        )
        self.ack_pending = Gauge(
            "oncelog_consumer_ack_pending_messages",
            "Messages delivered but not yet acknowledged.",
            registry=registry,
        )
        self.redelivered_pending = Gauge(
            "oncelog_consumer_redelivered_messages",
            "Messages the durable is currently redelivering.",
            registry=registry,
        )
        self.held_bytes = Gauge(
            "oncelog_consumer_held_bytes",
            "Bytes of messages this replica holds: delivered, not yet acked or handed back.",
            registry=registry,
        )
        self.stream_messages = Gauge(
            "oncelog_stream_messages", "Messages held by the stream.", registry=registry
        )
        self.stream_bytes = Gauge(
            "oncelog_stream_bytes", "Bytes held by the stream.", registry=registry
        )
        self.stream_max_bytes = Gauge(
            "oncelog_stream_max_bytes",
            "The stream's byte limit; at it, publishes are refused.",
            registry=registry,
        )
        self.dependency_up = Gauge(
            "oncelog_dependency_up",
            "1 when the dependency answered the last check, else 0.",
            ["dependency"],
            registry=registry,
        )
        self.pool_connections = Gauge(
            "oncelog_db_pool_connections",
            "PostgreSQL pool connections by state.",
            ["state"],
            registry=registry,
        )
        # A series born at 1 has no earlier sample, so increase() and rate() see nothing of its
        # first step: every label value known in advance is exported at 0 from the start. The
        # dead-letter reasons are a closed set; topics are not: of them only the shared _other
        # is known from the start, and each other topic's series starts with its first batch.
        for code in REJECTION_CODES:
            self.dead.labels(code)
        self.duplicates.labels("store", OTHER)
