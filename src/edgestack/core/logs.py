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
    block, and give each its own level back afterwards."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, old in saved:
            lg.setLevel(old)


@contextlib.contextmanager
def no_root_config() -> Iterator[None]:
    """Make ``logging.basicConfig`` a no-op inside the block (the root logger holds a
    ``NullHandler``), for third-party code that configures the root logger: ONNX Runtime's
    ``matmul_nbits_quantizer`` calls ``basicConfig(level=INFO)`` when imported and
    ``quantize_dynamic`` logs with ``logging.warning`` (which calls ``basicConfig()``), so its
    quantizers printed every node they visited and left a root handler for good. Only around
    such code: while the guard is there, nothing reaches Python's last-resort handler."""
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeHandler(guard)
