"""BitStack pass: every supported layer's weight becomes a stack of sign + rank-k blocks.

Rewrites: each ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / GPT-2 ``Conv1D`` becomes a
:class:`~edgestack.compress.layers.CompressedLayer` over a
:class:`~edgestack.compress.layers.BitStackWeight` holding a
:class:`~edgestack.formats.BitStackStack`. Works in place.

Decomposition (:func:`decompose`), for the weight viewed as ``W [m, n]``, residual ``R = W``,
for each block:

1. ``S = sign(R)`` (0 counts as +1), ``A = |R|``;
2. rank-``k`` truncated SVD of ``A`` (float32, :func:`top_singular`):
   ``u = U_k sqrt(s_k)`` ``[m, k]``, ``v = sqrt(s_k) Vh_k`` ``[k, n]``, both cast to float16;
3. ``block = S * (u.float() @ v.float())`` from the **rounded** factors, so the stored stack
   decodes to exactly what was subtracted; ``R -= block``.

Signs are packed with :func:`edgestack.formats.pack_bits` (bit 1 = +1). The blocks are kept
in fitting order, so any prefix is a valid lower tier; ``details["rel_error"][b]`` is the
relative Frobenius error of the ``b+1``-block reconstruction (decreasing), the start of the
importance order the runtime's tiers use.

Activation-aware scaling (BitStack's): with ``calib`` and ``act_aware=True`` (default), the
decomposition runs on ``W diag(s)`` with ``s_j = sqrt(E[x_j^2])`` (normalised to mean 1)
and the stored ``v`` absorbs ``1/s``, so the fit minimises the error on the inputs the
layer sees rather than the raw weight error. The sign of ``W diag(s)`` is that of ``W``.

The scaling is kept exact and compressed at export: ``1/s`` is folded into the stored ``v``
factors (``W diag(s) ~= sum S_i * (u_i v_i)`` gives ``W ~= sum S_i * (u_i (v_i diag(1/s)))``,
and the sign of an entry does not depend on the positive column scale), so the layer needs no
extra input-scale op and the ``BitStackWeight`` op and format are unchanged. BitStack folds
the scale into the previous op; folding into ``v`` works for every layer, whatever precedes it.

GPTQ signs (``signs="auto"`` with ``calib``, the default, or ``"gptq"``): step 1's sign is
replaced by :func:`edgestack.compress.bitstack_fit.gptq_signs`: with the block's magnitude
``M = u @ v`` fitted as above, each sign is chosen column by column (by decreasing input
energy) so that ``S * M`` fits the residual plus the error already made on earlier columns,
spread through the Cholesky factor of the inverse input Hessian ``H = E[x x^T]`` (damped as
the shift pass's GPTQ, :func:`edgestack.compress.gptq.hessian`), i.e. GPTQ with the
two-level quantizer ``{-M_ij, +M_ij}``. The weight-space target stays ``W``: ``R -= S * M``
as before, only the choice of signs changes, so each block minimises the *output* error of
its prefix. ``refit`` rounds of alternating least squares then optionally refit ``u, v``
for the chosen signs in the same metric (:func:`~edgestack.compress.bitstack_fit.refit_factors`).

Fine-tune (``finetune_steps > 0``, needs ``calib``): after the decomposition, the fp16
factors of every block (signs fixed) are trained with Adam to distil the fp32 model's first
output on the calibration batches, each step on a random tier (prefix of the importance
order), then rounded to fp16 again (:func:`~edgestack.compress.bitstack_fit.finetune_factors`).

Importance order (:func:`importance_order`): every block of every matrix gets a measured
gain, the drop of the layer's relative squared error that the block brings: the output
error ``tr(R H R^T) / tr(W H W^T)`` when the input Hessian was collected (GPTQ signs or
refit), else the activation-weighted ``||R diag(s)||^2 / ||W diag(s)||^2`` (the plain weight
error without calibration). The global order is level by
level: every matrix's block ``b`` comes before any matrix's block ``b+1`` (a block only
makes sense after its predecessors), and within a level the blocks are sorted by gain,
largest first (ties by model order). It is stored in ``report.importance_order`` and on the
model (attribute ``edgestack_bitstack_order``, read by :func:`importance_order`); the
packer stores blocks in this order so that each runtime tier is a prefix.
:func:`set_tier` activates a prefix of it in torch (by whole levels, count or bit budget).

Options:
    n_blocks: blocks per layer, 1..64 (default 4).
    k: rank per block (default None: by shape, see :func:`auto_rank`), clamped to
        ``min(m, n)``.
    factor_bits: with ``k=None``, the bits per weight per block that the fp16 factors may
        cost (default 0.25): ``k = max(1, floor(factor_bits * m*n / (16*(m+n))))``. Small
        matrices (384 wide) would pay more than 1 bit/weight per block for k=16.
    act_aware: scale the magnitude fit by the input statistics when ``calib`` is given
        (default True).
    signs: ``"auto"`` (default: with ``calib``, both GPTQ and plain signs are fitted and
        each layer keeps the stack with the lower mean relative output error over its
        blocks; ``"plain"`` without ``calib`` or where the layer saw fewer calibration
        vectors than it has input features), ``"gptq"`` (always GPTQ; needs ``calib``)
        or ``"plain"`` (``sign(R)``).
    refit: rounds of the activation-weighted least-squares refit of ``u, v`` per block,
        0..20 (default 0: on MiniLM it lowered each layer's output error by 5-10% but not
        the model's, at 2.7x the time).
    finetune_steps: 0 (default) or the number of fine-tune steps (see above).
    finetune_lr: Adam learning rate of the fine-tune (default 5e-4; 2e-3 over-fitted).
    max_seconds: wall-clock limit of the fine-tune (default None).
    seed: seed of the fine-tune's batch and tier draws (default 0).
    svd: ``"randomized"`` (default: seeded subspace iteration, :func:`top_singular`, 5-7x
        faster than a full SVD on 384x1536 matrices with block errors equal to 4 digits)
        or ``"exact"`` (``torch.linalg.svd``).
    device: ``"cpu"`` (default) or ``"cuda"`` for the SVDs.
    extra_texts: more sentences of the shipped corpus appended to ``calib`` (an option of
        every method; see :func:`edgestack.compress.compress`).
    skip: module-name prefixes to leave dense.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from edgestack.compress.api import (
    PassContext,
)
from edgestack.compress.bitstack_fit import (
    finetune_factors,
    gptq_signs,
    inverse_factor,
    refit_factors,
)
from edgestack.compress.gptq import h_error, hessian
from edgestack.compress.layers import BitStackWeight, CompressedLayer
from edgestack.compress.options import check_bitstack
from edgestack.compress.report import LayerReport
from edgestack.compress.shift import model_outputs
from edgestack.compress.walk import dense_weight, replace_module
from edgestack.errors import CompressError
from edgestack.formats import BitStackStack, pack_bits

#: Oversampling and power iterations of the randomized SVD.
OVERSAMPLE = 8
POWER_ITERS = 4
_FP16_MAX = 65504.0


def check_options(opts: dict[str, Any]) -> None:
    """Refuse out-of-range bitstack options
    (:func:`edgestack.compress.options.check_bitstack`) and ``device="cuda"`` without
    CUDA."""
    check_bitstack(opts)
    if opts["device"] == "cuda" and not torch.cuda.is_available():
        raise CompressError(
            "option device: 'cuda' was requested but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
            "use device='cpu'"
        )


def auto_rank(m: int, n: int, factor_bits: float) -> int:
    """Rank whose fp16 factors cost at most ``factor_bits`` bits per weight per block."""
    return max(1, min(m, n, math.floor(factor_bits * m * n / (16 * (m + n)))))


def top_singular(a: torch.Tensor, k: int, method: str = "randomized", seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` leading singular triplets ``(U_k [m,k], s_k [k], Vh_k [k,n])`` of ``a``.

    ``"randomized"``: subspace iteration from a seeded Gaussian start (``k + OVERSAMPLE``
    columns, ``POWER_ITERS`` re-orthonormalised power steps), then an exact SVD of the small
    projected matrix; deterministic for a given seed. Falls back to the exact SVD when the
    matrix is too small for that to pay off.
    """
    m, n = a.shape
    q = min(k + OVERSAMPLE, m, n)
    if method == "exact" or 2 * q >= min(m, n):
        uu, s, vh = torch.linalg.svd(a, full_matrices=False)
        return uu[:, :k], s[:k], vh[:k]
    gen = torch.Generator(device=a.device).manual_seed(seed)
    y = a @ torch.randn(n, q, generator=gen, device=a.device, dtype=a.dtype)
    for _ in range(POWER_ITERS):
        y, _ = torch.linalg.qr(y)
        y = a @ (a.t() @ y)
    basis, _ = torch.linalg.qr(y)
    ub, s, vh = torch.linalg.svd(basis.t() @ a, full_matrices=False)
    return (basis @ ub)[:, :k], s[:k], vh[:k]


