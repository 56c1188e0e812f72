"""The API's SQL builders and its page cursors, without a database."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from oncelog.api.queries import (
    Cursor,
    CursorError,
    DeadCursor,
    decode_cursor,
    encode_cursor,
    events_query,
    topic_filter,
)

T1 = datetime(2026, 1, 1, tzinfo=UTC)
T2 = datetime(2026, 1, 2, tzinfo=UTC)
AFTER = Cursor(datetime(2026, 1, 1, 12, 0, 0, 500, tzinfo=UTC), "auth.prod", "e-7")
COLUMNS = "SELECT topic, event_id, ts, source, payload FROM events"


def _matches(pattern: str, topic: str) -> bool:
    """Return whether `topic` satisfies the condition topic_filter makes for `pattern`."""
    condition, params = topic_filter(pattern, 1)
    if condition == "topic = $1":
        return bool(topic == params[0])
    like, regex = params
    # LIKE with only a trailing % is a prefix test once its escapes are undone.
    assert like.endswith("%")
    assert "%" not in like[:-1].replace("\\%", "")
    prefix = re.sub(r"\\(.)", r"\1", like[:-1])
    return topic.startswith(prefix) and re.search(regex, topic) is not None


def test_an_exact_topic_is_one_equality() -> None:
    """A topic without wildcards is compared for equality, as the placeholder numbered `arg`."""
    assert topic_filter("auth.prod", 1) == ("topic = $1", ["auth.prod"])
    assert topic_filter("auth", 4) == ("topic = $4", ["auth"])


def test_a_wildcard_is_a_prefix_and_a_regex() -> None:
    """A pattern becomes a LIKE on the tokens before its first wildcard and an anchored regex,
    numbered from `arg`."""
    assert topic_filter("auth.*", 3) == (
        "topic LIKE $3 AND topic ~ $4",
        ["auth.%", r"^auth\.[^.]+$"],
    )
    assert topic_filter("auth.>", 1) == ("topic LIKE $1 AND topic ~ $2", ["auth.%", r"^auth\..+$"])
    assert topic_filter("*.prod.login", 1)[1] == ["%", r"^[^.]+\.prod\.login$"]
    assert topic_filter(">", 1)[1] == ["%", "^.+$"]


def test_like_metacharacters_in_a_topic_are_escaped() -> None:
    """An underscore in a topic is literal in the LIKE prefix, not LIKE's any-one-character."""
    assert topic_filter("a_b.*", 1)[1][0] == r"a\_b.%"
    assert not _matches("a_b.*", "axb.c")
    assert _matches("a_b.*", "a_b.c")


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("auth.*", ["auth.prod", "auth.dev"], ["auth", "auth.prod.login", "authx.prod"]),
        ("auth.>", ["auth.prod", "auth.prod.login"], ["auth", "authx.prod", "xauth.prod"]),
        ("*.prod", ["auth.prod", "billing.prod"], ["prod", "auth.prod.x", "a.b.prod"]),
        ("a.*.c", ["a.b.c", "a.x-y.c"], ["a.c", "a.b.b.c", "a.b.cd"]),
        (">", ["a", "a.b.c"], []),
        ("auth.prod", ["auth.prod"], ["auth.prod.login", "auth"]),
    ],
)
def test_patterns_match_as_nats_wildcards(
    pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    """`*` stands for exactly one token and `>` for one or more, as in NATS subjects."""
    assert [t for t in matching if not _matches(pattern, t)] == []
    assert [t for t in not_matching if _matches(pattern, t)] == []


def test_a_plain_page_is_ordered_and_limited() -> None:
    """Without filters a page is every event in (timestamp, topic, event_id) order, limit bound."""
    sql, args = events_query(
        topic=None, since=None, until=None, after=None, descending=False, limit=101
    )
    assert sql == f"{COLUMNS} ORDER BY ts ASC, topic ASC, event_id ASC LIMIT $1"
    assert args == [101]


def test_filters_number_their_placeholders_in_order() -> None:
    """Topic, time range, cursor and limit each take the next placeholders, in that order."""
    sql, args = events_query(
        topic="auth.*", since=T1, until=T2, after=AFTER, descending=False, limit=10
    )
    assert sql == (
        f"{COLUMNS} WHERE topic LIKE $1 AND topic ~ $2 AND ts >= $3 AND ts < $4"
        " AND (ts, topic, event_id) > ($5, $6, $7)"
        " ORDER BY ts ASC, topic ASC, event_id ASC LIMIT $8"
    )
    assert args == ["auth.%", r"^auth\.[^.]+$", T1, T2, AFTER.ts, "auth.prod", "e-7", 10]


def test_a_cursor_under_an_exact_topic_compares_two_columns() -> None:
    """With the topic fixed the cursor is (ts, event_id), which the topic's index can seek."""
    sql, args = events_query(
        topic="auth.prod", since=None, until=None, after=AFTER, descending=False, limit=5
    )
    assert "WHERE topic = $1 AND (ts, event_id) > ($2, $3) ORDER BY" in sql
    assert args == ["auth.prod", AFTER.ts, "e-7", 5]


def test_descending_pages_reverse_the_order_and_the_cursor() -> None:
    """order=desc sorts every key descending and continues below the cursor, not above."""
    sql, args = events_query(
        topic=None, since=None, until=None, after=AFTER, descending=True, limit=5
    )
    assert sql == (
        f"{COLUMNS} WHERE (ts, topic, event_id) < ($1, $2, $3)"
        " ORDER BY ts DESC, topic DESC, event_id DESC LIMIT $4"
    )
    assert args == [AFTER.ts, "auth.prod", "e-7", 5]


@pytest.mark.parametrize("topic", [None, "auth.prod", "auth.>"])
@pytest.mark.parametrize("since", [None, T1])
@pytest.mark.parametrize("until", [None, T2])
@pytest.mark.parametrize("after", [None, AFTER])
def test_every_placeholder_has_exactly_one_argument(
    topic: str | None, since: datetime | None, until: datetime | None, after: Cursor | None
) -> None:
    """Whatever the combination of filters, the SQL uses $1..$n once each for n arguments."""
    sql, args = events_query(
        topic=topic, since=since, until=until, after=after, descending=False, limit=3
    )
    used = [int(n) for n in re.findall(r"\$(\d+)", sql)]
    assert sorted(used) == list(range(1, len(args) + 1))
    assert args[-1] == 3


def test_a_cursor_comes_back_as_it_was_made() -> None:
    """A cursor decodes to an equal cursor: same instant, topic, event id and order."""
    cursor = Cursor(
        datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=timezone(timedelta(hours=2))),
        "svc.prod",
        "id with spaces and ü",
        descending=True,
    )
    assert decode_cursor(encode_cursor(cursor), Cursor) == cursor
    assert decode_cursor(encode_cursor(DeadCursor(42)), DeadCursor) == DeadCursor(42)


def test_a_cursor_is_url_safe_without_padding() -> None:
    """A token needs no escaping in a query string: only [A-Za-z0-9_-], no trailing '='."""
    for n in range(1, 40):
        token = encode_cursor(Cursor(T1, "t" * n, "e" * n))
        assert re.fullmatch(r"[A-Za-z0-9_-]+", token), token


@pytest.mark.parametrize(
    "token",
    [
        "not-a-cursor",
        "!!",
        "",
        encode_cursor(DeadCursor(7)),  # a dead-letter cursor used for events
        encode_cursor(Cursor(T1, "t", "e"))[:-3],  # cut short
        # Valid JSON of the wrong shape: [1] and a string where the time goes.
        "WzFd",
    ],
)
def test_a_token_this_api_did_not_issue_is_a_cursor_error(token: str) -> None:
    """Garbage, a truncated token or another kind's cursor raise CursorError, never anything
    else."""
    with pytest.raises(CursorError, match="not one this API issued"):
        decode_cursor(token, Cursor)


def test_an_events_cursor_is_no_dead_letter_cursor() -> None:
    """A cursor of /events pages cannot be used to page dead letters."""
    with pytest.raises(CursorError):
        decode_cursor(encode_cursor(AFTER), DeadCursor)
