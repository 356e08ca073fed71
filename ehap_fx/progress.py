"""Progress for people and for logs: a tqdm bar on a terminal, a line every N % otherwise.

A tqdm bar redraws itself with ``\\r``; written to a file or a CI log, those redraws become
thousands of frames on one line. :func:`bar` asks the stream first: on a TTY it is tqdm, else a
:class:`LineProgress` with the same small API (``update``, ``set_postfix``, ``set_postfix_str``,
``write``, ``close``, iteration, ``with``) that prints one line each time another ``every``
percent is done, and one at the end::

    finetune: 50% (69/138 step) 1.2 s, loss=0.3154

``EHAP_PROGRESS=bar`` or ``=lines`` overrides the choice.

>>> import io
>>> out = io.StringIO()
>>> with bar(total=4, desc="demo", unit="step", every=50, file=out) as b:
...     for _ in range(4):
...         b.update(1)
>>> [line.split(" ")[:3] for line in out.getvalue().splitlines()]
[['demo:', '50%', '(2/4'], ['demo:', '100%', '(4/4']]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

ENV = "EHAP_PROGRESS"


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        disable: bool = False, every: int = 10, file: IO[str] | None = None, **tqdm_kwargs: Any):
    """A progress bar over ``iterable`` (or ``total`` steps): tqdm where ``file`` (default
    stderr) is a terminal, a :class:`LineProgress` printing every ``every`` % elsewhere."""
    stream = file if file is not None else sys.stderr
    mode = os.environ.get(ENV, "")
    tty = mode == "bar" or (mode != "lines" and _isatty(stream))
    if disable or tty:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=file, **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, every=every, file=stream)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """tqdm's small API as plain lines: one each time another ``every`` % of ``total`` is done
    (or every ``every`` steps when the total is unknown), and one at :meth:`close`."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", every: int = 10, file: IO[str] | None = None) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.every, self.file = max(1, int(every)), file if file is not None else sys.stderr
        self.n, self.postfix, self._shown, self._closed = 0, "", 0, False
        self._start = time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _mark(self) -> int:
        """How many ``every`` steps are done: percent steps with a total, else counts."""
        if self.total:
            return min(100, 100 * self.n // self.total) // self.every
        return self.n // self.every

    def update(self, n: int = 1) -> None:
        self.n += n
        mark = self._mark()
        if mark > self._shown:
            self._shown = mark
            self._print()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def write(self, s: str) -> None:
        print(s, file=self.file, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.n and (self.total is None or self.n < self.total or self._shown * self.every < 100):
            self._print()  # where it stopped, when the last line did not say so

    def _print(self) -> None:
        done = f"{100 * self.n // self.total}% ({self.n}/{self.total} {self.unit})" if self.total \
            else f"{self.n} {self.unit}"
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {time.perf_counter() - self._start:.1f} s{tail}", file=self.file,
              flush=True)
