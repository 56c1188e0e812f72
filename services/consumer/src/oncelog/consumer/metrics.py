"""The consumer's Prometheus metrics, registered on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ConsumerMetrics"]


class ConsumerMetrics:
    """Counters and histograms one consumer replica exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "oncelog_consumer_messages_total",
            "Messages delivered to this replica, redeliveries included.",
            registry=registry,
        )
        self.stored = Counter(
            "oncelog_events_stored_total", "Events committed to the store.", registry=registry
        )
        self.duplicates = Counter(
            "oncelog_duplicates_total",
            "Duplicates dropped, by the layer that dropped them.",
            ["layer"],
            registry=registry,
        )
        self.conflicting = Counter(
            "oncelog_conflicting_duplicates_total",
            "Dropped duplicates whose payload differed from the stored copy.",
            registry=registry,
        )
        self.dead = Counter(
            "oncelog_dead_letters_total", "Messages written to dead_letters.", registry=registry
        )
        self.redelivered = Counter(
            "oncelog_redeliveries_total",
            "Messages delivered more than once by JetStream.",
            registry=registry,
        )
        self.commit_failures = Counter(
            "oncelog_commit_failures_total",
            "Batches whose transaction failed and was retried.",
            registry=registry,
        )
        self.batch_size = Histogram(
            "oncelog_batch_size",
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
        self.duplicate_age = Histogram(
            "oncelog_duplicate_age_seconds",
            "Time between the stored copy's arrival and a dropped duplicate's.",
            buckets=(1, 10, 60, 120, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400),
            registry=registry,
        )
        self.pending = Gauge(
            "oncelog_consumer_pending_messages",
            "Messages in the stream not yet delivered to the durable consumer.",
            registry=registry,
        )
        self.ack_pending = Gauge(
            "oncelog_consumer_ack_pending_messages",
            "Messages delivered but not yet acknowledged.",
            registry=registry,
        )
