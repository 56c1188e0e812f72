"""Topic patterns as SQL: one topic, or a NATS wildcard over topics, as a condition on `topic`.

The API's `topic=` filters and the retention policy's patterns both go through `topic_filter`,
so a pattern selects the same topics wherever it is written.
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_exact", "topic_filter"]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def is_exact(pattern: str) -> bool:
    """Whether `pattern` names one topic (holds no wildcard token)."""
    return not {"*", ">"} & set(pattern.split("."))


def topic_filter(pattern: str, arg: int) -> tuple[str, list[Any]]:
    """Return a SQL condition matching a topic or a NATS wildcard, with its parameters.

    `auth.*` matches exactly one more token, `auth.>` one or more; other topics match exactly.
    Prefix conditions use LIKE on the C-collated column, which the btree indexes serve. Tokens
    are validated before they get here: [A-Za-z0-9_-] needs no escaping in a regex.
    """
    if is_exact(pattern):
        return f"topic = ${arg}", [pattern]
    tokens = pattern.split(".")
    prefix: list[str] = []
    for token in tokens:
        if token in {"*", ">"}:
            break
        prefix.append(token)
    like = _like_escape(".".join(prefix) + ("." if prefix else "")) + "%"
    regex = "^" + r"\.".join("[^.]+" if t == "*" else ".+" if t == ">" else t for t in tokens) + "$"
    return f"topic LIKE ${arg} AND topic ~ ${arg + 1}", [like, regex]
