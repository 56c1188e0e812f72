"""The per-client token bucket, on a clock moved by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oncelog.api.protect import Quota, TokenBuckets


class Clock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    """Return a clock standing still until the test moves it."""
    return Clock()


def test_a_new_client_spends_its_whole_burst_at_once(clock: Clock) -> None:
    """A client never seen before gets `burst` requests in the same instant, and no more."""
    buckets = TokenBuckets(rate=1.0, burst=3, clock=clock)
    assert [buckets.take("a").wait for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]


def test_tokens_come_back_at_the_rate(clock: Clock) -> None:
    """Once the burst is spent, one token returns every 1/rate seconds."""
    buckets = TokenBuckets(rate=4.0, burst=2, clock=clock)
    buckets.take("a")
    buckets.take("a")
    assert buckets.take("a").wait == pytest.approx(0.25)
    clock.advance(0.25)
    assert buckets.take("a").wait == 0.0
    assert buckets.take("a").wait == pytest.approx(0.25)
    clock.advance(0.5)
    assert [buckets.take("a").wait for _ in range(3)] == [0.0, 0.0, pytest.approx(0.25)]


def test_the_wait_is_exactly_how_long_the_next_token_takes(clock: Clock) -> None:
    """The seconds a refusal names are enough and not more: a moment earlier is still refused."""
    buckets = TokenBuckets(rate=0.5, burst=1, clock=clock)
    buckets.take("a")
    wait = buckets.take("a").wait
    assert wait == pytest.approx(2.0)
    clock.advance(wait - 0.01)
    assert buckets.take("a").wait > 0
    clock.advance(0.01)
    assert buckets.take("a").wait == 0.0


def test_a_refusal_costs_no_token(clock: Clock) -> None:
    """Requests refused while over the rate do not push the next token further away."""
    buckets = TokenBuckets(rate=1.0, burst=1, clock=clock)
    buckets.take("a")
    assert [buckets.take("a").wait for _ in range(5)] == [1.0] * 5
    clock.advance(1.0)
    assert buckets.take("a").wait == 0.0


def test_a_long_pause_refills_only_up_to_the_burst(clock: Clock) -> None:
    """However long a client stays away, it comes back with at most `burst` tokens."""
    buckets = TokenBuckets(rate=10.0, burst=3, clock=clock)
    buckets.take("a")
    clock.advance(3600)
    assert [buckets.take("a").wait for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.1)]


def test_each_client_has_its_own_bucket(clock: Clock) -> None:
    """One client spending its burst leaves every other client's bucket full."""
    buckets = TokenBuckets(rate=1.0, burst=2, clock=clock)
    assert [buckets.take("key:a").wait for _ in range(3)] == [0.0, 0.0, 1.0]
    assert [buckets.take("key:b").wait for _ in range(3)] == [0.0, 0.0, 1.0]
    assert buckets.take("addr:127.0.0.1").wait == 0.0
    assert buckets.take("key:a").wait == 1.0


def test_the_least_recently_seen_client_is_forgotten_first(clock: Clock) -> None:
    """Past `max_clients`, the client seen longest ago starts over with a full bucket, while a
    client seen since keeps its spent one."""
    buckets = TokenBuckets(rate=1.0, burst=1, max_clients=2, clock=clock)
    buckets.take("a")
    buckets.take("b")
    assert buckets.take("a").wait == 1.0  # a is now the most recently seen, b the least
    buckets.take("c")
    assert buckets.take("a").wait == 1.0
    assert buckets.take("b").wait == 0.0


def test_the_quota_counts_what_is_left_and_when_the_bucket_is_full(clock: Clock) -> None:
    """Each take reports the whole tokens left and the seconds until the bucket is full again,
    and its RateLimit headers say the same, rounded up to whole seconds."""
    buckets = TokenBuckets(rate=2.0, burst=4, clock=clock)
    assert buckets.take("a") == Quota(0.0, 3, 0.5)
    assert buckets.take("a") == Quota(0.0, 2, 1.0)
    clock.advance(0.25)
    quota = buckets.take("a")
    assert quota.remaining == 1
    assert quota.reset == pytest.approx(1.25)
    assert quota.headers(4) == {
        "RateLimit-Limit": "4",
        "RateLimit-Remaining": "1",
        "RateLimit-Reset": "2",
    }
    buckets.take("a")
    refused = buckets.take("a")
    assert refused.wait > 0
    assert refused.remaining == 0
    assert refused.reset >= refused.wait


@given(
    rate=st.floats(0.01, 1000),
    burst=st.integers(1, 1000),
    steps=st.lists(st.floats(0, 10), max_size=30),
)
def test_the_quota_is_always_within_the_bucket(rate: float, burst: int, steps: list[float]) -> None:
    """Whatever the timing, remaining is between 0 and burst - 1, is 0 whenever a request is
    refused, and the bucket is full again no later than `reset` seconds on."""
    clock = Clock()
    buckets = TokenBuckets(rate=rate, burst=burst, clock=clock)
    for step in steps:
        clock.advance(step)
        quota = buckets.take("a")
        assert 0 <= quota.remaining <= burst - 1
        assert quota.wait == 0 or quota.remaining == 0
        assert 0 <= quota.wait <= quota.reset <= burst / rate + 1e-9
