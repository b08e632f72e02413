"""Progress bars on stderr, for every layer: tqdm when it is installed, nothing otherwise.

Every ``progress`` argument in edgestack (:func:`edgestack.compress.compress`,
:func:`edgestack.exporter.export`, :func:`edgestack.profiler.bench.run_bench`) takes:

- ``False``: no bar (the library default: a library call prints nothing unasked);
- ``True``: bars, even when stderr is not a terminal (forced);
- ``None``: automatic, bars only when stderr is a terminal (what the CLI passes unless
  ``-q`` or ``--progress``/``--no-progress`` says otherwise).

Bars are written to stderr only, so ``--json`` output on stdout stays one JSON object, and
they are left off the screen when done (``leave=False``): the log lines say what happened.
tqdm is optional and imported only when a bar is shown, so the device side (package,
runtime) imports this module without it; without tqdm the work is the same, with no bar.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

Progress = bool | None
"""``True`` (forced), ``False`` (off) or ``None`` (auto: when stderr is a terminal)."""


def stderr_is_tty() -> bool:
    """Whether stderr is a terminal (the ``None`` setting shows bars only then)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def bars_enabled(progress: Progress) -> bool:
    """Whether ``progress`` asks for bars here (``None``: stderr is a terminal)."""
    return stderr_is_tty() if progress is None else bool(progress)


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar, same work
        return None
    return tqdm


def progress_iter(items: Iterable[Any], progress: Progress, desc: str,
                  total: int | None = None) -> Iterable[Any]:
    """``items``, wrapped in a tqdm bar on stderr when ``progress`` asks for one and tqdm is
    installed (else ``items`` itself)."""
    tqdm = _tqdm() if bars_enabled(progress) else None
    if tqdm is None:
        return items
    return tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr, disable=False)


class _NoBar:
    """What :func:`progress_bar` returns when no bar is shown: the same calls, no output."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(total: int, progress: Progress, desc: str, unit: str = "it") -> Any:
    """A bar of ``total`` steps on stderr (``update(n)``, ``set_postfix_str(text)``,
    ``close()``, usable with ``with``), or an object taking the same calls and showing
    nothing when ``progress`` asks for no bar or tqdm is not installed."""
    tqdm = _tqdm() if bars_enabled(progress) else None
    if tqdm is None:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
                disable=False)


@contextlib.contextmanager
def logging_through_bars(progress: Progress, loggers: Sequence[logging.Logger]
                         ) -> Iterator[None]:
    """Inside the block, log lines of ``loggers`` written to a console are printed through
    tqdm (``tqdm.contrib.logging.logging_redirect_tqdm``), so a line logged while a bar is
    on stderr does not break the bar; nothing changes when no bar can be shown."""
    if not bars_enabled(progress) or _tqdm() is None:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=list(loggers)):
        yield


class Stages:
    """One bar over the named stages of a long job (the exporter's steps, the bench's
    subjects): :meth:`start` names the stage now running and counts the one before it as
    done; :meth:`close` (or the end of a ``with`` block) counts the last one.

    Args:
        stages: The stages' names, in order (the bar's total is their number).
        progress: See the module docstring.
        desc: The bar's label.
    """

    def __init__(self, stages: Sequence[str], progress: Progress, desc: str) -> None:
        self.total = len(stages)
        self.desc = desc
        self.done = 0
        self._running = False
        tqdm = _tqdm() if bars_enabled(progress) and stages else None
        self._bar = None if tqdm is None else tqdm(
            total=self.total, desc=desc, leave=False, file=sys.stderr, disable=False,
            bar_format="{desc} {n}/{total} {bar} [{elapsed}]")

    @property
    def shown(self) -> bool:
        """Whether a bar is on stderr."""
        return self._bar is not None

    def start(self, name: str) -> None:
        """Stage ``name`` is running now; the stage before it is done."""
        self._finish_current()
        self._running = True
        if self._bar is not None:
            self._bar.set_description_str(f"{self.desc}: {name}", refresh=True)

    def _finish_current(self) -> None:
        if self._running:
            self.done += 1
            self._running = False
            if self._bar is not None:
                self._bar.update(1)

    def close(self) -> None:
        """Count the running stage as done and take the bar off stderr."""
        self._finish_current()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self._running = False              # a failed stage is not counted as done
        self.close()


__all__ = ["Progress", "Stages", "bars_enabled", "logging_through_bars", "progress_bar",
           "progress_iter", "stderr_is_tty"]
