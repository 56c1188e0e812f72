"""The publisher's progress report: redrawn in place on a terminal, a line now and then elsewhere."""

from __future__ import annotations

import time
from typing import TextIO

__all__ = ["Progress"]

# How often the in-place line is redrawn on a terminal.
_REDRAW_SECONDS = 1.0


class Progress:
    """Writes progress to `stream`: one line redrawn in place, or whole lines every `interval` s.

    In a pipe or a CI log a carriage return draws nothing readable, so there each report is a
    line of its own, at most one every `interval` seconds.
    """

    def __init__(self, stream: TextIO, *, in_place: bool, interval: float = 5.0) -> None:
        self.stream = stream
        self.in_place = in_place
        self.interval = _REDRAW_SECONDS if in_place else interval
        self._last = time.monotonic()
        self._drawn = False

    def due(self) -> bool:
        """Return whether a report is due."""
        return time.monotonic() - self._last >= self.interval

    def report(self, line: str) -> None:
        """Write `line` now."""
        self._last = time.monotonic()
        if self.in_place:
            self.stream.write(f"\r{line:<110}")
            self._drawn = True
        else:
            self.stream.write(f"publisher: {line}\n")
        self.stream.flush()

    def notice(self, line: str) -> None:
        """Write `line` on a line of its own, whatever the mode (an announcement, not progress)."""
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        self.stream.write(f"publisher: {line}\n")
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
