"""Shift pass: every supported layer's weight becomes power-of-two codes (DenseShift/DeepShift).

Rewrites: each ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / GPT-2 ``Conv1D`` becomes a
:class:`~edgestack.compress.layers.CompressedLayer` over a
:class:`~edgestack.compress.layers.ShiftWeight` holding
:meth:`ShiftCodes.encode(weight, bits, zero, scale) <edgestack.formats.ShiftCodes.encode>`
(sign + exponent codes, ``bits`` wide, and one fp32 scale per output channel). Works in place.

Options:
    bits: code width, 2..5 (default 4: 8 magnitude levels zero-free).
    zero: False (default) for zero-free DenseShift codes, True for DeepShift codes with zero.
    scale: how each output channel's scale is chosen:

        - ``"maxabs"``: the channel's largest magnitude (the largest weight maps to ``2^0``).
        - ``"mse"`` (default): a search over a few candidates ``maxabs * 2^-t``
          (``t`` in ``[-0.25, 1]``, see :data:`SCALE_CANDIDATES`) keeping, per channel, the
          one with the least squared weight error. Because the levels are powers of two, a
          scale and its half share all but one level, so this one-octave grid covers every
          placement of the levels. With ``calib``, the error of weight column ``j`` is
          weighted by the mean squared input ``E[x_j^2]`` (the diagonal of the layer's
          input Hessian), so the search minimises the expected output error instead.

        The choice is :func:`choose_scale`; calibration-aware refinements plug in there.
    skip: module-name prefixes to leave dense.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from edgestack.compress.api import (
    PassContext,
    check_choice,
    check_int,
    collect_input_stats,
    zero_padding_problem,
)
from edgestack.compress.layers import CompressedLayer, ShiftWeight
from edgestack.compress.report import LayerReport
from edgestack.compress.walk import LayerInfo, dense_weight, replace_module
from edgestack.formats import ShiftCodes
from edgestack.formats.shift import MAX_BITS, MIN_BITS, levels

OPTIONS: dict[str, Any] = {"bits": 4, "zero": False, "scale": "mse"}
SCALES = ("mse", "maxabs")
#: Exponents ``t`` of the candidate scales ``maxabs * 2^-t`` tried by ``scale="mse"``.
SCALE_CANDIDATES = tuple(-0.25 + 1.25 * i / 15 for i in range(16))


def check_options(opts: dict[str, Any]) -> None:
    """Refuse out-of-range shift options."""
    check_int("bits", opts["bits"], MIN_BITS, MAX_BITS, "shift codes are 2..5 bits wide")
    check_choice("zero", opts["zero"], (False, True))
    check_choice("scale", opts["scale"], SCALES)


def shift_values(w2: torch.Tensor, scale: torch.Tensor, bits: int, zero: bool) -> torch.Tensor:
    """Torch twin of ``ShiftCodes.quantize`` + decode: the shift-rounded ``w2 [out, n]``.

    Used to score scales quickly; the stored codes always come from
    :meth:`ShiftCodes.encode`, the reference.
    """
    n_levels = levels(bits, zero)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    r = w2.abs() / safe
    e = torch.floor(-torch.log2(r.clamp_min(1e-38)))
    e = torch.where(r < 0.75 * torch.exp2(-e), e + 1, e).clamp(0, n_levels - 1)
    mag = torch.exp2(-e)
    if zero:
        smallest = 2.0 ** -(n_levels - 1)
        mag = torch.where((r < 0.5 * smallest) | (scale[:, None] <= 0),
                          torch.zeros_like(mag), mag)
    return torch.where(w2 < 0, -mag, mag) * scale[:, None]


def choose_scale(w2: torch.Tensor, bits: int, zero: bool, method: str,
                 col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel scale for ``w2 [out, n]``.

    Args:
        w2: the weight as a float32 matrix.
        bits, zero: the code.
        method: ``"maxabs"`` or ``"mse"`` (see the module docstring).
        col_weight: optional non-negative ``[n]`` (or ``[out, n]``) weights of each
            column's squared error (mean squared input from calibration).

    Returns:
        float32 ``[out]``.
    """
    maxabs = w2.abs().amax(dim=1)
    if method == "maxabs":
        return maxabs
    cw = None
    if col_weight is not None:
        cw = col_weight.to(torch.float32)
        # relative weights, floored so that dead inputs still count a little
        cw = (cw / cw.mean().clamp_min(1e-30)).clamp_min(1e-2)
        if cw.dim() == 1:
            cw = cw[None, :]
    n_levels = levels(bits, zero)
    a = w2.abs()
    # Rounding to the nearest power of two in the linear domain is e = floor(-log2(r) +
    # log2(1.5)) for r = |w| / scale (midpoint 0.75 * 2^-e, as in ShiftCodes.quantize);
    # with scale = maxabs * 2^-t, -log2(r) = f - t, so f is computed once for all t.
    f = (torch.log2(maxabs.clamp_min(1e-38))[:, None] - torch.log2(a.clamp_min(1e-38))
         + math.log2(1.5))
    smallest = 2.0 ** -(n_levels - 1)
    best = maxabs.clone()
    best_err = torch.full_like(maxabs, float("inf"))
    for t in SCALE_CANDIDATES:
        cand = maxabs * 2.0 ** (-t)
        mag = torch.exp2(-torch.floor(f - t).clamp_(0, n_levels - 1))
        if zero:
            mag = torch.where(a < (0.5 * smallest) * cand[:, None], 0.0, mag)
        d = a - mag * cand[:, None]
        d = d * d
        err = (d * cw).sum(1) if cw is not None else d.sum(1)
        better = err < best_err
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
    return best


def run(ctx: PassContext) -> None:
    """Replace each layer of ``ctx.layers`` by its shift-coded twin (see module docstring)."""
    bits, zero, method = ctx.options["bits"], ctx.options["zero"], ctx.options["scale"]
    layers: list[LayerInfo] = []
    for layer in ctx.layers:
        problem = zero_padding_problem(layer)
        if problem:
            ctx.skip(layer.name, problem)
        else:
            layers.append(layer)
    stats = {}
    if ctx.calib is not None and method != "maxabs":
        stats = collect_input_stats(ctx.model, ctx.calib, layers, progress=ctx.progress)
    replacements = []
    for layer in ctx.iterate(layers, "shift"):
        w = dense_weight(layer).cpu()
        w2 = w.reshape(w.shape[0], -1)
        col_w = stats[layer.name].column_mean_sq(w2.shape[1]) if layer.name in stats else None
        scale = choose_scale(w2, bits, zero, method, col_w)
        codes = ShiftCodes.encode(w.numpy(), bits, zero, scale=scale.numpy())
        q = shift_values(w2, torch.from_numpy(codes.scale), bits, zero)
        rel = float(torch.linalg.norm(q - w2) / torch.linalg.norm(w2).clamp_min(1e-30))
        new = CompressedLayer.like(layer, ShiftWeight(codes)).to(layer.module.weight.device)
        replacements.append((layer, new))
        ctx.report.layers.append(LayerReport(
            layer.name, layer.kind, tuple(w.shape), 4 * w.numel(), codes.nbytes,
            {"bits": bits, "zero": zero, "scale": method, "rel_error": round(rel, 6),
             "calibrated": col_w is not None},
        ))
    for layer, new in replacements:
        replace_module(ctx.model, layer.name, new)
