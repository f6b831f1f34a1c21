"""A minimal progress bar on stderr (standard library only).

It draws only when stderr is a terminal or TOKENSTEP_PROGRESS=1, never under
--quiet, only once a task has run for ``delay_s`` (short runs stay silent), and
at most once every ``min_interval_s`` (redraws are rate-limited).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

ENV_VAR = "TOKENSTEP_PROGRESS"


def progress_enabled(quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Whether a bar should be drawn: not quiet, and stderr is a TTY or TOKENSTEP_PROGRESS=1."""
    if quiet:
        return False
    if os.environ.get(ENV_VAR, "").strip() == "1":
        return True
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Callable progress(done, total) that redraws one stderr line; close() ends the line."""

    def __init__(self, label: str, enabled: bool = True, stream: TextIO | None = None, width: int = 30,
                 min_interval_s: float = 0.2, delay_s: float = 1.0) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.width = width
        self.min_interval_s = min_interval_s
        self.delay_s = delay_s
        # a UI clock only: nothing measured or decided depends on it
        self._start = time.monotonic()
        self._last_draw = -float("inf")
        self._drawn = False
        self._state = (0, 0)

    def __call__(self, done: int, total: int) -> None:
        """Record progress; redraw if enabled, past the delay and the redraw interval (or at the end)."""
        self._state = (done, total)
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._start < self.delay_s:
            return
        if now - self._last_draw < self.min_interval_s and done < total:
            return
        self._last_draw = now
        self._draw(done, total, now - self._start)

    def _draw(self, done: int, total: int, elapsed_s: float) -> None:
        frac = done / total if total > 0 else 0.0
        filled = min(self.width, int(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"\r{self.label} [{bar}] {done}/{total} {100 * frac:3.0f}% {elapsed_s:6.1f} s"
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False
            return
        self._drawn = True

    def close(self) -> None:
        """Finish the line if anything was drawn."""
        if self._drawn:
            done, total = self._state
            self._draw(done, total, time.monotonic() - self._start)
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
