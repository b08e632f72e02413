"""The GPTQ column loop shared by the shift pass (shift-grid rounding) and BitStack (signs).

GPTQ quantizes a weight ``W [m, n]`` column by column, in order of decreasing ``diag(H)``
(``H``: the damped input Hessian, :func:`hessian`), and spreads
each column's quantization error onto the columns not yet done through the upper Cholesky
factor of ``H^-1`` (lazy batch updates of :data:`GPTQ_BLOCK` columns), so that the output
error ``trace((W - Q) H (W - Q)^T)`` (:func:`h_error` of ``W - Q``) rather than the weight
error is minimised. What a column is quantized to is the caller's ``quantize`` callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: Columns per lazy GPTQ update (as GPTQ).
GPTQ_BLOCK = 128
#: GPTQ dampening, as a fraction of the mean diagonal of the input Hessian.
GPTQ_DAMP = 0.01


def hessian(gram: torch.Tensor, count: int, damp: float = GPTQ_DAMP) -> torch.Tensor:
    """Damped input Hessian ``E[x x^T] + damp * mean(diag) * I`` (float64)."""
    h = gram.to(torch.float64) / max(1, count)
    diag_mean = float(torch.diagonal(h).mean())
    if not math.isfinite(diag_mean) or diag_mean <= 0:
        diag_mean = 1.0
    return h + damp * diag_mean * torch.eye(h.shape[0], dtype=torch.float64)


def h_error(d: torch.Tensor, h: torch.Tensor) -> float:
    """``trace(D H D^T)`` in float64: the expected squared output error of a weight error
    ``D`` for inputs with second moment ``H``."""
    d64 = d.to(torch.float64)
    return float(((d64 @ h.to(torch.float64)) * d64).sum())


def inverse_factor(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(perm, U)``: columns by decreasing ``diag(H)`` and the upper Cholesky factor of
    the permuted ``H^-1`` (float32), or None when ``H`` is numerically singular."""
    perm = torch.argsort(torch.diagonal(h), descending=True)
    hp = h[perm][:, perm].to(torch.float64)
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)),
                                      upper=True)
    except RuntimeError:
        return None
    return perm, upper.to(torch.float32)


def gptq_columns(w: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor],
                 quantize: Callable[[torch.Tensor, int], torch.Tensor],
                 block: int = GPTQ_BLOCK) -> None:
    """GPTQ-quantize ``w [m, n]`` with the per-column quantizer ``quantize``.

    Args:
        w: the weight (or residual) to quantize (not modified).
        factor: :func:`inverse_factor` of ``H``.
        quantize: ``quantize(col, j)`` gets the error-corrected target ``col`` ``[m]``
            (float32) of column ``j`` (index in ``w``'s own order), returns its quantized
            value ``[m]`` and keeps whatever it needs of the result (the quantized column,
            the codes, the signs): the loop stores nothing.
        block: columns per lazy update.
    """
    perm, hinv = factor
    cols = perm.tolist()
    x = w[:, perm].to(torch.float32).clone()
    n = x.shape[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: thread hand-offs cost more than they give
    try:
        for i1 in range(0, n, block):
            i2 = min(i1 + block, n)
            w1 = x[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            hb = hinv[i1:i2, i1:i2]
            diag = torch.diagonal(hb).clone()
            for j in range(i2 - i1):
                col = w1[:, j]
                qc = quantize(col, cols[i1 + j])
                e_col = (col - qc) / diag[j]
                w1[:, j + 1:].addr_(e_col, hb[j, j + 1:], alpha=-1)
                err1[:, j] = e_col
            if i2 < n:
                x[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)
    finally:
        torch.set_num_threads(threads)


__all__ = ["GPTQ_BLOCK", "GPTQ_DAMP", "gptq_columns", "h_error", "hessian", "inverse_factor"]