def decompose(
    w2: torch.Tensor,
    n_blocks: int,
    k: int,
    col_scale: torch.Tensor | None = None,
    device: str = "cpu",
    svd: str = "randomized",
    name: str = "weight",
    weighted_errors: list[float] | None = None,
    h: torch.Tensor | None = None,
    signs: str = "plain",
    refit: int = 0,
) -> tuple[BitStackStack, list[float]]:
    """BitStack-decompose ``w2 [m, n]`` (see the module docstring).

    Args:
        w2: float32 weight matrix.
        n_blocks: number of blocks.
        k: rank per block (<= min(m, n)).
        col_scale: optional positive ``[n]`` column scales (activation-aware fit).
        device: where the SVDs run.
        svd: ``"randomized"`` or ``"exact"`` (see :func:`top_singular`).
        name: the layer's name, for error messages.
        weighted_errors: if a list, filled with the relative error after each block: the
            output error ``sqrt(tr(R H R^T) / tr(W H W^T))`` with ``h``, else in the
            ``diag(col_scale)`` metric (the weight error without either).
        h: optional damped input Hessian ``[n, n]`` (:func:`edgestack.compress.gptq.hessian`),
            needed by ``signs="gptq"`` and ``refit``.
        signs: ``"plain"`` (``sign(R)``) or ``"gptq"`` (:func:`~edgestack.compress.
            bitstack_fit.gptq_signs`; plain without ``h`` or when ``h`` is numerically
            singular even after damping).
        refit: rounds of the ``H``-metric refit of each block's factors (0: none).

    Returns:
        The stack (shape ``[m, n]``; reshape with ``BitStackStack(..., shape)`` for convs)
        and the relative Frobenius error of the weight after each block.
    """
    m, n = w2.shape
    w = w2.to(device=device, dtype=torch.float32)
    s = None if col_scale is None else col_scale.to(device=device, dtype=torch.float32)
    r = w.clone()
    norm = float(torch.linalg.norm(w)) or 1.0
    packed, us, vs, errors, weighted = [], [], [], [], []
    wnorm = (float(torch.linalg.norm(w * s)) or 1.0) if s is not None else 1.0
    hh = None if h is None else h.to(device=device, dtype=torch.float64)
    factor = inverse_factor(hh) if hh is not None and signs == "gptq" else None
    hnorm = (h_error(w, hh) or 1.0) if hh is not None else 1.0
    for block in range(n_blocks):
        sign = torch.where(r >= 0, 1.0, -1.0)
        a = (r * s).abs() if s is not None else r.abs()
        uu, sv, vh = top_singular(a, k, svd, seed=block)
        root = sv.clamp_min(0).sqrt()
        u = uu * root
        v = root[:, None] * vh
        if s is not None:
            v = v / s
        if factor is not None:
            sign = gptq_signs(r, u @ v, factor)
        if refit and hh is not None:
            u, v = refit_factors(r, sign, u, v, hh, refit)
        u16, v16 = u.to(torch.float16), v.to(torch.float16)
        if not (torch.isfinite(u16).all() and torch.isfinite(v16).all()):
            raise CompressError(
                f"bitstack: layer {name!r}: factors overflow float16 (max {_FP16_MAX:g}); "
                f"the weight's magnitudes reach {float(w.abs().max()):.3g}: rescale the layer "
                "or use another method"
            )
        r -= sign * (u16.float() @ v16.float())
        packed.append(pack_bits((sign > 0).to(torch.uint8).cpu().numpy()))
        us.append(u16.cpu().numpy())
        vs.append(v16.cpu().numpy())
        errors.append(float(torch.linalg.norm(r)) / norm)
        if hh is not None:
            weighted.append(math.sqrt(max(0.0, h_error(r, hh)) / hnorm))
        elif s is not None:
            weighted.append(float(torch.linalg.norm(r * s)) / wnorm)
    stack = BitStackStack(np.stack(packed), np.stack(us), np.stack(vs), (m, n))
    if weighted_errors is not None:
        weighted_errors.extend(weighted if (s is not None or hh is not None) else errors)
    return stack, errors


