"""Straight-through-estimator fine-tune of shift codes (the ``finetune_*`` options of ``shift``).

After rounding, every shift layer gets a trainable twin (:class:`TrainableShift`): a latent
weight ``r`` in units of the channel scale and a log-scale ``t`` per output channel. The
forward pass uses the shift-rounded latents ``round(r) * s0 * exp(t)`` (exact shift values;
the gradient is passed straight through the rounding, and reaches the scale LSQ-style), and
the model's output on calibration batches is distilled towards the fp32 model's output
(cached once, before the layers are replaced: no teacher forward per step). At the end the
latents are rounded once more, so the model holds exact shift codes again.

Schedule and selection: Adam with a linear warm-up over the first :data:`WARMUP` of the
steps and a cosine decay to zero; a share of the calibration batches (``val_fraction``) is
held out of training, the held-out loss is measured every ``eval_every`` steps, and the
latents with the lowest held-out loss are kept (early stopping without a second data set).
Everything is seeded: the same inputs, steps and seed give the same codes (on one machine
and thread count; a ``max_seconds`` stop depends on the machine's speed).

:func:`finetune_shift` is the entry point; the shift pass calls it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgestack.compress.api import (
    first_tensor,
    inputs_to,
    progress_iter,
)
from edgestack.compress.layers import ShiftWeight
from edgestack.compress.options import FINETUNE_PARAMS
from edgestack.errors import CompressError
from edgestack.formats import ShiftCodes
from edgestack.formats.shift import levels

#: Share of the steps spent on the linear learning-rate warm-up.
WARMUP = 0.05
PARAMS = FINETUNE_PARAMS


def shift_unit(r: torch.Tensor, n_levels: int, zero: bool) -> torch.Tensor:
    """Shift-round ``r`` (float32, in units of the channel scale): ``±2^-e``, ``e`` in
    ``0..n_levels-1`` (``0`` below half the smallest level when ``zero``).

    Same values as :func:`edgestack.compress.shift.shift_values` with unit scales (nearest
    level in the linear domain, midpoints ``0.75 * 2^-e`` rounding up), computed on the
    float32 bit pattern: adding half a mantissa and clearing the mantissa rounds a
    magnitude to the nearest power of two. Several times faster than ``log2``/``exp2``,
    which matters because it runs over every weight at every step.
    """
    a = r.detach().abs().to(torch.float32).contiguous()
    mag = ((a.view(torch.int32) + (1 << 22)) & -(1 << 23)).view(torch.float32)
    smallest = 2.0 ** -(n_levels - 1)
    mag = mag.clamp_(smallest, 1.0)
    if zero:
        mag = torch.where(a < 0.5 * smallest, 0.0, mag)
    return torch.where(r.detach() < 0, -mag, mag)


def fake_quant_uint8(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded the way ONNX's ``DynamicQuantizeLinear`` rounds a GEMM input (uint8,
    asymmetric, one scale and zero point per tensor: ``scale = (max(x, 0) - min(x, 0)) /
    255``, ``zp = round(-min / scale)``), then dequantized; the gradient passes straight
    through. The range is taken per batch element (the served graph sees one sequence a
    call), over every token, padding included, as the served graph does."""
    dims = tuple(range(1, x.dim())) or (0,)
    xd = x.detach()
    lo = xd.amin(dim=dims, keepdim=True).clamp(max=0.0)
    hi = xd.amax(dim=dims, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp_min(torch.finfo(torch.float32).tiny)
    zp = torch.round(-lo / scale).clamp(0.0, 255.0)
    y = ((torch.round(xd / scale) + zp).clamp(0.0, 255.0) - zp) * scale
    return x + (y - xd)


def _fake_quant_input(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (fake_quant_uint8(args[0]), *args[1:])


class _ShiftSTE(torch.autograd.Function):
    """``round(r) * s[:, None]`` forward; straight-through gradient to ``r`` and ``s``."""

    @staticmethod
    def forward(ctx: Any, r: torch.Tensor, s: torch.Tensor, n_levels: int,
                zero: bool) -> torch.Tensor:
        q = shift_unit(r, n_levels, zero)
        ctx.save_for_backward(q, s)
        return q * s[:, None]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q, s = ctx.saved_tensors
        return grad * s[:, None], (grad * q).sum(1), None, None


class TrainableShift(nn.Module):
    """Training twin of a shift weight: latent ``r`` (weight / initial scale ``s0``) and
    log-scale ``t`` per output channel; ``forward()`` gives the shift-rounded weight."""

    def __init__(self, w2: torch.Tensor, scale: torch.Tensor, bits: int, zero: bool,
                 shape: list[int]) -> None:
        super().__init__()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.register_buffer("s0", safe.clone())
        self.r = nn.Parameter((w2 / safe[:, None]).clone())
        self.t = nn.Parameter(torch.zeros_like(safe))
        self.bits, self.zero, self.shape = bits, zero, shape
        self.n_levels = levels(bits, zero)

    def scale(self) -> torch.Tensor:
        """The current per-channel scale ``s0 * exp(t)``."""
        return self.s0 * torch.exp(self.t)

    def unit(self) -> torch.Tensor:
        """The current unit codes ``±2^-e`` (no gradient)."""
        return shift_unit(self.r, self.n_levels, self.zero)

    def forward(self) -> torch.Tensor:
        return _ShiftSTE.apply(self.r, self.scale(), self.n_levels, self.zero).reshape(
            self.shape)

    def to_codes(self) -> ShiftCodes:
        """The exact shift codes of the current latents and scales."""
        with torch.no_grad():
            scale = self.scale().detach().cpu().to(torch.float32)
            q = self.unit().cpu() * scale[:, None]
        return ShiftCodes.encode(q.reshape(self.shape).numpy(), self.bits, self.zero,
                                 scale=scale.numpy())


def distill_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                 norm: float) -> torch.Tensor:
    """Mean squared error of ``out`` vs ``target`` over real tokens, divided by ``norm``
    (the target's mean square): token-level distillation of the last hidden state."""
    d = (out - target).pow(2)
    if mask is not None and d.dim() == 3 and tuple(mask.shape) == tuple(d.shape[:2]):
        m = mask[..., None].to(d.dtype)
        return (d * m).sum() / (m.sum() * d.shape[-1]).clamp_min(1) / norm
    return d.mean() / norm


def target_norms(targets: list[torch.Tensor]) -> list[float]:
    """Per target, its mean square (1.0 where it is 0): the ``norm`` of :func:`distill_loss`."""
    return [float(t.pow(2).mean()) or 1.0 for t in targets]


def batch_loss(model: nn.Module, calib: list[dict[str, Any]], targets: list[torch.Tensor],
               norms: list[float], i: int, device: torch.device) -> torch.Tensor:
    """:func:`distill_loss` of ``model`` on calibration batch ``i`` against ``targets[i]``."""
    kw = inputs_to(calib[i], device)
    return distill_loss(first_tensor(model(**kw)), targets[i], kw.get("attention_mask"),
                        norms[i])


def freeze(model: nn.Module) -> Callable[[], None]:
    """Turn off ``requires_grad`` on every parameter of ``model``; returns the function that
    restores each one's flag (call it in a ``finally``)."""
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in saved:
        p.requires_grad_(False)

    def thaw() -> None:
        for p, flag in saved.items():
            p.requires_grad_(flag)

    return thaw


def lr_factor(step: int, steps: int, warmup: float = WARMUP) -> float:
    """Learning-rate multiplier at ``step`` of ``steps``: linear warm-up, cosine decay."""
    w = max(1, int(round(warmup * steps)))
    if step < w:
        return (step + 1) / w
    p = (step - w) / max(1, steps - w)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


def split_batches(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of training and held-out calibration batches (seeded; at least one each
    when ``val_fraction > 0`` and ``n >= 2``)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def finetune_shift(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    calib: list[dict[str, Any]],
    targets: list[torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    max_seconds: float | None = None,
    seed: int = 0,
    progress: bool = False,
    params: str = "all",
    val_fraction: float = 0.1,
    eval_every: int = 50,
    act_quant: bool = False,
) -> dict[str, Any]:
    """STE fine-tune of the shift layers of ``model`` towards ``targets`` (module doc).

    Args:
        model: the model whose shift layers (``CompressedLayer`` over ``ShiftWeight``) are
            listed in ``layers``; modified in place (new exact codes and scales; with
            ``params="all+norms"`` also its LayerNorm weights and the layers' biases).
        layers: ``(name, CompressedLayer)`` pairs.
        calib: calibration batches; ``targets[i]`` is the fp32 model's output on batch ``i``.
        steps: number of optimiser steps (one training batch each, order drawn from
            ``seed``); the learning-rate schedule spans ``steps``.
        lr: peak Adam learning rate.
        max_seconds: wall-clock limit (the best latents so far are kept).
        seed: seed of the batch order and of the held-out split.
        progress: tqdm bar.
        params: ``"all"`` (latents and log-scales), ``"scales"`` (log-scales only) or
            ``"all+norms"`` (also the biases of the shift layers and LayerNorm affine
            parameters, which stay fp32).
        val_fraction: share of the batches held out for the early stop (0: none; the last
            latents are kept).
        eval_every: steps between held-out evaluations.
        act_quant: fake-quantize the input of every shift ``linear`` layer during the
            fine-tune (training and held-out loss) the way the int8 serving graph does
            (:func:`fake_quant_uint8`: ``DynamicQuantizeLinear``, uint8 per tensor), so the
            codes are tuned for the error they are served with (``ort-cpu``
            ``int8=dynamic``).

    Returns:
        ``{"steps", "seconds", "loss_first", "loss_last", "val_loss_first", "val_loss_best",
        "best_step", "train_batches", "val_batches"}`` (``loss_*``: mean training loss of
        the first / last ``eval_every`` steps).

    Raises:
        CompressError: ``calib`` and ``targets`` differ in length, or ``params`` is unknown.
    """
    if len(calib) != len(targets) or not calib:
        raise CompressError(
            f"finetune: expected one target per calibration batch, found {len(calib)} "
            f"batch(es) and {len(targets)} target(s)"
        )
    if params not in PARAMS:
        raise CompressError(f"finetune: params must be one of {PARAMS}, found {params!r}")
    device = targets[0].device
    trainers: list[tuple[nn.Module, TrainableShift]] = []
    for _name, layer in layers:
        sw = layer.weight_module
        fmt = sw.to_format()
        w2 = torch.from_numpy(fmt.decode()).reshape(fmt.shape[0], -1).to(device)
        tr = TrainableShift(w2, sw.scale.detach().to(device), fmt.bits, fmt.zero,
                            list(fmt.shape)).to(device)
        trainers.append((layer, tr))  # r = unit codes: step 0 is the rounded model
    thaw = freeze(model)
    extra: list[nn.Parameter] = []
    if params == "all+norms":
        extra += [layer.bias for layer, _ in trainers if layer.bias is not None]
        extra += [p for mod in model.modules() if isinstance(mod, nn.LayerNorm)
                  for p in mod.parameters(recurse=False)]
    for p in extra:
        p.requires_grad_(True)
    for layer, tr in trainers:
        layer.weight_module = tr
    hooks = [layer.register_forward_pre_hook(_fake_quant_input) for layer, _ in trainers
             if act_quant and getattr(layer, "kind", "linear") == "linear"]
    train = [p for _, tr in trainers for p in ((tr.t,) if params == "scales" else (tr.r, tr.t))]
    groups = [{"params": train}] + ([{"params": extra}] if extra else [])
    try:  # the fused kernel: several times faster than the default on 10^7 parameters
        opt = torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # device/dtype without a fused kernel
        opt = torch.optim.Adam(groups, lr=lr)
    tr_idx, val_idx = split_batches(len(calib), val_fraction, seed)
    gen = torch.Generator().manual_seed(seed)
    order = [tr_idx[i] for i in torch.randint(0, len(tr_idx), (steps,), generator=gen).tolist()]
    norms = target_norms(targets)

    def loss_of(i: int) -> torch.Tensor:
        return batch_loss(model, calib, targets, norms, i, device)

    def val_loss() -> float | None:
        if not val_idx:
            return None
        with torch.no_grad():
            return sum(float(loss_of(i)) for i in val_idx) / len(val_idx)

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in train + extra]

    t0 = time.perf_counter()
    done, window, first, last = 0, [], None, None
    val_first = best_val = val_loss()
    best, best_step = snapshot(), 0
    try:
        with torch.enable_grad():
            for k, i in enumerate(progress_iter(order, progress, "shift fine-tune", total=steps)):
                if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                    break
                for g in opt.param_groups:
                    g["lr"] = lr * lr_factor(k, steps)
                loss = loss_of(i)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                window.append(float(loss.detach()))
                if len(window) == eval_every or done == steps:
                    mean = sum(window) / len(window)
                    first = mean if first is None else first
                    last, window = mean, []
                    v = val_loss()
                    if v is not None and v < best_val:
                        best_val, best, best_step = v, snapshot(), done
                    elif v is None:
                        best, best_step = None, done
        if window:  # stopped by max_seconds mid-window
            last = sum(window) / len(window)
            first = last if first is None else first
            v = val_loss()
            if v is not None and v < best_val:
                best_val, best, best_step = v, None, done
            elif v is None:
                best, best_step = None, done
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            if best is not None:
                for p, b in zip(train + extra, best, strict=True):
                    p.copy_(b)
        thaw()
        for layer, tr in trainers:
            layer.weight_module = ShiftWeight(tr.to_codes()).to(device)
    return {"steps": done, "seconds": round(time.perf_counter() - t0, 2),
            "loss_first": first, "loss_last": last, "val_loss_first": val_first,
            "val_loss_best": best_val, "best_step": best_step,
            "train_batches": len(tr_idx), "val_batches": len(val_idx)}


__all__ = ["PARAMS", "TrainableShift", "batch_loss", "distill_loss", "fake_quant_uint8",
           "finetune_shift", "freeze", "lr_factor", "shift_unit", "split_batches", "target_norms"]
