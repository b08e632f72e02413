"""DeepShift checkpoints -> edgestack shift codes (``ShiftCodes``, with zero where needed).

Upstream: github.com/mostafaelhoushi/DeepShift, ``pytorch/deepshift/modules.py`` (PS),
``modules_q.py`` (Q), ``convert.py`` (``round_shift_weights``), ``utils.py``, ``ste.py``.

Layouts, per converted layer ``<layer>`` (``nn.Linear`` -> ``LinearShift[Q]``,
``nn.Conv2d`` -> ``Conv2dShift[Q]``; every other tensor keeps its usual name):

- DeepShift-PS: ``<layer>.shift`` and ``<layer>.sign``, float, the shape of the dense weight
  (``[out, in]``; ``[out, in/groups, kh, kw]``), plus ``<layer>.bias``. The forward pass uses
  ``w = 2 ** round(clamp(shift, -(2**(weight_bits-1) - 2), 0)) * sign(round(sign))``
  (``torch.round``: half to even); ``sign(round(sign)) == 0`` is a zero weight. The training
  checkpoint holds the unrounded values; ``weights.pth`` (saved after
  ``round_shift_weights``) holds ``shift.round()`` and ``sign.round().sign()`` and a bias
  rounded to 16.16 fixed point. Both convert to the same weights.
- DeepShift-Q: ``<layer>.weight``. In ``weights.pth`` it is already rounded to signed powers
  of two (``round_shift_weights``: ``clampabs(w, 2**-(2**(weight_bits-1) - 1), 1)`` then
  ``sign(w) * 2 ** round(log2|w|)``; zero stays zero): at the default ``weight_bits=5`` the
  exponents run from 0 down to -15, 16 of them. A layer is taken as DeepShift-Q when every
  non-zero ``|w|`` is a power of two. The training checkpoint holds the unrounded shadow
  weight: such layers are indistinguishable from dense ones and are loaded dense (the report
  says so).

Files (``imagenet.py``, ``cifar10.py``): the training checkpoint ``checkpoint.pth.tar`` is
``{"epoch", "arch", "state_dict", "best_acc1", "optimizer", "lr_scheduler"}``, where
``lr_scheduler`` is a pickled scheduler object (``StepLR``/``MultiStepLR`` in ``cifar10.py``,
None in ``imagenet.py``) and ``best_acc1`` a tensor or a numpy scalar; it is read without
constructing those objects (:mod:`edgestack.compress.importers.pickled`; the report's
``skipped`` names them). ``model.pth`` (``torch.save(model)``) is read the same way: the
tensors of the pickled module, no class constructed. State-dict keys carry ``module.``
(``DataParallel`` around the model) or, for AlexNet and VGG, ``features.module.`` (the
ImageNet script wraps only ``model.features``); both are mapped to the model's names.

Conversion (exact): per layer, each weight is ``s * 2**p`` with ``s`` in {-1, 0, +1}. Each
output channel gets ``scale = 2**max(p)`` over its non-zero weights, codes hold
``e = max(p) - p``. A layer holding a zero weight gets codes with zero (the all-ones exponent
field; ``2**(bits-1) - 1`` exponents per channel), a layer without one zero-free codes
(``2**(bits-1)`` exponents). ``bits`` is the smallest in 2..5 that covers the widest channel's
exponent span: DeepShift-PS at ``weight_bits=5`` (15 exponents and zero) fits 5-bit codes with
zero, DeepShift-Q at ``weight_bits=5`` (16 exponents, no zero) 5-bit zero-free codes. A wider
span (a larger ``weight_bits``, or a DeepShift-Q layer holding an exact zero and all 16
exponents) raises CheckpointError unless ``clamp=True``, which raises the exponents more than
``levels - 1`` below their channel's largest to that level (as DeepShift's own range clamp
would); the report says how many weights change and by how much at most. Decoded weights
equal the upstream weights bit for bit (checked on every layer).

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
    """Exact shift codes for weights ``sign * 2**exponent``.

    A layer holding a zero weight gets codes with zero (``2**(bits-1) - 1`` levels); a layer
    without one gets zero-free codes (``2**(bits-1)`` levels: DeepShift-Q's default
    ``weight_bits=5`` spans 16 exponents, which only zero-free 5-bit codes hold).

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
    zero = bool((~nz).any())
    has = nz.any(axis=1)
    pmax = np.where(has, np.where(nz, p, np.iinfo(np.int64).min).max(axis=1), 0)
    pmin = np.where(has, np.where(nz, p, np.iinfo(np.int64).max).min(axis=1), 0)
    if has.any() and (pmax[has].max() > 127 or pmin[has].min() < -149):
        raise CheckpointError(
            f"layer {name!r}: DeepShift exponents run from 2^{int(pmin[has].min())} to "
            f"2^{int(pmax[has].max())}, outside float32 (2^-149 .. 2^127); expected shifts "
            "in DeepShift's range (-14..0 for weight_bits=5); pass weight_bits (`--weight-bits` "
            "on the CLI) to clamp them"
        )
    span = pmax - pmin
    widest = int(span.max()) if out else 0
    notes: list[str] = []
    bits = next((b for b in range(MIN_BITS, MAX_BITS + 1) if levels(b, zero) >= widest + 1),
                None)
    if bits is None:
        c = int(span.argmax())
        choice = min((_re_express(s, p, nz, pmax, zf) for zf in ((True, False) if zero
                                                                   else (False,))),
                     key=lambda r: r[0])
        if not clamp:
            n_changed, what = choice[:2]
            why = (f"the layer holds {int((~nz).sum())} zero weight(s), so exact codes need "
                   f"the zero field and hold {levels(MAX_BITS, True)} magnitudes per channel "
                   f"({MAX_BITS} bits; {levels(MAX_BITS, False)} without a zero weight in the "
                   "layer)" if zero else
                   f"shift codes hold at most {levels(MAX_BITS, False)} magnitudes per channel "
                   f"({MAX_BITS} bits)")
            raise CheckpointError(
                f"layer {name!r}: DeepShift exponents span {widest + 1} powers of two in "
                f"output channel {c} (2^{int(pmax[c])} down to 2^{int(pmin[c])}); {why}; "
                f"pass clamp=True (`--clamp` on the CLI) to import it with {n_changed} weight(s) "
                f"changed: {what}"
            )
        _, what, s, p, zero = choice
        bits = MAX_BITS
        nz = s != 0
        notes.append(f"layer {name!r}: clamped (clamp=True): {what}")
    zero_field = levels(bits, True)
    e = np.where(nz, pmax[:, None] - p, zero_field if zero else 0)
    neg = (s < 0).astype(np.int64)
    codes = (neg << (bits - 1)) | e
    scale = np.where(has, np.ldexp(np.float32(1), pmax.astype(np.int32)), np.float32(1))
    result = ShiftCodes(pack_uint(codes, bits), scale.astype(np.float32), shape, bits, zero)
    expected = np.where(nz, s * np.ldexp(np.float32(1), p.astype(np.int32)), 0).astype(np.float32)
    if not np.array_equal(result.decode().reshape(out, -1), expected):
        raise InternalError(f"layer {name!r}: shift codes do not decode to the DeepShift weights")
    details = (f"bits={bits} ({'with zero' if zero else 'zero-free'}), widest exponent span "
               f"{widest + 1}, exponents 2^{int(pmin[has].min()) if has.any() else 0}"
               f"..2^{int(pmax[has].max()) if has.any() else 0}")
    return result, details, notes


