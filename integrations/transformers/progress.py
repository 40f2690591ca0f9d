"""The job's one overall progress display: stage, method, seed, elapsed and remaining time.

On a terminal it is a single line redrawn in place; when the output is not a terminal (a log file, CI) it
prints a plain line whenever the stage changes and at most every ``interval_s`` seconds otherwise. The
remaining time is the elapsed time per unit of work done so far times the units left (units: training
steps, with each evaluation counted as a number of steps), so it firms up as the job runs.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_seconds"]


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """``Progress(total_units)``; ``stage(...)`` names what runs now; ``advance(n)`` counts work done."""

    def __init__(self, total_units: float, *, stream: TextIO | None = None, interval_s: float = 30.0,
                 enabled: bool = True) -> None:
        self.total = max(float(total_units), 1.0)
        self.done = 0.0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval_s
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.last_print = -1e9
        self.label = ""

    def stage(self, stage: str, *, method: str | None = None, seed: int | None = None) -> None:
        parts = [stage] + ([f"seed {seed}"] if seed is not None else []) + ([method] if method else [])
        self.label = " · ".join(parts)
        self._show(force=True)

    def advance(self, units: float = 1.0) -> None:
        self.done = min(self.total, self.done + units)
        self._show(force=False)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        frac = self.done / self.total
        remaining = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        left = format_seconds(remaining) if frac > 0 else "?"
        return (f"[{100 * frac:5.1f}%] {self.label} · elapsed {format_seconds(elapsed)} · "
                f"remaining ~{left}")

    def _show(self, *, force: bool) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if force or now - self.last_print >= 0.25:  # redraw at most 4 times a second
                self.stream.write("\r\033[K" + self.line())
                self.stream.flush()
                self.last_print = now
        elif force or now - self.last_print >= self.interval:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last_print = now

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
