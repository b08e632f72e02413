"""The one interface every way of running a model implements: :class:`Runner`.

A target's runner on its lowered files (:class:`edgestack.targets.base.Runner`), the device
runtime on a package (:class:`edgestack.runtime.Runtime`) and a plain session on a model file
(:class:`SessionRunner`, the bench's baselines) are all Runners: ``activate()`` (alias
``load()``) loads, ``infer(feeds)`` returns ``{output name: array}`` and sets
:attr:`~Runner.last_ms`, ``release()`` frees; as a context manager it activates and releases.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgestack.errors import TargetError


class Runner(abc.ABC):
    """Runs one model. ``last_ms``: the wall time of the last :meth:`infer`, in ms."""

    last_ms: float | None = None

    def activate(self) -> Runner:
        """Load what running needs (idempotent); returns ``self``. Runners that load in their
        constructor keep this default."""
        return self

    def load(self) -> Runner:
        """:meth:`activate`."""
        return self.activate()

    @abc.abstractmethod
    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run once: output name -> array."""

    @abc.abstractmethod
    def release(self) -> None:
        """Free what is loaded (idempotent)."""

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.release()


class SessionRunner(Runner):
    """A Runner over a loaded session with ONNX Runtime's interface (``get_outputs()``,
    ``run(None, feeds)``): an ``onnxruntime.InferenceSession`` or the runtime's
    OpenVINO/TensorRT sessions."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.names = [o.name for o in session.get_outputs()]

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self.session is None:
            raise TargetError("SessionRunner: released; create a new one to run again")
        t0 = time.perf_counter()
        out = self.session.run(None, {k: np.asarray(v) for k, v in feeds.items()})
        self.last_ms = (time.perf_counter() - t0) * 1e3
        return dict(zip(self.names, out, strict=True))

    def release(self) -> None:
        self.session = None


__all__ = ["Runner", "SessionRunner"]
