"""Low-rank pass: supported layers become two thinner layers ``u(v(x))`` (truncated SVD).

Rewrites: ``nn.Linear`` and GPT-2 ``Conv1D`` become
:class:`~edgestack.compress.layers.LowRankLinear`; ``nn.Conv1d`` / ``nn.Conv2d`` (groups=1)
become :class:`~edgestack.compress.layers.LowRankConv` (a ``k``-channel conv with the
original kernel, then a 1x1 conv). Works in place. Both export as standard ops.

Rank per layer, for the weight viewed as ``[m, n]``:

- ``rank=r``: ``r`` for every layer (clamped to ``min(m, n)``);
- else ``ratio`` (default 0.5): keep that fraction of the layer's parameters,
  ``k = floor(ratio * m*n / (m+n))``.

A layer is factorised only when ``k*(m+n) < m*n`` (else left dense, reason "no gain");
grouped convolutions are left dense.

Factors (:func:`svd_factors`): without calibration, the truncated SVD with singular values
split evenly (as :meth:`LowRankFactors.encode`, in float32 torch for speed). With ``calib``
and ``act_aware=True`` (default), activation-aware SVD: the input second-moment matrix
``C = E[x x^T]`` (for convolutions, of the unfolded patches) is collected with hooks,
shrunk towards its mean diagonal (``alpha = n / (n + tokens)``, at least 0.01, so that
few calibration tokens do not make it singular), and the SVD of
``W L`` (``C = L L^T``) is truncated, giving ``U_k S_k (Vh_k L^-1)``: the rank-``k``
factors minimising the expected output error ``E||(W - W_k) x||^2``. The reported
``rel_error`` is always the weight-space error ``||W - W_k|| / ||W||``.

Options:
    rank: explicit rank (>= 1) for every layer, or None.
    ratio: fraction of parameters kept, in (0, 1] (default 0.5 when ``rank`` is None).
    act_aware: use calibration statistics when ``calib`` is given (default True).
    skip: module-name prefixes to leave dense.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from edgestack.compress.api import (
    InputStats,
    PassContext,
    check_choice,
    check_float,
    check_int,
    collect_input_stats,
    zero_padding_problem,
)
from edgestack.compress.layers import LowRankConv, LowRankLinear
from edgestack.compress.report import LayerReport
from edgestack.compress.walk import LayerInfo, dense_weight, replace_module
from edgestack.errors import CompressError
from edgestack.formats import LowRankFactors

OPTIONS: dict[str, Any] = {"rank": None, "ratio": None, "act_aware": True}
DEFAULT_RATIO = 0.5


def check_options(opts: dict[str, Any]) -> None:
    """Refuse bad low-rank options; fill in the default ``ratio`` when no rank is given."""
    if opts["rank"] is not None and opts["ratio"] is not None:
        raise CompressError(
            f"lowrank: give rank or ratio, not both (found rank={opts['rank']!r}, "
            f"ratio={opts['ratio']!r})"
        )
    if opts["rank"] is not None:
        check_int("rank", opts["rank"], 1, None, "or pass ratio= instead")
    else:
        if opts["ratio"] is None:
            opts["ratio"] = DEFAULT_RATIO
        check_float("ratio", opts["ratio"], 0.0, 1.0, lo_open=True,
                    hint="the fraction of each layer's parameters to keep")
    check_choice("act_aware", opts["act_aware"], (True, False))


def layer_rank(m: int, n: int, rank: int | None, ratio: float | None) -> int:
    """The rank used for an ``[m, n]`` weight."""
    if rank is not None:
        return min(rank, m, n)
    return min(m, n, math.floor(ratio * m * n / (m + n) + 1e-9))


def svd_factors(w2: torch.Tensor, k: int, chol: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``k`` factors ``(u [m,k], v [k,n])`` of ``w2``, singular values split evenly.

    The same split as :meth:`LowRankFactors.encode`, computed with a float32 torch SVD
    (about twice as fast as numpy's float64 one on these sizes). With ``chol`` (``L`` of
    ``C = L L^T``), the SVD is of ``W L`` and ``v`` is mapped back by ``L^-1``.
    """
    mat = w2.float() if chol is None else (w2.double() @ chol).float()
    uu, s, vh = torch.linalg.svd(mat, full_matrices=False)
    root = s[:k].clamp_min(0).sqrt()
    u = uu[:, :k] * root
    v = root[:, None] * vh[:k]
    if chol is not None:  # v @ L = b  <=>  L^T v^T = b^T
        v = torch.linalg.solve_triangular(chol.t(), v.double().t(), upper=True).t().float()
    return u, v


