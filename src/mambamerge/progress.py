"""Progress where someone can read it, in the first process only: a tqdm bar on a terminal; written to a
log file or a pipe (a cluster job, `| tee`), plain lines instead, one every ~30 s and one per finished
piece of work that the caller names (a sweep's configurations), so logs hold no escape codes and are
never silent for long."""
import sys
import time
from typing import Iterable, Optional

from tqdm import tqdm

from mambamerge.distributed import world

LOG_EVERY = 30.0  # seconds between plain progress lines off a terminal


class Bar(tqdm):
    """tqdm with `finished`: one piece of work done, which the bar counts (the text is for log lines)."""

    def finished(self, text: str) -> None:
        self.update()


class LogLines:
    """The part of tqdm's interface the package uses, writing plain lines to stderr: `finished(text)`
    counts one piece of work done and writes a line with the count, `text`, the elapsed time and an
    estimate of the time left; `update` (and iterating) writes one at most every `every` seconds."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: Optional[str] = None,
                 unit: str = "it", initial: int = 0, every: float = LOG_EVERY, **_):
        self.iterable, self.desc, self.unit, self.every = iterable, desc or "progress", unit, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.initial, self.postfix = initial, initial, ""  # initial: done before (a resumed epoch)
        self.start = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self._write(self.postfix, now)

    def finished(self, text: str) -> None:
        self.n += 1
        self._write(text, time.monotonic())

    def _write(self, text: str, now: float) -> None:
        elapsed, count = now - self.start, f"{self.n}/{self.total}" if self.total else str(self.n)
        left = ""
        if self.total and self.initial < self.n < self.total:
            left = f", about {duration(elapsed / (self.n - self.initial) * (self.total - self.n))} left"
        print(f"{self.desc} {count} {self.unit}{': ' + text if text else ''} ({duration(elapsed)} elapsed{left})",
              file=sys.stderr, flush=True)
        self.last = now


def duration(seconds: float) -> str:
    """45 s, 3 min 20 s, 2 h 05 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress(iterable=None, **kwargs):
    """Bar(iterable, **kwargs) on a terminal, LogLines(iterable, **kwargs) off one; disabled in the other
    torchrun processes and when kwargs["disable"] is True."""
    hidden = kwargs.pop("disable", False) or not world().is_main
    leave = kwargs.pop("leave", False)
    if not hidden and not sys.stderr.isatty():
        return LogLines(iterable, **kwargs)
    return Bar(iterable, disable=hidden, leave=leave, **kwargs)