def _column_scale(mean_sq: torch.Tensor) -> torch.Tensor:
    s = mean_sq.clamp_min(0).sqrt()
    mean = float(s.mean())
    if mean <= 0:
        return torch.ones_like(s, dtype=torch.float32)
    s = (s / mean).clamp_min(1e-2)  # dead inputs: keep the fit defined, v stays in range
    return s.to(torch.float32)


def run(ctx: PassContext) -> None:
    """Replace each layer of ``ctx.layers`` by its BitStack twin (see module docstring)."""
    o = ctx.options
    check_options(o)   # the CUDA check (the values were checked before any work)
    layers = ctx.decodable_layers()
    ctx.require_calib([opt for opt, on in (("signs='gptq'", o["signs"] == "gptq"),
                                           ("finetune_steps", o["finetune_steps"] > 0)) if on],
                      " (signs: the input Hessian of every layer; fine-tune: the inputs to "
                      "distil on)", "use signs='plain', finetune_steps=0")
    targets = None
    if o["finetune_steps"] > 0:
        targets = model_outputs(ctx.model, ctx.calib)
    use_h = ctx.calib is not None and (o["signs"] != "plain" or o["refit"] > 0)
    stats = {}
    if ctx.calib is not None and (o["act_aware"] or use_h):
        stats = ctx.input_stats(layers,
                                gram=(lambda lay: lay.kind == "linear") if use_h else False)
    signs = "plain" if o["signs"] == "plain" else "gptq"
    replacements = []
    gains: list[tuple[int, float, int, str]] = []
    for layer in ctx.iterate(layers, "bitstack"):
        w = dense_weight(layer).cpu()
        m = w.shape[0]
        w2 = w.reshape(m, -1)
        n = w2.shape[1]
        k = auto_rank(m, n, o["factor_bits"]) if o["k"] is None else min(o["k"], m, n)
        scale = None
        st = stats.get(layer.name)
        if st is not None and o["act_aware"] and getattr(layer.module, "groups", 1) == 1:
            # a grouped conv's rows read different inputs: no common column scale
            scale = _column_scale(st.column_mean_sq(n))
        h = None
        if use_h and st is not None and st.gram is not None and st.gram.shape[0] == n:
            h = hessian(st.gram, st.gram_count)
        used = signs if h is not None else "plain"
        if used == "gptq" and o["signs"] == "auto" and st.gram_count < n:
            used = "plain"  # fewer input vectors than features: H is rank-deficient
        werr: list[float] = []
        stack2, errors = decompose(w2, o["n_blocks"], k, scale, o["device"], o["svd"],
                                   layer.name, werr, h=h, signs=used,
                                   refit=o["refit"] if h is not None else 0)
        if used == "gptq" and o["signs"] == "auto":
            # keep GPTQ's signs only where they lower the layer's mean output error over
            # the tiers (they can lose from the third block on, e.g. on small random layers)
            werr_p: list[float] = []
            plain = decompose(w2, o["n_blocks"], k, scale, o["device"], o["svd"],
                              layer.name, werr_p, h=h, signs="plain", refit=o["refit"])
            if sum(werr_p) < sum(werr):
                (stack2, errors), werr, used = plain, werr_p, "plain"
        prev = 1.0
        for b, e in enumerate(werr):
            gains.append((b, -(prev * prev - e * e), len(gains), layer.name))
            prev = e
        stack = BitStackStack(stack2.signs, stack2.u, stack2.v, tuple(w.shape))
        new = CompressedLayer.like(layer, BitStackWeight(stack)).to(layer.module.weight.device)
        replacements.append((layer, new))
        ctx.report.layers.append(LayerReport(
            layer.name, layer.kind, tuple(w.shape), 4 * w.numel(), stack.nbytes,
            {"k": k, "n_blocks": o["n_blocks"], "act_aware": scale is not None,
             "signs": used,
             "refit": o["refit"] if h is not None else 0,
             "rel_error": [round(e, 6) for e in errors],
             "bytes_per_block": BitStackStack.bytes_per_block(m, n, k),
             "gains": [round(-g[1], 8) for g in gains[-len(werr):]]},
        ))
    for layer, new in replacements:
        replace_module(ctx.model, layer.name, new)
    # level-major, then largest gain first, then model order
    order = [(name, b) for b, _g, _i, name in sorted(gains, key=lambda t: (t[0], t[1], t[2]))]
    ctx.report.importance_order = order
    ctx.model.edgestack_bitstack_order = list(order)
    if o["finetune_steps"] > 0 and replacements:
        info = finetune_factors(ctx.model, [(lay.name, new) for lay, new in replacements],
                                order, ctx.calib, targets, o["finetune_steps"],
                                o["finetune_lr"], o["max_seconds"], o["seed"], ctx.progress)
        ctx.report.details["finetune"] = info
        for rep, (lay, new) in zip(ctx.report.layers, replacements, strict=True):
            fmt = new.weight_module.to_format()
            # the original module, no longer in the model, still holds the untouched weight
            # (the fine-tune trains only the new layers' factors)
            w = dense_weight(lay).cpu()
            w = w.reshape(w.shape[0], -1).numpy()
            norm = float(np.linalg.norm(w)) or 1.0
            rep.details["rel_error"] = [
                round(float(np.linalg.norm(fmt.decode(b + 1).reshape(w.shape) - w)) / norm, 6)
                for b in range(fmt.n_blocks)]
            rep.details["finetuned"] = True
    ctx.report.details["importance_order"] = "level-major; within a level by measured " \
        "relative error decrease" + (" (output error, input Hessian)" if use_h else
                                     " (activation-weighted)" if stats else "")


