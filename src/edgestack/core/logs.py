"""Logging without process-wide side effects: library code quiets third-party loggers only
for as long as it runs them (:func:`quiet_loggers`), never changes the root logger's level
for good, and sets no environment variables; the CLI alone configures logging."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str], level: int = logging.ERROR) -> Iterator[None]:
    """Raise the loggers ``names`` (``"root"``: the root logger) to ``level`` inside the
    block, and give each its own level back afterwards.

    A module first imported inside the block that calls ``logging.basicConfig`` configures
    nothing: the root logger holds a ``NullHandler`` for the block's duration, which makes
    ``basicConfig`` a no-op. (ONNX Runtime's ``matmul_nbits_quantizer`` calls
    ``basicConfig(level=INFO)`` at import: without this the root logger printed every node the
    quantizers visited and kept that handler for good.)"""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    for lg, _ in saved:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        root.removeHandler(guard)
        for lg, old in saved:
            lg.setLevel(old)
