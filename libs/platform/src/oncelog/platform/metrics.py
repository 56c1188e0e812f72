"""Metric helpers shared by the services: bounded topic labels and a bulk-friendly histogram."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["OTHER", "BulkHistogram", "TopicLabels"]

OTHER = "_other"


class TopicLabels:
    """Maps topics to label values: the first `cap` topics seen keep their name, the rest share
    `_other`, so a flood of topics cannot blow up the number of series."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._known: dict[str, str] = {}

    def __call__(self, topic: str) -> str:
        """Return the label value for `topic`."""
        label = self._known.get(topic)
        if label is None:
            label = topic if len(self._known) < self.cap else OTHER
            if label != OTHER:
                self._known[topic] = label
        return label


class BulkHistogram(Collector):
    """A histogram that takes a batch of observations in one call.

    prometheus_client's Histogram takes a lock per observation; at tens of thousands of events
    per second that is a measurable share of a core, so batches are bucketed here with bisect.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        """Add every value of `values`."""
        counts = [0] * len(self._counts)
        total = 0.0
        find = bisect.bisect_left
        bounds = self.bounds
        for value in values:
            counts[find(bounds, value)] += 1
            total += value
        with self._lock:
            for i, n in enumerate(counts):
                self._counts[i] += n
            self._sum += total

    def observe(self, value: float) -> None:
        """Add one value."""
        self.observe_many((value,))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """Yield the histogram in Prometheus' cumulative form."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)

    def describe(self) -> Iterator[HistogramMetricFamily]:
        """Describe the metric without values, for registration."""
        yield HistogramMetricFamily(self.name, self.documentation)