def importance_order(model: nn.Module) -> list[tuple[str, int]]:
    """The global BitStack block order stored on ``model`` by the pass (see module doc).

    Raises:
        CompressError: the model was not compressed with the bitstack pass.
    """
    order = getattr(model, "edgestack_bitstack_order", None)
    if not order:
        raise CompressError(
            "the model holds no BitStack importance order; compress it with method "
            "'bitstack' first (or read report.importance_order)"
        )
    return [(str(n), int(b)) for n, b in order]


def check_order(order: list[tuple[str, int]], blocks: dict[str, int]) -> None:
    """Check the invariants of an importance order against ``{layer: n_blocks}``.

    Every ``(layer, b)`` appears once, each layer's blocks appear in increasing order, and
    the order is level-major (no block ``b+2`` before every layer has block ``b+1``).

    Raises:
        CompressError: an invariant does not hold (says which).
    """
    seen = set()
    expected = {(n, b) for n, nb in blocks.items() for b in range(nb)}
    last_level = 0
    for pos, (name, b) in enumerate(order):
        if (name, b) in seen or (name, b) not in expected:
            raise CompressError(f"importance order: entry #{pos} {(name, b)} is repeated or "
                                "unknown")
        if b > 0 and (name, b - 1) not in seen:
            raise CompressError(f"importance order: {(name, b)} before its block {b - 1}")
        if b < last_level:
            raise CompressError(f"importance order: level {b} entry at #{pos} after level "
                                f"{last_level} started")
        last_level = b
        seen.add((name, b))
    if seen != expected:
        missing = sorted(expected - seen)[:3]
        raise CompressError(f"importance order misses {len(expected - seen)} block(s), e.g. "
                            f"{missing}")


