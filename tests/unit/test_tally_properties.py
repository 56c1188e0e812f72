"""Properties of the tally decoder over any bytes (Hypothesis): refuse or return a valid tally."""

from __future__ import annotations

import json
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oncelog.api.tally import MAX_TALLY_BYTES, Tally, decode_tally
from oncelog.events import topic_error
from strategies import HOSTILE_TOPIC, NUMBER, TOPIC, Literal, dumps

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

COUNT = st.one_of(st.integers(min_value=-(2**65), max_value=2**65), NUMBER.map(Literal))
ANY_JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


def _holds(result: Tally | str) -> None:
    """A result is a reason, or a tally that topic_stats may take as it is."""
    if isinstance(result, str):
        assert result
        return
    assert result.counts
    for topic, n in result.counts.items():
        assert topic_error(topic) is None
        assert isinstance(n, int)
        assert 1 <= n < 2**31


@PROPERTY
@given(st.binary(max_size=300))
def test_any_bytes_give_a_reason_or_a_valid_tally(data: bytes) -> None:
    _holds(decode_tally(data))


@PROPERTY
@given(
    tally_id=st.one_of(st.uuids().map(str), st.text(max_size=40), ANY_JSON),
    counts=st.dictionaries(st.one_of(TOPIC, HOSTILE_TOPIC), COUNT, max_size=5) | ANY_JSON,
    extra=st.dictionaries(st.sampled_from(["shard", "Counts", "id "]), ANY_JSON, max_size=1),
)
def test_hostile_tallies_give_a_reason_or_a_valid_tally(
    tally_id: Any, counts: Any, extra: dict[str, Any]
) -> None:
    body = dumps({"id": tally_id, "counts": counts, **extra})
    _holds(decode_tally(body.encode("utf-8", "surrogatepass")))


@PROPERTY
@given(counts=st.dictionaries(TOPIC, st.integers(min_value=1, max_value=2**31 - 1), min_size=1))
def test_what_a_gateway_publishes_comes_back_unchanged(counts: dict[str, int]) -> None:
    tally_id = uuid.uuid4()
    result = decode_tally(json.dumps({"id": str(tally_id), "counts": counts}).encode())
    assert result == Tally(id=tally_id, counts=counts)


def test_a_tally_over_the_size_limit_is_refused_unread() -> None:
    body = json.dumps({"id": str(uuid.uuid4()), "counts": {"a": 1}, "pad": "x" * MAX_TALLY_BYTES})
    assert "bytes" in str(decode_tally(body.encode()))


def test_counts_out_of_range_are_refused() -> None:
    for n in (0, -1, 2**31, 1.5, True, "1"):
        body = json.dumps({"id": str(uuid.uuid4()), "counts": {"a": n}}).encode()
        assert isinstance(decode_tally(body), str), n
