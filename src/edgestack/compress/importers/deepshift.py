"""DeepShift checkpoints -> edgestack shift codes with zero (``ShiftCodes(zero=True)``).

Upstream: github.com/mostafaelhoushi/DeepShift, ``pytorch/deepshift/modules.py`` (PS),
``modules_q.py`` (Q), ``convert.py`` (``round_shift_weights``), ``utils.py``, ``ste.py``.

Layouts, per converted layer ``<layer>`` (``nn.Linear`` -> ``LinearShift[Q]``,
``nn.Conv2d`` -> ``Conv2dShift[Q]``; every other tensor keeps its usual name):

- DeepShift-PS: ``<layer>.shift`` and ``<layer>.sign``, float, the shape of the dense weight
  (``[out, in]``; ``[out, in/groups, kh, kw]``), plus ``<layer>.bias``. The forward pass uses
  ``w = 2 ** round(clamp(shift, -(2**(weight_bits-1) - 2), 0)) * sign(round(sign))``
  (``torch.round``: half to even); ``sign(round(sign)) == 0`` is a zero weight. The training
  checkpoint (``checkpoint.pth.tar``: ``{"state_dict": ...}``, keys often prefixed
  ``module.``) holds the unrounded values; ``weights.pth`` (saved after
  ``round_shift_weights``) holds ``shift.round()`` and ``sign.round().sign()`` and a bias
  rounded to 16.16 fixed point. Both convert to the same weights.
- DeepShift-Q: ``<layer>.weight``. In ``weights.pth`` it is already rounded to signed powers
  of two (``sign(w) * 2 ** round(log2|w|)``, zero stays zero); a layer is taken as
  DeepShift-Q when every non-zero ``|w|`` is a power of two. The training checkpoint holds
  the unrounded shadow weight: such layers are indistinguishable from dense ones and are
  loaded dense (the report says so).

Conversion (exact): per layer, each weight is ``s * 2**p`` with ``s`` in {-1, 0, +1}. Each
output channel gets ``scale = 2**max(p)`` over its non-zero weights, codes hold
``e = max(p) - p`` and the all-ones exponent field for zeros. ``bits`` is the smallest in
2..5 whose ``2**(bits-1) - 1`` levels cover the widest channel's exponent span
(DeepShift's default ``weight_bits=5``, 15 exponents, fits in 5 bits). A wider span raises
CheckpointError unless ``clamp=True``, which raises the exponents below
``max(p) - 14`` to that level (as DeepShift's own range clamp would; those weights change).
Decoded weights equal the upstream weights bit for bit (checked on every layer).

Options:
    weight_bits: apply upstream's forward-pass clamp of PS shifts to
        ``[-(2**(weight_bits-1) - 2), 0]`` before rounding (default None: use the stored
        values as they are; a warning names layers holding shifts above 0).
    clamp: see above (default False).

Not reproduced: DeepShift rounds activations (and conv biases) to 16.16 fixed point inside
its forward pass; the imported model computes in float32 with the bias as stored.
"""

from __future__ import annotations

import numpy as np
import torch

from edgestack.compress.importers.common import (
    ImportReport,
    bias_parameter,
    check_shape,
    group_by_module,
    layer_shape,
)
from edgestack.compress.layers import CompressedLayer, ShiftWeight
from edgestack.compress.walk import LayerInfo, iter_layers, replace_module
from edgestack.errors import CheckpointError, InternalError
from edgestack.formats import ShiftCodes, pack_uint
from edgestack.formats.shift import MAX_BITS, MIN_BITS, levels

OPTIONS = {"weight_bits": None, "clamp": False}


