"""Calibration-aware fitting of BitStack blocks: GPTQ sign choice, factor refit, fine-tune.

The first two work in the metric of the layer's input Hessian ``H = E[x x^T]`` (damped, see
:func:`edgestack.compress.gptq.hessian`): the error of a weight ``D`` is the expected
squared output error ``trace(D H D^T)`` (:func:`edgestack.compress.gptq.h_error`).

- :func:`gptq_signs`: given the residual ``R`` a block must fit and the block's magnitude
  ``M`` (``u @ v``), choose each sign of ``S`` so that ``S * M`` approximates ``R`` column
  by column, in order of decreasing input energy, spreading each column's error onto the
  columns not yet done through the upper Cholesky factor of ``H^-1`` (GPTQ with the
  two-level quantizer ``{-M_ij, +M_ij}``).
- :func:`refit_factors`: with the signs fixed, alternating least squares on ``u`` (exact,
  ``k x k`` solve per row) and ``v`` (preconditioned conjugate gradients: ``H`` couples the
  columns) minimising ``trace((R - S * (u v)) H (R - S * (u v))^T)``.
- :func:`finetune_factors`: distillation of the fp32 model into the fp16 factors of all
  blocks (signs fixed) on the calibration batches.

The stored format does not change: a block is still ``sign * (u @ v)`` with fp16 factors.
"""

from __future__ import annotations

import torch

from edgestack.compress.api import progress_iter
from edgestack.compress.finetune import batch_loss, freeze, target_norms
from edgestack.compress.gptq import GPTQ_BLOCK, gptq_columns, h_error, inverse_factor
from edgestack.compress.layers import BitStackWeight
from edgestack.formats import BitStackStack

#: Ridge added to the per-row ``k x k`` systems of the ``u`` step, relative to their trace.
RIDGE = 1e-6


def gptq_signs(r: torch.Tensor, mag: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor],
               block: int = GPTQ_BLOCK) -> torch.Tensor:
    """Signs ``S`` (float32 ``{-1, +1}``, ``[m, n]``) such that ``S * mag`` fits ``r``
    in the ``H`` metric, chosen GPTQ-style (see the module docstring).

    Args:
        r: the residual to fit, float32 ``[m, n]``.
        mag: the block's magnitude ``u @ v`` (entries may be negative: the sign is then
            chosen so that ``S * mag`` has the sign of the error-corrected target).
        factor: :func:`inverse_factor` of ``H``.
        block: columns per lazy update.
    """
    mag32 = mag.to(torch.float32)
    signs = torch.empty(r.shape, dtype=torch.float32, device=r.device)

    def choose(col: torch.Tensor, j: int) -> torch.Tensor:
        mj = mag32[:, j]
        s = torch.where(col * mj >= 0, 1.0, -1.0)
        signs[:, j] = s
        return s * mj

    gptq_columns(r, factor, choose, block)
    return signs


