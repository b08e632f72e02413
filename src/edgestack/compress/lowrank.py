"""Low-rank pass: supported layers become two thinner layers ``u(v(x))`` (truncated SVD).

Rewrites: ``nn.Linear`` and GPT-2 ``Conv1D`` become
:class:`~edgestack.compress.layers.LowRankLinear`; ``nn.Conv1d`` / ``nn.Conv2d`` (groups=1)
become :class:`~edgestack.compress.layers.LowRankConv` (a ``k``-channel conv with the
original kernel, then a 1x1 conv). Works in place. Both export as standard ops.

Rank per layer, for the weight viewed as ``[m, n]``:

- ``rank=r``: ``r`` for every layer (clamped to ``min(m, n)``);
- else ``ratio`` (default 0.5): remove that fraction of the layer's parameters, as
  ``prune``'s ``ratio`` does, so the factors hold at most ``(1 - ratio) * m*n`` of them:
  ``k = floor((1 - ratio) * m*n / (m+n))``. (``ratio`` was once the fraction kept; the
  default 0.5 gives the same rank either way.)

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

Rank from the singular spectrum (``energy=e``, WeLore-style split): the rank of each layer
is the smallest ``k`` whose leading singular values (of ``W L`` when calibrated, so the
output energy) hold a fraction ``e`` of the squared spectrum. Layers whose spectrum decays
fast get a small rank; layers where that ``k`` keeps more than ``max_keep`` of the
parameters do not gain and stay full rank (reported as skipped: WeLore's split into
low-rank and full-rank layers).

Monarch (``structure="monarch"``, linear layers): the weight becomes a
:class:`~edgestack.compress.layers.MonarchLinear` (two block-diagonal factors with a
permutation between them, ``monarch_blocks`` x ``monarch_blocks`` blocks of rank ``t``)
fitted by the exact Frobenius Monarch projection (:func:`~edgestack.compress.layers.
monarch_factors`: one truncated SVD per block); ``t`` follows ``ratio``/``rank`` like the
low-rank ``k`` (parameters ``blocks * t * (m + n)``, at most ``(1 - ratio) * m*n``). It
exports as standard Reshape/Transpose/MatMul. The Monarch fit is not activation-aware
(whitening mixes the column blocks).

Options:
    rank: explicit rank (>= 1) for every layer, or None.
    ratio: fraction of each layer's parameters removed, in [0, 1) (default 0.5 when
        neither ``rank`` nor ``energy`` is given): the same meaning as ``prune``'s.
    energy: rank per layer from the spectrum (see above), in (0, 1), or None.
    max_keep: with ``energy``, the largest fraction of parameters a factorised layer may
        keep (default 0.8); above it the layer stays full rank.
    structure: ``"lowrank"`` (default) or ``"monarch"``.
    monarch_blocks: number of diagonal blocks of a Monarch factor (default 4); layers whose
        sizes it does not divide stay dense.
    act_aware: use calibration statistics when ``calib`` is given (default True).
    extra_texts: more sentences of the shipped corpus appended to ``calib`` (an option of
        every method; see :func:`edgestack.compress.compress`).
    skip: module-name prefixes to leave dense.
"""

from __future__ import annotations

import math

import torch

from edgestack.compress.api import (
    InputStats,
    PassContext,
)
from edgestack.compress.layers import LowRankConv, LowRankLinear, MonarchLinear, monarch_factors
from edgestack.compress.report import LayerReport
from edgestack.compress.walk import LayerInfo, dense_weight, replace_module
from edgestack.formats import LowRankFactors


def ratio_rank(params: int, per_rank: int, ratio: float) -> int:
    """The largest rank whose factors (``per_rank`` parameters per unit of rank) hold at most
    ``(1 - ratio)`` of a weight's ``params``: ``ratio`` is the fraction removed. (The
    ``1e-9`` keeps a product that lands on an integer from rounding down.)"""
    return math.floor((1.0 - ratio) * params / per_rank + 1e-9)


def layer_rank(m: int, n: int, rank: int | None, ratio: float | None) -> int:
    """The rank used for an ``[m, n]`` weight: ``rank`` (clamped), else the rank that removes
    ``ratio`` of its ``m*n`` parameters (:func:`ratio_rank`)."""
    if rank is not None:
        return min(rank, m, n)
    return min(m, n, ratio_rank(m * n, m + n, ratio))


