"""Progress bars: tqdm when it is installed, else one self-overwriting text line on stderr."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["progress_bar"]


class _TextBar:
    """Minimal stand-in for ``tqdm``: ``update(n)``, ``set_postfix_str(s)``, ``close()``."""

    def __init__(self, total: int | None, desc: str, disable: bool) -> None:
        # A redrawn line only makes sense on a terminal; in logs and pipes stay quiet.
        self.total, self.desc = total, desc
        self.disable = disable or not sys.stderr.isatty()
        self.n = 0
        self.postfix = ""
        self._t0 = time.perf_counter()
        self._last = 0.0
        self._width = 0
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.disable or (not force and now - self._last < 0.2):
            return
        self._last = now
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" {100.0 * self.n / self.total:5.1f}%" if self.total else ""
        post = f" {self.postfix}" if self.postfix else ""
        line = f"{self.desc}:{pct} {done} [{now - self._t0:.1f}s]{post}"
        sys.stderr.write("\r" + line.ljust(self._width))
        sys.stderr.flush()
        self._width = len(line)

    def write(self, message: str) -> None:
        """Print a line above the bar (like ``tqdm.write``)."""
        if not self.disable:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
        print(message, flush=True)
        self._draw(force=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw(force=self.total is not None and self.n >= self.total)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s
        self._draw()

    def close(self) -> None:
        if not self.disable:
            self._draw(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()

    def __enter__(self) -> _TextBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, disable: bool = False) -> Any:
    """A tqdm bar (if installed) or a :class:`_TextBar` with the same small interface."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total, desc, disable)
    return tqdm(total=total, desc=desc, disable=disable, leave=True)