def shift_codes_from_pow2(name: str, sign: np.ndarray, exponent: np.ndarray,
                          clamp: bool = False) -> tuple[ShiftCodes, str, list[str]]:
    """Exact shift codes (with zero) for weights ``sign * 2**exponent``.

    Args:
        name: layer name, for messages.
        sign: int array ``[out, ...]`` of -1, 0, +1 (0: zero weight).
        exponent: int64 array of the same shape (ignored where sign is 0).
        clamp: clamp exponent spans wider than 5-bit codes allow instead of raising.

    Returns:
        ``(codes, details, warnings)``.
    """
    shape = tuple(int(d) for d in sign.shape)
    out = shape[0]
    s = sign.reshape(out, -1).astype(np.int64)
    p = exponent.reshape(out, -1).astype(np.int64)
    nz = s != 0
    has = nz.any(axis=1)
    pmax = np.where(has, np.where(nz, p, np.iinfo(np.int64).min).max(axis=1), 0)
    pmin = np.where(has, np.where(nz, p, np.iinfo(np.int64).max).min(axis=1), 0)
    if has.any() and (pmax[has].max() > 127 or pmin[has].min() < -149):
        raise CheckpointError(
            f"layer {name!r}: DeepShift exponents run from 2^{int(pmin[has].min())} to "
            f"2^{int(pmax[has].max())}, outside float32 (2^-149 .. 2^127); expected shifts "
            "in DeepShift's range (-14..0 for weight_bits=5); pass weight_bits to clamp them"
        )
    span = pmax - pmin
    widest = int(span.max()) if out else 0
    notes: list[str] = []
    bits = next((b for b in range(MIN_BITS, MAX_BITS + 1) if levels(b, True) >= widest + 1),
                None)
    if bits is None:
        top = levels(MAX_BITS, True)
        c = int(span.argmax())
        if not clamp:
            raise CheckpointError(
                f"layer {name!r}: DeepShift exponents span {widest + 1} powers of two in "
                f"output channel {c} (2^{int(pmax[c])} down to 2^{int(pmin[c])}); shift codes "
                f"with zero hold at most {top} per channel ({MAX_BITS} bits); retrain with "
                f"weight_bits <= {MAX_BITS}, or pass clamp=True to raise the smaller exponents "
                f"to 2^(max-{top - 1}) (those weights change)"
            )
        bits = MAX_BITS
        low = pmax[:, None] - (top - 1)
        n_clamped = int((nz & (p < low)).sum())
        p = np.maximum(p, low)
        notes.append(
            f"layer {name!r}: clamped {n_clamped} weight(s) whose exponent was more than "
            f"{top - 1} below their channel's largest (clamp=True; they are now larger)"
        )
    zero_field = levels(bits, True)
    e = np.where(nz, pmax[:, None] - p, zero_field)
    neg = (s < 0).astype(np.int64)
    codes = (neg << (bits - 1)) | e
    scale = np.where(has, np.ldexp(np.float32(1), pmax.astype(np.int32)), np.float32(1))
    result = ShiftCodes(pack_uint(codes, bits), scale.astype(np.float32), shape, bits, True)
    expected = np.where(nz, s * np.ldexp(np.float32(1), p.astype(np.int32)), 0).astype(np.float32)
    if not np.array_equal(result.decode().reshape(out, -1), expected):
        raise InternalError(f"layer {name!r}: shift codes do not decode to the DeepShift weights")
    details = (f"bits={bits} (zero), widest exponent span {widest + 1}, "
               f"exponents 2^{int(pmin[has].min()) if has.any() else 0}"
               f"..2^{int(pmax[has].max()) if has.any() else 0}")
    return result, details, notes


def _ps_weight(name: str, shift: torch.Tensor, sign: torch.Tensor, weight_bits: int | None,
               report: ImportReport) -> tuple[np.ndarray, np.ndarray]:
    sh = shift.detach().to(torch.float32)
    sg = sign.detach().to(torch.float32)
    if not (torch.isfinite(sh).all() and torch.isfinite(sg).all()):
        raise CheckpointError(
            f"layer {name!r}: DeepShift shift/sign hold NaN or Inf; expected finite values; "
            "fix or retrain the layer"
        )
    if weight_bits is not None:
        sh = sh.clamp(-(2 ** (int(weight_bits) - 1) - 2), 0)
    elif (sh.round() > 0).any():
        report.warnings.append(
            f"layer {name!r}: some rounded shifts are above 0 (weights > 1); DeepShift's "
            "forward pass clamps shifts to <= 0: pass weight_bits to reproduce that clamp"
        )
    s = torch.sign(torch.round(sg)).to(torch.int64).numpy()
    p = torch.round(sh).to(torch.int64).numpy()
    return s, p


