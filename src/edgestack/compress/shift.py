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
    rounding: how weights are rounded to codes once the scales are chosen:

        - ``"auto"`` (default): ``"gptq"`` when enough calibration data is given, else
          ``"nearest"`` (measured on MiniLM 4-bit: 0.927 nearest, 0.970 GPTQ cosine on the
          held sentences; docs/quality.md).
        - ``"nearest"``: each weight to its nearest level (fast, no calibration).
        - ``"gptq"`` (needs ``calib``): GPTQ with the shift grid (:func:`gptq_shift`):
          columns are rounded one at a time in order of decreasing input energy and each
          column's rounding error is spread onto the columns not yet rounded through the
          inverse of the input Hessian ``H = E[x x^T]`` (damped), so the *output* error
          ``E||(W - Q) x||^2`` is minimised rather than the weight error. Then every
          channel's scale is refitted by least squares in the ``H`` metric (codes fixed),
          and the GPTQ pass is repeated once with those scales.
    sequential: with ``rounding="gptq"``, collect each layer's Hessian on the model quantized
        so far (earlier layers already replaced; each calibration batch runs only up to the
        layer), as GPTQ does, instead of all from the fp32 model in one pass (default
        False: one pass is several times faster; sequential gained +0.005 cosine on MiniLM).
    bits_per_layer: ``{module-name prefix: bits}`` overriding ``bits`` for matching layers
        (the longest matching prefix wins); bytes are counted per layer, honestly.
    finetune_steps: 0 (default: none) or the number of steps of a straight-through-estimator
        fine-tune (:mod:`edgestack.compress.finetune`, needs ``calib``) that distils the fp32
        model's output (token-level last hidden state, cached once) on the calibration
        batches: latent weights (in units of the channel scale) and per-channel log-scales
        are trained with Adam (linear warm-up, cosine decay), the forward pass uses the
        shift-rounded weights (gradient passed straight through the rounding, LSQ-style for
        the scale), the latents with the lowest loss on held-out calibration batches are
        kept, and at the end they are rounded once more: the model holds exact shift codes.
    finetune_lr: peak Adam learning rate of the fine-tune (default 1e-3).
    finetune_params: ``"all"`` (default: latent weights and scales), ``"scales"`` (only the
        per-channel log-scales: the codes stay those of the rounding) or ``"all+norms"``
        (also the shift layers' biases and the LayerNorm weights, which stay fp32).
    finetune_val: share of the calibration batches held out of the fine-tune to pick the
        best step (default 0.1, at most :data:`MAX_VAL_BATCHES` batches; 0: keep the last).
    finetune_act_quant: False (default) or True: during the fine-tune, round the input of
        every shift linear layer the way the int8 serving graph does (``ort-cpu``
        ``int8=dynamic``: ONNX ``DynamicQuantizeLinear``, uint8, one scale per tensor; the
        gradient passes straight through), so the codes are tuned for the error they are
        served with. Only useful for codes served with integer kernels (``zero=True``,
        ``bits <= 4``: exact int8); the exported model is the same kind of model either way.
    max_seconds: stop the fine-tune after this many seconds (default None: all steps; the
        best latents so far are kept).
    seed: seed of the fine-tune's batch order and held-out split (default 0): the result is
        reproducible for the same inputs and step count.
    extra_texts: more sentences of the shipped corpus appended to ``calib`` (an option of
        every method; see :func:`edgestack.compress.compress`).
    skip: module-name prefixes to leave dense.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from edgestack.compress.api import (
    InputStats,
    PassContext,
    _input_channels,
    _model_device,
    first_tensor,
    inputs_to,
)
from edgestack.compress.calib import check_calib_tokens
from edgestack.compress.finetune import finetune_shift
from edgestack.compress.gptq import GPTQ_BLOCK, gptq_columns, h_error, hessian, inverse_factor
from edgestack.compress.layers import CompressedLayer, ShiftWeight
from edgestack.compress.report import LayerReport
from edgestack.compress.walk import LayerInfo, dense_weight, replace_module
from edgestack.errors import CompressError
from edgestack.formats import ShiftCodes
from edgestack.formats.shift import levels

#: Most calibration batches held out of the fine-tune for its early stop.
MAX_VAL_BATCHES = 8
#: Exponents ``t`` of the candidate scales ``maxabs * 2^-t`` tried by ``scale="mse"``.
SCALE_CANDIDATES = tuple(-0.25 + 1.25 * i / 15 for i in range(16))


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
        # in place on one buffer: |w| - mag * cand, squared (the sign does not matter)
        d = torch.sub(f, t).floor_().clamp_(0, n_levels - 1).neg_().exp2_()
        if zero:
            d.masked_fill_(a < (0.5 * smallest) * cand[:, None], 0.0)
        d.mul_(cand[:, None]).sub_(a).square_()
        err = d.mul_(cw).sum(1) if cw is not None else d.sum(1)
        better = err < best_err
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
    return best


def gptq_shift(w2: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor] | None,
               scale: torch.Tensor, bits: int, zero: bool, block: int = GPTQ_BLOCK
               ) -> torch.Tensor:
    """GPTQ rounding of ``w2 [m, n]`` to shift codes with per-row ``scale``.

    Columns are processed in order of decreasing ``diag(H)``; the error of each rounded
    column is propagated onto the remaining ones with the upper Cholesky factor of ``H^-1``
    (lazy batch updates of ``block`` columns, as in GPTQ; :func:`~edgestack.compress.gptq.
    gptq_columns`). ``factor``: :func:`~edgestack.compress.gptq.inverse_factor` of the
    input Hessian ``H``; None (``H`` numerically singular): plain nearest rounding.

    Returns:
        The rounded weight (float32, exact shift values ``±2^-e * scale``).
    """
    if factor is None:  # numerically singular even after damping: plain rounding
        return shift_values(w2, scale, bits, zero)
    n_levels = levels(bits, zero)
    s32 = scale.to(torch.float32)
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    log_s = torch.log2(safe) + math.log2(1.5)
    zero_below = 0.5 * 2.0 ** -(n_levels - 1) * safe
    q = torch.empty(w2.shape, dtype=torch.float32, device=w2.device)

    def nearest(col: torch.Tensor, j: int) -> torch.Tensor:
        # nearest level in the linear domain (as ShiftCodes.quantize)
        a = col.abs()
        e = torch.floor(log_s - torch.log2(a.clamp_min(1e-38))).clamp_(0, n_levels - 1)
        qc = torch.exp2(-e) * safe
        if zero:
            qc = torch.where((a < zero_below) | (s32 <= 0), 0.0, qc)
        q[:, j] = qc = torch.where(col < 0, -qc, qc)
        return qc

    gptq_columns(w2, factor, nearest, block)
    return q