def svd_factors(w2: torch.Tensor, k: int, chol: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``k`` factors ``(u [m,k], v [k,n])`` of ``w2``, singular values split evenly.

    The same split as :meth:`LowRankFactors.encode`, computed with a float32 torch SVD
    (about twice as fast as numpy's float64 one on these sizes). With ``chol`` (``L`` of
    ``C = L L^T``), the SVD is of ``W L`` and ``v`` is mapped back by ``L^-1``.
    """
    return factors_from_svd(whitened_svd(w2, chol), k, chol)


def whitened_svd(w2: torch.Tensor, chol: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float32 SVD ``(U, s, Vh)`` of ``w2`` (of ``W L`` with ``chol``)."""
    mat = w2.float() if chol is None else (w2.double() @ chol).float()
    return torch.linalg.svd(mat, full_matrices=False)


def factors_from_svd(svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int,
                     chol: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`svd_factors` from the :func:`whitened_svd` of the weight."""
    uu, s, vh = svd
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


def spectrum_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` whose leading singular values hold ``energy`` of ``sum(s^2)``."""
    e = s.double().pow(2)
    total = float(e.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor([energy], dtype=cum.dtype)).item()) + 1


def _run_monarch(ctx: PassContext) -> None:
    o = ctx.options
    nb = o["monarch_blocks"]
    replacements = []
    for layer in ctx.iterate(ctx.layers, "monarch"):
        if layer.kind != "linear":
            ctx.skip(layer.name, "monarch: only linear layers")
            continue
        w2 = dense_weight(layer).cpu()
        m, n = w2.shape
        if m % nb or n % nb:
            ctx.skip(layer.name, f"monarch: {m}x{n} does not split into {nb}x{nb} blocks")
            continue
        a, d = m // nb, n // nb
        t = min(o["rank"], a, d) if o["rank"] is not None else \
            min(a, d, ratio_rank(m * n, nb * (m + n), o["ratio"]))
        params = nb * t * (m + n)
        if t < 1 or params >= m * n:
            ctx.skip(layer.name, f"no gain: monarch rank {t} holds {params} parameters, the "
                                 f"dense {m}x{n} weight {m * n}")
            continue
        left, right = monarch_factors(w2, nb, nb, t)
        new = MonarchLinear(left, right, getattr(layer.module, "bias", None))
        new.to(layer.module.weight.device)
        rel = float(torch.linalg.norm(new.dense().cpu() - w2) /
                    torch.linalg.norm(w2).clamp_min(1e-30))
        replacements.append((layer, new))
        ctx.report.layers.append(LayerReport(
            layer.name, layer.kind, (m, n), 4 * m * n, 4 * params,
            {"structure": "monarch", "blocks": nb, "rank": t,
             "params_kept": round(params / (m * n), 4), "rel_error": round(rel, 6)}))
    for layer, new in replacements:
        replace_module(ctx.model, layer.name, new)


def run(ctx: PassContext) -> None:
    """Factorise each layer of ``ctx.layers`` where that saves parameters."""
    o = ctx.options
    if o["structure"] == "monarch":
        _run_monarch(ctx)
        return
    plan: list[tuple[LayerInfo, int]] = []
    for layer in ctx.decodable_layers():
        groups = getattr(layer.module, "groups", 1)
        if groups != 1:
            ctx.skip(layer.name, f"grouped convolution (groups={groups}): low-rank needs "
                                 "groups=1")
            continue
        w = layer.module.weight
        m = int(w.shape[1] if layer.transposed else w.shape[0])
        n = int(w.numel() // m)
        if o["energy"] is not None:
            plan.append((layer, 0))  # rank chosen from the spectrum below
            continue
        k = layer_rank(m, n, o["rank"], o["ratio"])
        if k < 1:
            ctx.skip(layer.name, f"rank 0: removing {o['ratio']:g} of a {m}x{n} weight's "
                                 "parameters leaves less than one rank")
            continue
        if k * (m + n) >= m * n:
            ctx.skip(layer.name, f"no gain: rank {k} factors hold {k * (m + n)} parameters, "
                                 f"the dense {m}x{n} weight {m * n}")
            continue
        plan.append((layer, k))
    stats: dict[str, InputStats] = {}
    if ctx.calib is not None and o["act_aware"] and plan:
        stats = ctx.input_stats([lay for lay, _ in plan], gram=True)
    replacements = []
    for layer, k in ctx.iterate(plan, "lowrank"):
        w = dense_weight(layer).cpu()
        m = w.shape[0]
        w2 = w.reshape(m, -1)
        chol = whitening(stats[layer.name], w2.shape[1]) if layer.name in stats else None
        svd = None
        if k == 0:  # energy: rank from the (whitened) spectrum; full rank when no gain
            svd = whitened_svd(w2, chol)  # one SVD: the spectrum, then the factors
            k = spectrum_rank(svd[1], o["energy"])
            n_ = w2.shape[1]
            if k * (m + n_) > o["max_keep"] * m * n_:
                ctx.skip(layer.name, f"full rank: {o['energy']:g} of the spectrum needs rank "
                                     f"{k}, {k * (m + n_) / (m * n_):.2f} of the parameters "
                                     f"(> max_keep {o['max_keep']:g})")
                continue
        u, v = svd_factors(w2, k, chol) if svd is None else factors_from_svd(svd, k, chol)
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
