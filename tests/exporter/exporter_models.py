"""Shared builders for the exporter tests: random containers and compressed zoo models."""

from __future__ import annotations

import warnings
from typing import Any

from random_weights import random_shift, random_stack  # noqa: F401 (re-exported)

# Options that keep the passes fast on 2 cores (no calibration, small blocks).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "shift": {"bits": 4, "scale": "maxabs"},
    "bitstack": {"n_blocks": 2, "k": 2},
    "lowrank": {"ratio": 0.5},
    "prune": {"ratio": 0.25},
}


def compressed(factory: Any, method: str, **options: Any) -> tuple[Any, dict[str, Any], Any]:
    """``(model, inputs, report)``: a zoo model compressed in place with ``method``."""
    from edgestack.compress import compress

    model, inputs = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress(model, method, **{**METHOD_OPTIONS[method], **options})
    return model, inputs, report
