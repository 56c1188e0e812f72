"""The retention policy's text: strict parsing, first-match precedence, no dead rules."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oncelog.platform.settings import SettingsError, load
from oncelog.retention.policy import MAX_DAYS, Rule, covers, format_rules, parse_rules
from oncelog.retention.settings import OPTIONAL, RetentionSettings, environ

TOKENS = st.sampled_from(["a", "b", "c1", "x_y"])
TOPICS = st.lists(TOKENS, min_size=1, max_size=4).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.one_of(TOKENS, st.just("*")), min_size=0, max_size=3))
    if not tokens or draw(st.booleans()):
        tokens.append(">")
    return ".".join(tokens)


PATTERNS = st.one_of(TOPICS, patterns())


def matches(pattern: str, topic: str) -> bool:
    """NATS semantics, spelled out independently: '*' one token, a final '>' one or more."""
    regex = r"\.".join(
        "[^.]+" if t == "*" else ".+" if t == ">" else re.escape(t) for t in pattern.split(".")
    )
    return re.fullmatch(regex, topic) is not None


def test_the_documented_example_parses() -> None:
    """`auth.> = 90d, debug.> = 3d, audit.> = forever` is three rules in that order."""
    assert parse_rules("auth.> = 90d, debug.> = 3d,audit.>=forever", "V") == (
        Rule("auth.>", 90),
        Rule("debug.>", 3),
        Rule("audit.>", None),
    )
    assert parse_rules("  ", "V") == ()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("auth.> = 0d", "between 1d"),
        ("auth.> = -1d", "not a number of days"),
        (f"auth.> = {MAX_DAYS + 1}d", "between 1d"),
        ("auth.> = 1234567d", "not a number of days"),
        ("auth.> = ٣d", "not a number of days"),
        ("auth.> = 3", "not a number of days"),
        ("auth.> = 3 d", "not a number of days"),
        ("auth.> = 3D", "not a number of days"),
        ("auth. = 3d", "pattern"),
        ("auth.>.x = 3d", "pattern"),
        ("auth = 3d, auth = 4d", "never applies"),
        ("> = 3d, auth.x = 4d", "never applies"),
        ("auth.* = 3d, auth.x = 4d", "never applies"),
        ("auth.> = 3d, auth.*.x = 4d", "never applies"),
        ("auth.> = 3d,", "is not 'pattern = 90d'"),
        ("auth.>", "is not 'pattern = 90d'"),
        ("= 3d", "is not 'pattern = 90d'"),
    ],
)
def test_hostile_policies_are_refused_naming_the_variable_and_the_entry(
    text: str, why: str
) -> None:
    """Every refusal names RETENTION_TOPICS, the entry's number, and what is wrong."""
    with pytest.raises(ValueError, match=rf"^RETENTION_TOPICS entry \d+: .*{re.escape(why)}"):
        parse_rules(text, "RETENTION_TOPICS")


def test_a_more_specific_pattern_first_is_fine() -> None:
    """Specific before general is the way to write overlapping rules: the first match decides."""
    assert [r.pattern for r in parse_rules("auth.x = 1d, auth.* = 2d, auth.> = 3d", "V")] == [
        "auth.x",
        "auth.*",
        "auth.>",
    ]


@given(PATTERNS, PATTERNS, TOPICS)
def test_covers_is_sound(a: str, b: str, topic: str) -> None:
    """When `a` covers `b`, every topic `b` matches is matched by `a`."""
    if covers(a, b) and matches(b, topic):
        assert matches(a, topic)


@given(PATTERNS, PATTERNS)
def test_covers_is_complete_on_witnesses(a: str, b: str) -> None:
    """When `a` does not cover `b`, some topic of `b` (its wildcards filled in) escapes `a`."""
    if covers(a, b):
        return
    # `*` takes one token and `>` one or more, each filled independently (`*.a.*` does not
    # cover `*.a.>`, and only a `>` of two tokens shows it).
    witnesses = {
        ".".join(star if t == "*" else rest if t == ">" else t for t in b.split("."))
        for star in ("zz", "a", "b", "c1", "x_y")
        for rest in ("zz", "a", "b", "c1", "x_y", "zz.zz", "a.zz")
    }
    assert any(matches(b, w) and not matches(a, w) for w in witnesses)


@given(st.lists(st.tuples(PATTERNS, st.one_of(st.none(), st.integers(1, MAX_DAYS))), max_size=5))
def test_what_parses_reads_back_the_same(entries: list[tuple[str, int | None]]) -> None:
    """A policy either parses, and formats back to text that parses to the same rules, or is
    refused with a ValueError naming the variable; nothing else escapes."""
    text = ", ".join(f"{p} = {'forever' if d is None else f'{d}d'}" for p, d in entries)
    try:
        rules = parse_rules(text, "V")
    except ValueError as exc:
        refused = str(exc)
        assert refused.startswith("V entry ")
        return
    assert rules == tuple(Rule(p, d) for p, d in entries)
    assert parse_rules(format_rules(rules), "V") == rules


@given(st.text(max_size=60))
def test_arbitrary_text_is_parsed_or_refused_cleanly(text: str) -> None:
    """Any string at all is rules or a ValueError naming the variable."""
    try:
        parse_rules(text, "V")
    except ValueError as exc:
        refused = str(exc)
        assert refused.startswith("V entry ")


def test_empty_optional_settings_mean_unset_as_compose_passes_them() -> None:
    """compose.yaml passes `RETENTION_DAYS: ${RETENTION_DAYS:-}`: empty optional settings are
    the defaults (keep forever), while a set one still counts and a bad one is refused."""
    empty = dict.fromkeys(OPTIONAL, "")
    settings = load(RetentionSettings, environ(empty))
    assert settings.retention_days is None
    assert settings.rules() == ()
    assert load(RetentionSettings, environ(empty | {"RETENTION_DAYS": "30"})).retention_days == 30
    with pytest.raises(SettingsError, match="RETENTION_INTERVAL_SECONDS"):
        load(RetentionSettings, environ(empty | {"RETENTION_INTERVAL_SECONDS": ""}))
