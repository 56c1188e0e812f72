"""The retention policy's text: `pattern = 90d, other.> = forever`, parsed strictly.

Patterns are topics or NATS wildcards over topics (`*` one token, a final `>` one or more), as
in `GET /events?topic=`. The first pattern that matches a topic decides its retention; a
pattern that an earlier one already covers entirely could never decide anything and is refused,
so the order written is the order that applies and no rule is silently dead.
"""

from __future__ import annotations

import re

import msgspec

from oncelog.events import pattern_error

__all__ = ["MAX_DAYS", "Rule", "covers", "format_rules", "parse_days", "parse_rules"]

# A century: anything longer is "forever" in practice, and day counts stay far inside what
# datetime arithmetic can hold.
MAX_DAYS = 36_500
FOREVER = "forever"
# ASCII digits only: Python's int() would also take other scripts' digits.
_DAYS = re.compile(r"([0-9]{1,6})d", re.ASCII)


class Rule(msgspec.Struct, frozen=True):
    """Events of topics matching `pattern` are kept `days` days (None: forever)."""

    pattern: str
    days: int | None


def parse_days(text: str, where: str) -> int | None:
    """Return the days of `90d` (None for `forever`), or raise ValueError naming `where`."""
    if text == FOREVER:
        return None
    found = _DAYS.fullmatch(text)
    if found is None:
        raise ValueError(f"{where}: {text[:40]!r} is not a number of days like 90d, or 'forever'")
    days = int(found.group(1))
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"{where}: {days}d must be between 1d and {MAX_DAYS}d (or 'forever')")
    return days


def covers(a: str, b: str) -> bool:
    """Whether every topic that pattern `b` matches is matched by pattern `a` too."""
    a_tokens, b_tokens = a.split("."), b.split(".")
    for i, part in enumerate(a_tokens):
        if part == ">":
            return len(b_tokens) > i
        if i >= len(b_tokens) or b_tokens[i] == ">":
            return False
        if part not in {"*", b_tokens[i]}:
            return False
    return len(a_tokens) == len(b_tokens)


def parse_rules(text: str, variable: str) -> tuple[Rule, ...]:
    """Parse `pattern = 90d, ...` (empty: no rules); raise ValueError naming `variable`."""
    if not text.strip(" \t"):
        return ()
    rules: list[Rule] = []
    for n, entry in enumerate(text.split(","), 1):
        where = f"{variable} entry {n}"
        pattern, equals, value = entry.partition("=")
        pattern, value = pattern.strip(" \t"), value.strip(" \t")
        if not equals or not pattern or not value:
            raise ValueError(f"{where}: {entry.strip()[:60]!r} is not 'pattern = 90d'")
        if (bad := pattern_error(pattern)) is not None:
            raise ValueError(f"{where}: pattern {pattern[:60]!r} {bad}")
        days = parse_days(value, where)
        for earlier in rules:
            if covers(earlier.pattern, pattern):
                raise ValueError(
                    f"{where}: {pattern!r} never applies, {earlier.pattern!r} comes first and"
                    " matches every topic it does (the first matching pattern decides; put the"
                    " more specific one first)"
                )
        rules.append(Rule(pattern, days))
    return tuple(rules)


def format_rules(rules: tuple[Rule, ...]) -> str:
    """Return the text that parse_rules reads back as `rules`."""
    return ", ".join(f"{r.pattern} = {FOREVER if r.days is None else f'{r.days}d'}" for r in rules)
