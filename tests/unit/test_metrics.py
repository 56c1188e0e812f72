"""Metric helpers: bounded topic labels and the bulk histogram's exposition."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from oncelog.platform.metrics import OTHER, BulkHistogram, TopicLabels


def test_topics_beyond_the_cap_share_one_label() -> None:
    """The first N topics keep their names; later ones all become _other."""
    label = TopicLabels(2)
    assert [label(t) for t in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]


def test_bulk_histogram_exposes_cumulative_buckets() -> None:
    """Observations land in the right buckets, cumulatively, with their count and sum."""
    registry = CollectorRegistry()
    hist = BulkHistogram("x_seconds", "test", (0.1, 1.0), registry)
    hist.observe_many([0.05, 0.1, 0.5, 5.0])
    hist.observe(0.2)
    assert registry.get_sample_value("x_seconds_bucket", {"le": "0.1"}) == 2
    assert registry.get_sample_value("x_seconds_bucket", {"le": "1.0"}) == 4
    assert registry.get_sample_value("x_seconds_bucket", {"le": "+Inf"}) == 5
    assert registry.get_sample_value("x_seconds_count") == 5
    assert registry.get_sample_value("x_seconds_sum") == pytest.approx(5.85)
    assert b"# TYPE x_seconds histogram" in generate_latest(registry)