def whitening(st: InputStats, n: int) -> torch.Tensor | None:
    """Cholesky factor ``L`` of the shrunk input second moment (see module docstring)."""
    if st.gram is None or st.gram_count == 0 or st.gram.shape[0] != n:
        return None
    c = st.gram / st.gram_count
    diag_mean = float(torch.diagonal(c).mean())
    if not math.isfinite(diag_mean) or diag_mean <= 0:
        return None
    alpha = max(0.01, n / (n + st.gram_count))
    eye = torch.eye(n, dtype=torch.float64)
    for extra in (0.0, 1e-6, 1e-4, 1e-2):
        chol, info = torch.linalg.cholesky_ex((1 - alpha) * c + (alpha + extra) * diag_mean * eye)
        if int(info) == 0:
            return chol
    return None


def run(ctx: PassContext) -> None:
    """Factorise each layer of ``ctx.layers`` where that saves parameters."""
    o = ctx.options
    plan: list[tuple[LayerInfo, int]] = []
    for layer in ctx.layers:
        problem = zero_padding_problem(layer)
        groups = getattr(layer.module, "groups", 1)
        if problem:
            ctx.skip(layer.name, problem)
            continue
        if groups != 1:
            ctx.skip(layer.name, f"grouped convolution (groups={groups}): low-rank needs "
                                 "groups=1")
            continue
        w = layer.module.weight
        m = int(w.shape[1] if layer.transposed else w.shape[0])
        n = int(w.numel() // m)
        k = layer_rank(m, n, o["rank"], o["ratio"])
        if k < 1:
            ctx.skip(layer.name, f"rank 0 at ratio {o['ratio']} for a {m}x{n} weight")
            continue
        if k * (m + n) >= m * n:
            ctx.skip(layer.name, f"no gain: rank {k} factors hold {k * (m + n)} parameters, "
                                 f"the dense {m}x{n} weight {m * n}")
            continue
        plan.append((layer, k))
    stats: dict[str, InputStats] = {}
    if ctx.calib is not None and o["act_aware"] and plan:
        stats = collect_input_stats(ctx.model, ctx.calib, [lay for lay, _ in plan], gram=True,
                                    progress=ctx.progress)
    replacements = []
    for layer, k in ctx.iterate(plan, "lowrank"):
        w = dense_weight(layer).cpu()
        m = w.shape[0]
        w2 = w.reshape(m, -1)
        chol = whitening(stats[layer.name], w2.shape[1]) if layer.name in stats else None
        u, v = svd_factors(w2, k, chol)
        aware = chol is not None
        if aware and not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            u, v = svd_factors(w2, k)  # degenerate statistics: plain SVD
            aware = False
        factors = LowRankFactors(u.numpy(), v.numpy(), tuple(w.shape))
        if layer.kind == "linear":
            new = LowRankLinear(factors, getattr(layer.module, "bias", None))
        else:
            new = LowRankConv(layer, factors)
        new.to(layer.module.weight.device)
        approx = torch.from_numpy(factors.u) @ torch.from_numpy(factors.v)
        rel = float(torch.linalg.norm(approx - w2) / torch.linalg.norm(w2).clamp_min(1e-30))
        replacements.append((layer, new))
        n = w2.shape[1]
        ctx.report.layers.append(LayerReport(
            layer.name, layer.kind, tuple(w.shape), 4 * w.numel(),
            4 * k * (m + n),  # fp32 factors, as LowRankLinear/LowRankConv store them
            {"rank": k, "max_rank": min(m, n), "params_kept": round(k * (m + n) / (m * n), 4),
             "act_aware": aware, "rel_error": round(rel, 6)},
        ))
    for layer, new in replacements:
        replace_module(ctx.model, layer.name, new)
