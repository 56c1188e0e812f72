"""Metric helpers (bounded topic labels, the bulk histogram's exposition) and the label values
every service exports before their first event."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from oncelog.api.metrics import ApiMetrics
from oncelog.consumer.metrics import ConsumerMetrics
from oncelog.events import REJECTION_CODES
from oncelog.platform.metrics import OTHER, BulkHistogram, TopicLabels

ROOT = Path(__file__).resolve().parents[2]


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


def _outcomes(expr: ast.expr) -> set[str]:
    """Return the string literals an expression can evaluate to (through `a if test else b`)."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value}
    if isinstance(expr, ast.IfExp):
        return _outcomes(expr.body) | _outcomes(expr.orelse)
    return set()


def _emitted_rejection_codes() -> set[str]:
    """Return every code literal the sources give a Rejected or a Problem (a dead letter's reason)."""
    found: set[str] = set()
    # Rejected(reason, code) and Problem(field, message, code): where the code argument sits.
    position = {"Rejected": 1, "Problem": 2}
    for path in [*(ROOT / "libs").rglob("*.py"), *(ROOT / "services").rglob("*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        # A code chosen into a variable first (`code = "a" if ... else "b"`) counts too.
        assigned: dict[str, list[ast.expr]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        assigned.setdefault(target.id, []).append(node.value)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            index = position.get(node.func.id)
            if index is None:
                continue
            args = [kw.value for kw in node.keywords if kw.arg == "code"]
            args += node.args[index : index + 1]
            for arg in args:
                values = assigned.get(arg.id, []) if isinstance(arg, ast.Name) else [arg]
                for value in values:
                    found |= _outcomes(value)
    return found


def test_rejection_codes_list_every_code_the_sources_emit() -> None:
    """REJECTION_CODES is the one list of dead-letter reasons: no code is emitted outside it."""
    emitted = _emitted_rejection_codes()
    assert {"bad_subject", "not_json", "bad_timestamp", "store_refused"} <= emitted
    assert emitted == set(REJECTION_CODES)


def test_consumer_exports_every_known_label_value_at_zero() -> None:
    """Every dead-letter reason and the store layer exist at 0 before anything happens, so the
    first occurrence after a restart is an increase that rate() and increase() can see."""
    registry = CollectorRegistry()
    ConsumerMetrics(registry)
    for code in REJECTION_CODES:
        assert registry.get_sample_value("oncelog_dead_letters_total", {"reason": code}) == 0
    labels = {"layer": "store", "topic": OTHER}
    assert registry.get_sample_value("oncelog_duplicates_total", labels) == 0
    assert registry.get_sample_value("oncelog_conflicting_duplicates_total") == 0


def test_a_topics_store_duplicates_start_at_zero_with_its_first_label() -> None:
    """A topic's store-duplicate series exists at 0 from its first batch; topics beyond the cap
    share the _other series."""
    registry = CollectorRegistry()
    metrics = ConsumerMetrics(registry, topic_cap=1)
    assert [metrics.topic(t) for t in ("a", "b", "a")] == ["a", OTHER, "a"]
    for topic in ("a", OTHER):
        labels = {"layer": "store", "topic": topic}
        assert registry.get_sample_value("oncelog_duplicates_total", labels) == 0
    labels = {"layer": "store", "topic": "b"}
    assert registry.get_sample_value("oncelog_duplicates_total", labels) is None


def test_api_exports_the_broker_layer_at_zero() -> None:
    """The gateway's broker-layer duplicates exist at 0 before the first one."""
    registry = CollectorRegistry()
    ApiMetrics(registry)
    assert registry.get_sample_value("oncelog_duplicates_total", {"layer": "broker"}) == 0