def _q_weight(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """(sign, exponent) when every non-zero weight is a signed power of two, else None."""
    w = w.detach().to(torch.float32)
    nz = w != 0
    if not nz.any() or not torch.isfinite(w).all():
        return None
    mant, ex = torch.frexp(w)
    if not (mant.abs()[nz] == 0.5).all():
        return None
    return torch.sign(w).to(torch.int64).numpy(), (ex.to(torch.int64) - 1).numpy()


def convert(model: torch.nn.Module, state: dict[str, torch.Tensor], report: ImportReport,
            weight_bits: int | None = None, clamp: bool = False) -> tuple[list[str], set[str]]:
    """Replace DeepShift layers of ``model`` by shift-coded layers.

    Returns:
        ``(replaced layer names, consumed checkpoint keys)``.
    """
    if weight_bits is not None and (not isinstance(weight_bits, int) or not 2 <= weight_bits <= 16):
        raise CheckpointError(
            f"deepshift: weight_bits must be an integer in 2..16 (DeepShift's --weight_bits), "
            f"found {weight_bits!r}"
        )
    groups = group_by_module(state)
    replaced: list[str] = []
    consumed: set[str] = set()
    for layer in list(iter_layers(model)):
        leaves = groups.get(layer.name, {})
        shape = layer_shape(layer)
        if "shift" in leaves or "sign" in leaves:
            if "shift" not in leaves or "sign" not in leaves:
                have, lack = ("sign", "shift") if "sign" in leaves else ("shift", "sign")
                raise CheckpointError(
                    f"layer {layer.name!r}: the checkpoint has {layer.name}.{have} but no "
                    f"{layer.name}.{lack}; DeepShift-PS layers store both; check that the "
                    "checkpoint is complete"
                )
            for leaf in ("shift", "sign"):
                check_shape(layer.name, leaves[leaf], state[leaves[leaf]], shape,
                            "DeepShift stores shift/sign in the dense weight's shape")
            s, p = _ps_weight(layer.name, state[leaves["shift"]], state[leaves["sign"]],
                              weight_bits, report)
            what = "DeepShift-PS"
            consumed |= {leaves["shift"], leaves["sign"]}
        elif "weight" in leaves:
            w = state[leaves["weight"]]
            if layer.transposed:  # GPT-2 Conv1D stores its weight as [in, out]
                w = w.t()
            check_shape(layer.name, leaves["weight"], w, shape)
            sp = _q_weight(w)
            if sp is None:
                report.dense[layer.name] = (
                    "weight is not all signed powers of two (a dense layer, or an unrounded "
                    "DeepShift-Q training checkpoint: save weights.pth after "
                    "round_shift_weights); loaded dense"
                )
                continue
            s, p = sp
            what = "DeepShift-Q"
            consumed.add(leaves["weight"])
        else:
            report.dense[layer.name] = "no shift/sign or weight tensors in the checkpoint"
            continue
        codes, details, notes = shift_codes_from_pow2(layer.name, s, p, clamp)
        report.warnings += notes
        new = CompressedLayer.like(layer, ShiftWeight(codes))
        new.bias = _bias(layer, leaves, state, consumed)
        replace_module(model, layer.name, new)
        replaced.append(layer.name)
        report.converted[layer.name] = f"{what} -> shift codes, {details}"
    if not replaced:
        raise CheckpointError(
            "deepshift: no layer of the checkpoint is a DeepShift layer; expected "
            "<layer>.shift + <layer>.sign (DeepShift-PS) or a <layer>.weight of signed powers "
            f"of two (DeepShift-Q, as saved after round_shift_weights); found keys like "
            f"{', '.join(repr(k) for k in list(state)[:5])}"
        )
    return replaced, consumed


def _bias(layer: LayerInfo, leaves: dict[str, str], state: dict[str, torch.Tensor],
          consumed: set[str]) -> torch.nn.Parameter | None:
    if "bias" not in leaves:
        if getattr(layer.module, "bias", None) is not None:
            raise CheckpointError(
                f"layer {layer.name!r}: the model's layer has a bias but the checkpoint has no "
                f"{layer.name}.bias; DeepShift keeps the layer's bias; check the checkpoint"
            )
        return None
    t = state[leaves["bias"]]
    check_shape(layer.name, leaves["bias"], t, (layer_shape(layer)[0],))
    consumed.add(leaves["bias"])
    return bias_parameter(t)
