"""Progress lines for long work, on stderr so stdout stays for results."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    """Prints notes and counters; a counter redraws one line on a terminal.

    Args:
        stream: where to write; None writes nothing (library default, tests).
    """

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._last = 0.0
        self._open_line = False

    def note(self, message: str) -> None:
        """One line of its own."""
        if self.stream is None:
            return
        self._end_line()
        print(message, file=self.stream, flush=True)

    def count(self, label: str, done: int, total: int, unit: str = "") -> None:
        """`label: done/total unit`, redrawn in place, at most ~10 times a second.

        Off a terminal (logs, CI) only the start, every quarter and the end are printed.
        """
        if self.stream is None:
            return
        now = time.monotonic()
        line = f"{label}: {done}/{total} {unit}".rstrip()
        if self._tty:
            if done in (0, total) or now - self._last >= 0.1:
                self.stream.write("\r\x1b[2K" + line)
                self.stream.flush()
                self._last, self._open_line = now, True
            if done == total:
                self._end_line()
        else:
            quarter = max(1, total // 4)
            if done == total or done % quarter == 0:
                print(line, file=self.stream, flush=True)

    def _end_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
