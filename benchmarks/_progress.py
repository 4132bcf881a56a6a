"""A progress bar on stderr, a few lines of our own.

On a terminal one line is redrawn at most ten times a second; elsewhere (a
pipe, a CI log) each finished step prints one line.  ``advance()`` is called
from the measured loops, so it costs a clock read unless it redraws.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

_WIDTH = 24
_REDRAW = 0.1


class Progress:
    def __init__(self, steps: int, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.steps = max(steps, 1)
        self.step = 0
        self.label = ""
        self.total = 0
        self.done = 0
        self.started = time.monotonic()
        self.step_started = self.started
        self._drawn = 0.0

    def begin(self, label: str, total: int) -> None:
        """Start the next step: *label*, with *total* units of work."""
        self.step += 1
        self.label = label
        self.total = total
        self.done = 0
        self.step_started = time.monotonic()
        self._draw(force=True)

    def advance(self, units: int = 1) -> None:
        self.done += units
        if self.tty and time.monotonic() - self._drawn >= _REDRAW:
            self._draw()

    def end(self, note: str = "") -> None:
        """Finish the current step."""
        took = time.monotonic() - self.step_started
        if not self.enabled:
            return
        if self.tty:
            self._draw(force=True)
        else:
            extra = f" {note}" if note else ""
            print(
                f"[{self.step}/{self.steps}] {self.label}: {took:.1f} s{extra}",
                file=self.stream,
                flush=True,
            )

    def note(self, text: str) -> None:
        """Print a line of its own (a skipped combination, a warning)."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)
        if self.tty:
            self._draw(force=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _draw(self, *, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._drawn < _REDRAW:
            return
        self._drawn = now
        fraction = (self.step - 1 + (self.done / self.total if self.total else 0)) / self.steps
        fraction = min(max(fraction, 0.0), 1.0)
        filled = int(fraction * _WIDTH)
        bar = "#" * filled + "-" * (_WIDTH - filled)
        elapsed = now - self.started
        where = f"{self.step}/{self.steps} {elapsed:4.0f}s"
        line = f"[{bar}] {where}  {self.label}  {self.done}/{self.total}"
        # One line, never wider than the terminal: a wrapped line cannot be redrawn.
        width = min(shutil.get_terminal_size().columns - 1, 120)
        self.stream.write("\r\033[K" + line[:width])
        self.stream.flush()
