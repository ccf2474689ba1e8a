"""Progress reporting that suits where it is written to.

On a terminal a tqdm bar is drawn in place. Anywhere else (a log file, a pipe, CI) a bar's
carriage-return redraws would pile up as thousands of fragments, so plain lines are printed
instead: one per finished unit when there are few units, otherwise one each time another
``percent`` of the total is done, plus a last line when the work ends.
"""

from __future__ import annotations

import math
import sys
import time
from types import TracebackType
from typing import Any, TextIO


class _Lines:
    """A line-per-step stand-in for a tqdm bar, with the subset of its API the code uses."""

    def __init__(self, total: int, desc: str, unit: str, percent: float, stream: TextIO) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.unit = unit
        self.stream = stream
        self.n = 0
        # a line each `every` units: every unit while that is at most `percent` of the total
        self.every = max(1, math.ceil(self.total * percent / 100.0))
        self._next = self.every
        self._postfix = ""
        self._printed = 0  # the count the last line showed
        self._started = time.perf_counter()
        self._closed = False

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        """Text shown after the counts on the next line printed."""
        self._postfix = str(text)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more finished units; print a line if a step boundary was crossed."""
        self.n += int(n)
        if self.total and self.n >= self._next:
            self._line()
            self._next = (self.n // self.every + 1) * self.every

    def close(self) -> None:
        """Print the final count unless the last line already showed it."""
        if self._closed:
            return
        self._closed = True
        if self.n != self._printed and (self.total or self.n):
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self._started
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        tail = f" {self._postfix}" if self._postfix else ""
        self.stream.write(f"{self.desc}: {count} {self.unit}{pct} {elapsed:.1f}s{tail}\n")
        self.stream.flush()
        self._printed = self.n

    def __enter__(self) -> _Lines:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Silent:
    """The progress object of a disabled report: accepts every call, prints nothing."""

    n = 0

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        """Ignored."""

    def update(self, n: int = 1) -> None:
        """Ignored."""
        self.n += int(n)

    def close(self) -> None:
        """Ignored."""

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(
    total: int,
    desc: str,
    unit: str = "it",
    *,
    enabled: bool = True,
    leave: bool = True,
    percent: float = 5.0,
    stream: TextIO | None = None,
) -> Any:
    """A progress report for ``total`` units of work, drawn to suit ``stream``.

    Args:
        total: how many units the work has.
        desc: a short label printed first (``"bench"``, ``"train"``).
        unit: the unit's name (``"img"``, ``"cell"``).
        enabled: False (``--no-progress``) prints nothing at all.
        leave: on a terminal, keep the finished bar on screen.
        percent: off a terminal, the step between lines as a share of ``total``; with
            ``total * percent / 100 <= 1`` that is one line per finished unit.
        stream: where to write (default: ``sys.stderr`` at call time, as tqdm does).

    Returns:
        An object with ``update(n)``, ``set_postfix_str(text)`` and ``close()`` (also a
        context manager): a tqdm bar when ``stream`` is a terminal, otherwise a line printer.
    """
    if not enabled:
        return _Silent()
    out = sys.stderr if stream is None else stream
    if _is_terminal(out):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=out)
    return _Lines(total, desc, unit, percent, out)
