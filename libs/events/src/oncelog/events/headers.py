"""NATS header blocks, as they come off the wire."""

from __future__ import annotations

__all__ = ["parse_headers"]


def parse_headers(raw: bytes) -> dict[str, str]:
    """Parse a `NATS/1.0` header block; a repeated name keeps its first value."""
    lines = raw.decode(errors="replace").split("\r\n")
    headers: dict[str, str] = {}
    status = lines[0][len("NATS/1.0") :].strip()
    if status:
        code, _, description = status.partition(" ")
        headers["Status"] = code
        if description:
            headers["Description"] = description
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip():
            headers.setdefault(name.strip(), value.strip())
    return headers
