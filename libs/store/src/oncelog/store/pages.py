"""Pages of events bounded in bytes as well as in rows.

Events may be up to MAX_EVENT_BYTES each, so a page of a thousand rows could hold a gigabyte.
"""

from __future__ import annotations

__all__ = ["within_bytes"]


def within_bytes(sql: str, columns: str, order: str, budget: int) -> str:
    """Wrap a page query that selects `columns` and `payload` and ends in ORDER BY `order` LIMIT.

    The result keeps the page's rows up to the first whose payloads would pass the byte budget
    (parameter number `budget`); the first row always stays. Each row also carries `fetched`,
    how many rows the page query gave, so that a page cut short (fewer rows than `fetched`) is
    told apart from the end. The payload comes back as text, converted once: OFFSET 0 keeps the
    planner from computing the conversion again for the sizes.
    """
    return f"""
SELECT {columns}, payload, fetched FROM (
    SELECT {columns}, payload, octet_length(payload) AS size,
           sum(octet_length(payload)) OVER (ORDER BY {order} ROWS UNBOUNDED PRECEDING) AS upto,
           count(*) OVER () AS fetched
    FROM (SELECT {columns}, payload::text AS payload FROM ({sql}) page OFFSET 0) texts
) summed
WHERE upto - size < ${budget}
ORDER BY {order}"""