def refit_factors(r: torch.Tensor, signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                  h: torch.Tensor, iters: int = 2, cg_steps: int = 8
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Refit ``u [m, k]``, ``v [k, n]`` for fixed ``signs`` to minimise the ``H``-metric error
    of ``r - signs * (u @ v)`` (alternating least squares, ``iters`` rounds).

    Returns the new factors (float32, balanced so that ``u``'s columns and ``v``'s rows have
    equal norms, which keeps them in float16 range); the input factors are returned when
    the refit does not lower the error.
    """
    r = r.to(torch.float32)
    hf = h.to(torch.float32)
    m, k = u.shape
    u0, v0 = u.to(torch.float32), v.to(torch.float32)
    base = h_error(r - signs * (u0 @ v0), h)
    u, v = u0.clone(), v0.clone()
    rh_s = (r @ hf) * signs  # S * (R H), fixed: the right-hand sides of both steps
    hdiag = torch.diagonal(hf)
    for _ in range(iters):
        # u step: per row i, (B_i H B_i^T) u_i = B_i H r_i with B_i = v * s_i
        rhs = rh_s @ v.t()  # [m, k]
        lhs = torch.empty(m, k, k, dtype=torch.float32)
        for c in range(k):
            p = ((signs * v[c]) @ hf) * signs  # [m, n]: S * ((S * v_c) H)
            lhs[:, :, c] = p @ v.t()
        lhs = 0.5 * (lhs + lhs.transpose(1, 2))
        tr = torch.diagonal(lhs, dim1=1, dim2=2).sum(1).clamp_min(1e-30)
        lhs = lhs + (RIDGE * tr)[:, None, None] * torch.eye(k)
        try:
            u = torch.linalg.solve(lhs.to(torch.float64), rhs.to(torch.float64)[:, :, None]
                                   )[:, :, 0].to(torch.float32)
        except RuntimeError:
            break
        # v step: A(v) = u^T (S * ((S * (u v)) H)) = u^T (S * (R H)), by Jacobi-PCG
        b = u.t() @ rh_s

        def apply(x: torch.Tensor, u: torch.Tensor = u) -> torch.Tensor:
            return u.t() @ (((signs * (u @ x)) @ hf) * signs)

        prec = ((u * u).sum(0)[:, None] * hdiag[None, :]).clamp_min(1e-30)
        x = v.clone()
        res = b - apply(x)
        z = res / prec
        p = z.clone()
        rz = float((res * z).sum())
        for _ in range(cg_steps):
            ap = apply(p)
            denom = float((p * ap).sum())
            if denom <= 0 or rz <= 0:
                break
            alpha = rz / denom
            x = x + alpha * p
            res = res - alpha * ap
            z = res / prec
            rz_new = float((res * z).sum())
            p = z + (rz_new / rz) * p
            rz = rz_new
        v = x
    # balance the scale between u's columns and v's rows
    nu = torch.linalg.norm(u, dim=0).clamp_min(1e-30)
    nv = torch.linalg.norm(v, dim=1).clamp_min(1e-30)
    c = (nv / nu).sqrt()
    u, v = u * c, v / c[:, None]
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        return u0, v0
    if h_error(r - signs * (u @ v), h) >= base:
        return u0, v0
    return u, v




class _TrainableStack(torch.nn.Module):
    """Training twin of a :class:`~edgestack.compress.layers.BitStackWeight`: the signs stay
    fixed (int8 buffer), ``u`` and ``v`` are float32 parameters; ``active`` blocks decode."""

    def __init__(self, bw: torch.nn.Module) -> None:
        super().__init__()
        fmt = bw.to_format()
        nb = fmt.n_blocks
        signs = torch.stack([torch.from_numpy(fmt.sign_matrix(b)).to(torch.int8)
                             for b in range(nb)])
        device = bw.u.device
        self.register_buffer("signs", signs.to(device))
        self.u = torch.nn.Parameter(bw.u.detach().float().clone())
        self.v = torch.nn.Parameter(bw.v.detach().float().clone())
        self.shape = list(bw.shape)
        self.active = int(bw.active_blocks)

    def forward(self) -> torch.Tensor:
        b = self.active
        mag = torch.bmm(self.u[:b], self.v[:b])
        return (self.signs[:b].to(mag.dtype) * mag).sum(0).reshape(self.shape)


def finetune_factors(
    model: torch.nn.Module,
    layers: list[tuple[str, torch.nn.Module]],
    order: list[tuple[str, int]],
    calib: list[dict],
    targets: list[torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    max_seconds: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Distil the fp32 model into the BitStack layers by training the fp16 factors ``u, v``
    (signs fixed) on the calibration batches.

    Each step draws a calibration batch and a tier (a prefix of the importance ``order``,
    from one whole level to all blocks, uniformly over its length) so that every tier is
    trained, not only the full stack; the loss is the masked mean squared error of the first
    output against the fp32 model's (``targets``), relative to the target's power. At the
    end the factors are rounded to float16 and every layer gets its full stack active.

    Args:
        model: holds the ``CompressedLayer`` s of ``layers`` (modified in place).
        layers: ``(name, CompressedLayer over BitStackWeight)`` pairs.
        order: the global importance order (``[(layer, block)]``).
        calib, targets: calibration batches and the fp32 outputs on them.
        steps, lr, max_seconds, seed: Adam steps, learning rate, wall-clock limit, seed of
            the batch and tier draws (reproducible for a seed).
        progress: tqdm bar.

    Returns:
        ``{"steps", "seconds", "loss_first", "loss_last"}``.
    """
    import time

    device = targets[0].device
    trainers = {name: _TrainableStack(layer.weight_module) for name, layer in layers}
    saved = {name: layer.weight_module for name, layer in layers}
    thaw = freeze(model)
    for name, layer in layers:
        layer.weight_module = trainers[name]
    params = [p for tr in trainers.values() for p in (tr.u, tr.v)]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    first_level = sum(1 for _, b in order if b < 1)
    batches = torch.randint(0, len(calib), (steps,), generator=gen).tolist()
    counts = torch.randint(first_level, len(order) + 1, (steps,), generator=gen).tolist()
    norms = target_norms(targets)
    t0 = time.perf_counter()
    done, first, last = 0, None, None
    try:
        with torch.enable_grad():
            for step in progress_iter(range(steps), progress, "bitstack fine-tune",
                                      total=steps):
                if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                    break
                active = dict.fromkeys(trainers, 0)
                for name, _b in order[:counts[step]]:
                    active[name] += 1
                for name, tr in trainers.items():
                    tr.active = max(1, active.get(name, 0))
                loss = batch_loss(model, calib, targets, norms, batches[step], device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                last = float(loss.detach())
                first = last if first is None else first
    finally:
        thaw()
        with torch.no_grad():
            for name, layer in layers:
                tr, old = trainers[name], saved[name]
                u16, v16 = tr.u.detach().half(), tr.v.detach().half()
                ok = bool(torch.isfinite(u16).all() and torch.isfinite(v16).all())
                if not ok:  # float16 overflow: keep the fitted factors of this layer
                    layer.weight_module = old
                    continue
                fmt = old.to_format()
                stack = BitStackStack(fmt.signs, u16.cpu().numpy(), v16.cpu().numpy(),
                                      fmt.shape)
                layer.weight_module = BitStackWeight(stack).to(device)
    return {"steps": done, "seconds": round(time.perf_counter() - t0, 2),
            "loss_first": first, "loss_last": last}


__all__ = ["GPTQ_BLOCK", "finetune_factors", "gptq_signs", "inverse_factor", "refit_factors"]
