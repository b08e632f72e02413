"""Torch compression passes and compressed layers (imports torch).

Entry point: :func:`compress` (``compress(model, method, *, calib=None, progress=False,
**options) -> CompressReport``), one pass per module:

    prune     structured pruning of attention heads and hidden channels (bias compensation)
    shift     power-of-two sign + exponent codes (DenseShift / DeepShift)
    lowrank   truncated-SVD factors (activation-aware with calibration data)
    bitstack  BitStack sign + rank-k residual blocks

Shared pieces: ``layers`` (compressed modules), ``walk`` (finding layers), ``resize``
(shrinking layers), ``report`` (what a pass did), ``api`` (options, calibration hooks).
"""

from edgestack.compress.api import METHODS, compress, method_options
from edgestack.compress.report import CompressReport, LayerReport, SkippedLayer

__all__ = [
    "METHODS",
    "compress",
    "method_options",
    "CompressReport",
    "LayerReport",
    "SkippedLayer",
]