def refit_scale(w2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, h: torch.Tensor
                ) -> torch.Tensor:
    """Least-squares per-row scale for fixed codes in the ``H`` metric (kept if not better).

    With ``c = Q / scale`` (the unit codes), ``s* = (w H c^T) / (c H c^T)`` per row.
    """
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    c = (q / safe[:, None]).to(torch.float64)
    ch = c @ h
    num = (w2.to(torch.float64) * ch).sum(1)
    den = (c * ch).sum(1)
    new = torch.where(den > 0, num / den.clamp_min(1e-300), scale.to(torch.float64))
    new = torch.where((new > 0) & torch.isfinite(new), new, scale.to(torch.float64))
    return new.to(torch.float32)


class _StopForward(Exception):
    """Raised by a hook once the watched layer has seen its input (the rest is not needed)."""


def layer_input_stats(model: nn.Module, calib: list[dict[str, Any]], layer: LayerInfo
                      ) -> Any:
    """Input statistics (with the Gram matrix for linear layers) of one layer, running each
    calibration batch only up to that layer."""
    st = InputStats(layer, _input_channels(layer), layer.kind == "linear")

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            st.update(args[0])
        raise _StopForward

    handle = layer.module.register_forward_pre_hook(hook)
    device = _model_device(model)
    try:
        for x in calib:
            kw = inputs_to(x, device)
            with contextlib.suppress(_StopForward):
                model(**kw)
    finally:
        handle.remove()
    return st


def layer_bits(name: str, bits: int, per_layer: dict[str, int] | None) -> int:
    """The code width of layer ``name``: the longest matching ``bits_per_layer`` prefix."""
    best, best_len = bits, -1
    for prefix, b in (per_layer or {}).items():
        p = prefix.rstrip(".")
        if (name == p or name.startswith(p + ".") or p == "") and len(p) > best_len:
            best, best_len = int(b), len(p)
    return best


def model_outputs(model: nn.Module, calib: list[dict[str, Any]]) -> list[torch.Tensor]:
    """The first output tensor of ``model(**x)`` for every calibration batch (no grad)."""
    device = _model_device(model)
    outs = []
    with torch.no_grad():
        for x in calib:
            outs.append(first_tensor(model(**inputs_to(x, device))).detach())
    return outs


def _enough_calib(calib: Any) -> bool:
    """Whether ``calib`` is enough data for GPTQ (what ``rounding="auto"`` picks it for)."""
    if not calib:
        return False
    try:
        check_calib_tokens(calib)
    except CompressError:
        return False
    return True


