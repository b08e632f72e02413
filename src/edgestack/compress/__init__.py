"""Torch compression passes and compressed layers (torch is imported on first use).

Entry point: :func:`compress` (``compress(model, method, *, calib=None, progress=False,
**options) -> CompressReport``), one pass per module:

    prune     structured pruning of attention heads and hidden channels (bias compensation)
    shift     power-of-two sign + exponent codes (DenseShift / DeepShift)
    lowrank   truncated-SVD factors (activation-aware with calibration data)
    bitstack  BitStack sign + rank-k residual blocks

Shared pieces: ``layers`` (compressed modules), ``walk`` (finding layers), ``resize``
(shrinking layers), ``report`` (what a pass did), ``api`` (calibration hooks), ``options``
(every method's options and checks, torch-free).
"""

from typing import Any

from edgestack.compress.options import METHODS, check_options, method_options

_LAZY = {"compress": "edgestack.compress.api", "CompressReport": "edgestack.compress.report",
         "LayerReport": "edgestack.compress.report", "SkippedLayer": "edgestack.compress.report",
         "decoded_weights": "edgestack.compress.layers"}


def __getattr__(name: str) -> Any:
    """``compress`` and the report types import torch: loaded on first use, so that
    ``edgestack.compress.options`` (the option checks) can be imported without it."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgestack.compress' has no attribute {name!r}")

__all__ = [
    "METHODS",
    "compress",
    "method_options",
    "check_options",
    "CompressReport",
    "LayerReport",
    "SkippedLayer",
    "decoded_weights",
]