def set_tier(model: nn.Module, report: Any = None, *, levels: int | None = None,
             count: int | None = None, max_bits: float | None = None) -> dict[str, Any]:
    """Activate a prefix of the global importance order in ``model``'s BitStack layers.

    Give exactly one of ``levels`` (whole levels: every matrix gets that many blocks),
    ``count`` (the first ``count`` entries), or ``max_bits`` (the longest prefix whose
    stored bits per weight stay within ``max_bits``; at least one level).

    Returns:
        ``{"count", "bytes", "bits_per_weight", "blocks": {layer: active blocks}}``.
    """
    order = list(report.importance_order) if report is not None and \
        getattr(report, "importance_order", None) else importance_order(model)
    weights = {name: mod.weight_module for name, mod in model.named_modules()
               if isinstance(getattr(mod, "weight_module", None), BitStackWeight)}
    if sum(x is not None for x in (levels, count, max_bits)) != 1:
        raise CompressError("set_tier: give exactly one of levels, count, max_bits")
    per_block = {}
    numel = 0
    for name, bw in weights.items():
        mshape, k = bw.shape[0], int(bw.u.shape[2])
        n = int(np.prod(bw.shape[1:]))
        per_block[name] = BitStackStack.bytes_per_block(mshape, n, k)
        numel += mshape * n
    if levels is not None:
        count = sum(1 for _, b in order if b < levels)
    elif max_bits is not None:
        total, count = 0, 0
        first_level = sum(1 for _, b in order if b < 1)
        for i, (name, _b) in enumerate(order):
            total += per_block[name]
            if i >= first_level and 8 * total / max(1, numel) > max_bits:
                break
            count = i + 1
    count = max(0, min(int(count), len(order)))
    active = {name: 0 for name in weights}
    for name, _b in order[:count]:
        active[name] += 1
    if any(v == 0 for v in active.values()):
        raise CompressError("set_tier: a tier must give every matrix at least one block "
                            f"(prefix of {count} entries of {len(order)})")
    nbytes = 0
    for name, bw in weights.items():
        bw.active_blocks = active[name]
        nbytes += active[name] * per_block[name]
    return {"count": count, "bytes": nbytes,
            "bits_per_weight": round(8 * nbytes / max(1, numel), 4), "blocks": active}
