"""The one rule that says whether an output agrees with its reference, used by export parity
(ONNX vs torch), target parity (a target vs x86 ONNX Runtime) and the runtime's self-test
(a package vs its golden outputs).

Two outputs agree when their shapes are equal, ``got`` has no NaN, and
``max_abs <= atol or max_rel <= rtol``, where ``max_abs = max|got - ref|`` and
``max_rel = max_abs / max|ref|`` (relative to the reference's peak, so near-zero elements
do not blow it up). Callers may add criteria of their own (target parity also asks a
minimum cosine and top-1 agreement for quantized precisions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Agreement:
    """How one output compares with its reference.

    Attributes:
        shape, ref_shape: the two shapes.
        max_abs, max_rel, cosine: see :func:`error_stats` (``inf``/``0`` on a shape mismatch).
        passed: the module's rule.
    """

    shape: tuple[int, ...]
    ref_shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    passed: bool


def error_stats(a: np.ndarray, r: np.ndarray) -> tuple[float, float, float]:
    """``(max_abs, max_rel, cosine)`` of same-shape, non-empty float64 vectors ``a`` vs ``r``.

    ``max_rel = max|a - r| / max|r|``; a NaN on either side gives ``max_abs = inf`` (never
    agreement); the cosine of two zero vectors is 1 and of a zero or non-finite one is 0.
    """
    diff = np.abs(a - r)
    max_abs = math.inf if np.isnan(diff).any() else float(diff.max())
    peak = float(np.abs(r).max())
    max_rel = max_abs / peak if peak > 0 else (0.0 if max_abs == 0 else math.inf)
    na, nr = float(np.linalg.norm(a)), float(np.linalg.norm(r))
    if na == 0 and nr == 0:
        cosine = 1.0
    elif na == 0 or nr == 0 or not (math.isfinite(na) and math.isfinite(nr)):
        cosine = 0.0
    else:
        cosine = float(np.dot(a, r) / (na * nr))
    return max_abs, max_rel, cosine


def agree(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> Agreement:
    """Compare ``got`` with ``ref`` by the module's rule (empty outputs of equal shape agree)."""
    got, ref = np.asarray(got), np.asarray(ref)
    shape, ref_shape = tuple(got.shape), tuple(ref.shape)
    if shape != ref_shape:
        return Agreement(shape, ref_shape, math.inf, math.inf, 0.0, False)
    a = got.astype(np.float64).reshape(-1)
    r = ref.astype(np.float64).reshape(-1)
    if a.size == 0:
        return Agreement(shape, ref_shape, 0.0, 0.0, 1.0, True)
    max_abs, max_rel, cosine = error_stats(a, r)
    passed = not np.isnan(a).any() and (max_abs <= atol or max_rel <= rtol)
    return Agreement(shape, ref_shape, max_abs, max_rel, cosine, bool(passed))