def run(ctx: PassContext) -> None:
    """Replace each layer of ``ctx.layers`` by its shift-coded twin (see module docstring)."""
    o = ctx.options
    bits0, zero, method, rounding = o["bits"], o["zero"], o["scale"], o["rounding"]
    if rounding == "auto":   # the best measured configuration that the data allows
        rounding = "gptq" if _enough_calib(ctx.calib) else "nearest"
    ctx.require_calib([opt for opt, on in (("rounding='gptq'", rounding == "gptq"),
                                           ("finetune_steps", o["finetune_steps"] > 0)) if on])
    layers = ctx.decodable_layers()
    targets = None
    if o["finetune_steps"] > 0:
        targets = model_outputs(ctx.model, ctx.calib)
    stats: dict[str, Any] = {}
    sequential = rounding == "gptq" and o["sequential"]
    if ctx.calib is not None and method != "maxabs" and rounding == "nearest":
        stats = ctx.input_stats(layers)
    elif rounding == "gptq" and not sequential and layers:  # (gptq: calib checked above)
        stats = ctx.input_stats(layers, gram=lambda lay: lay.kind == "linear")
    replacements = []
    for layer in ctx.iterate(layers, "shift"):
        bits = layer_bits(layer.name, bits0, o["bits_per_layer"])
        w = dense_weight(layer).cpu()
        w2 = w.reshape(w.shape[0], -1)
        # sequential: GPTQ sees the inputs of the model quantized so far (earlier layers replaced)
        st = layer_input_stats(ctx.model, ctx.calib, layer) if sequential else stats.get(layer.name)
        col_w = st.column_mean_sq(w2.shape[1]) if st is not None else None
        scale = choose_scale(w2, bits, zero, method, col_w)
        used = "nearest"
        q = shift_values(w2, scale, bits, zero)
        h = None
        if rounding == "gptq" and st is not None and st.gram is not None \
                and st.gram.shape[0] == w2.shape[1]:
            h = hessian(st.gram, st.gram_count)
            base_err = h_error(w2 - q, h)
            best_q, best_s, best_err = q, scale, base_err
            factor = inverse_factor(h)  # one Cholesky per layer, both rounds
            for _ in range(2):
                cand = gptq_shift(w2, factor, best_s, bits, zero)
                s2 = refit_scale(w2, cand, best_s, h)
                cand2 = (cand / torch.where(best_s > 0, best_s, 1.0)[:, None]) * s2[:, None]
                for qq, ss in ((cand, best_s), (cand2, s2)):
                    err = h_error(w2 - qq, h)
                    if err < best_err:
                        best_q, best_s, best_err = qq, ss, err
            q, scale = best_q, best_s
            used = "gptq"
        codes = ShiftCodes.encode((q if used == "gptq" else w2).reshape(w.shape).numpy(),
                                  bits, zero, scale=scale.numpy())
        dec = torch.from_numpy(codes.decode()).reshape(w2.shape)
        rel = float(torch.linalg.norm(dec - w2) / torch.linalg.norm(w2).clamp_min(1e-30))
        new = CompressedLayer.like(layer, ShiftWeight(codes)).to(layer.module.weight.device)
        replacements.append((layer, new))
        if sequential:
            replace_module(ctx.model, layer.name, new)
        details = {"bits": bits, "zero": zero, "scale": method, "rounding": used,
                   "rel_error": round(rel, 6), "calibrated": col_w is not None}
        if h is not None:
            details["output_error_nearest"] = round(base_err, 8)
            details["output_error"] = round(h_error(w2 - dec, h), 8)
        ctx.report.layers.append(LayerReport(
            layer.name, layer.kind, tuple(w.shape), 4 * w.numel(), codes.nbytes, details))
    if not sequential:
        for layer, new in replacements:
            replace_module(ctx.model, layer.name, new)
    if o["finetune_steps"] > 0 and replacements:
        steps = o["finetune_steps"]
        n_val = min(MAX_VAL_BATCHES, round(o["finetune_val"] * len(ctx.calib)))
        info = finetune_shift(ctx.model, [(lay.name, new) for lay, new in replacements],
                              ctx.calib, targets, steps, o["finetune_lr"],
                              o["max_seconds"], o["seed"], ctx.progress,
                              o["finetune_params"], n_val / len(ctx.calib),
                              max(10, steps // 10), o["finetune_act_quant"])
        ctx.report.details["finetune"] = info
        for rep, (_, new) in zip(ctx.report.layers, replacements, strict=True):
            fmt = new.weight_module.to_format()
            rep.details["finetuned"] = True
            rep.compressed_bytes = fmt.nbytes