def _re_express(s: np.ndarray, p: np.ndarray, nz: np.ndarray, pmax: np.ndarray,
                zero: bool) -> tuple[int, str, np.ndarray, np.ndarray, bool]:
    """The nearest weights 5-bit codes (``zero``: with the zero field) hold, for a layer whose
    exponent span is too wide: exponents more than ``levels - 1`` below their channel's
    largest rise to that level; zero-free, zero weights become ``+2^(largest-15)`` too.

    Returns:
        ``(weights changed, what changed, sign, exponent, zero)``.
    """
    top = levels(MAX_BITS, zero)
    low = pmax[:, None] - (top - 1)
    hit = nz & (p < low)
    # a clamped weight grows from 2^p to 2^low (by less than 2^low); a zero becomes 2^low
    grow = np.where(hit, np.exp2(low.astype(np.float64)) - np.exp2(p.astype(np.float64)), 0.0)
    if not zero:
        grow = np.where(nz, grow, np.exp2(low.astype(np.float64)))
    n_hit, n_zero = int(hit.sum()), 0 if zero else int((~nz).sum())
    parts = [f"{n_hit} weight(s) more than {top - 1} exponents below their channel's largest "
             f"rise to 2^(largest-{top - 1})"] if n_hit else []
    if n_zero:
        parts.append(f"{n_zero} zero weight(s) become +2^(largest-{top - 1}) (zero-free codes)")
    what = (" and ".join(parts) + f" (largest change {float(grow.max()):.3g}; no change "
            f"exceeds 2^(largest-{top - 1}))")
    p = np.maximum(p, low)
    if not zero:  # (a zero's own exponent is meaningless)
        s, p = np.where(nz, s, 1), np.where(nz, p, low)
    return n_hit + n_zero, what, s, p, zero


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
