"""The retention service's Prometheus metrics, on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from oncelog.platform.metrics import TopicLabels

__all__ = ["KINDS", "RetentionMetrics"]

# What a run deletes: events, dead letters, duplicates-log rows, and dedup keys past the horizon.
KINDS = ("events", "dead_letters", "duplicates", "dedup_keys")


class RetentionMetrics:
    """Rows expired by kind, the oldest stored event's age per topic, when the job last ran."""

    def __init__(self, registry: CollectorRegistry, topic_label_cap: int = 50) -> None:
        self.topics = TopicLabels(topic_label_cap)
        self.expired = Counter(
            "oncelog_retention_expired",
            "Rows the retention job deleted, by kind",
            ["kind"],
            registry=registry,
        )
        for kind in KINDS:
            self.expired.labels(kind)
        self.runs = Counter(
            "oncelog_retention_runs",
            "Retention runs by result: ok, failed, or standby (another instance held the lock)",
            ["result"],
            registry=registry,
        )
        for result in ("ok", "failed", "standby"):
            self.runs.labels(result)
        self.oldest_age = Gauge(
            "oncelog_retention_oldest_event_age_seconds",
            "Age of the oldest stored event's timestamp per topic, at the last run",
            ["topic"],
            registry=registry,
        )
        self.last_success = Gauge(
            "oncelog_retention_last_success_timestamp_seconds",
            "When this instance last completed a retention run (0: never)",
            registry=registry,
        )
        self.last_duration = Gauge(
            "oncelog_retention_last_run_duration_seconds",
            "How long the last completed retention run took",
            registry=registry,
        )
        self.interval = Gauge(
            "oncelog_retention_interval_seconds",
            "RETENTION_INTERVAL_SECONDS: how often the job runs",
            registry=registry,
        )
        self._labels: set[str] = set()

    def set_oldest(self, ages: dict[str, float]) -> None:
        """Publish each topic's oldest age (the largest of those sharing a label); drop the rest."""
        by_label: dict[str, float] = {}
        for topic, age in ages.items():
            label = self.topics(topic)
            by_label[label] = max(age, by_label.get(label, age))
        for label in self._labels - by_label.keys():
            self.oldest_age.remove(label)
        for label, age in by_label.items():
            self.oldest_age.labels(label).set(age)
        self._labels = set(by_label)
