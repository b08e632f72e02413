"""BitStack checkpoints -> :class:`~edgestack.compress.layers.BitStackWeight` layers.

Upstream: github.com/xinghaow99/BitStack, ``bitstack/modules/BitStackLinear.py``
(``BitStackLinear``, ``compose_weight``), ``bitstack/utils/pack_utils.py`` (``pack_sign``,
``unpack_sign``), ``bitstack/utils/decompose.py``, ``bitstack/utils/scale_utils.py``,
``bitstack/main.py`` (``model.save_pretrained``).

Layout, per decomposed layer ``<layer>`` (every ``nn.Linear`` in the decoder blocks), blocks
``i = 0 .. n-1`` (``n`` may differ per layer):

- ``<layer>.qweight_{i}``: uint8, flat, ``ceil(out*in/8)`` bytes: the sign matrix of the
  ``[out, in]`` residual, row-major (``weight.view(-1)``), packed MSB-first, bit 1 = +1
  (``pack_sign``: ``(sign + 1) // 2``, ``packed |= bit[j] << (7 - j)``).
- ``<layer>.u_{i}``: float16 ``[out, k]``; ``<layer>.vt_{i}``: float16 ``[k, in]``.
- ``W = sum_i unpack(qweight_i) * (u_i @ vt_i)``; no bias (``from_linear`` asserts the
  layer has none). ``bias_{i}`` buffers, when present, are never used by upstream's forward
  and are ignored here (warned).
- ``--no_avd`` (an ablation): no ``qweight_{i}``, ``W = sum_i u_i @ vt_i``; imported as a
  low-rank layer of rank ``n*k``.
- Activation-aware scales: fused into the previous layer norm / linear by default
  (nothing stored). With ``--no_fuse_scale`` upstream wraps the previous op in
  ``ScaledActivation`` (keys ``<op>.scales`` and ``<op>.act.*``); such checkpoints are
  refused with CheckpointError (they would need the scales folded at float16 precision).

Block order: BitStack ranks the blocks by calibration perplexity
(``reduced_ppl_average.json``) and stacks them by memory (``compression_config.json``), both
beside the weights; :func:`finish` makes that the model's ``edgestack_bitstack_order``
(:mod:`edgestack.compress.importers.bitstack_order`), so a device package's tiers are
upstream's memory-ordered stack.

This layout is exactly edgestack's :class:`~edgestack.formats.BitStackStack`: the blocks are
stacked as they are, bit for bit. A ``<layer>.bias`` in the checkpoint (not upstream) is used
as the bias. For GPT-2 ``Conv1D`` the sign matrix is over ``[out, in]`` (edgestack's
orientation); for convolutions over ``[out, in*kh*kw]``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from edgestack.compress.importers.bitstack_order import apply_importance
from edgestack.compress.importers.common import (
    Checkpoint,
    ImportReport,
    bias_parameter,
    check_shape,
    float_tensor,
    group_by_module,
    layer_shape,
)
from edgestack.compress.layers import BitStackWeight, CompressedLayer, LowRankLinear
from edgestack.compress.walk import iter_layers, replace_module
from edgestack.errors import CheckpointError
from edgestack.formats import BitStackStack, LowRankFactors
from edgestack.formats.bitpack import packed_size

OPTIONS: dict[str, object] = {"importance": None}
_BLOCK = re.compile(r"^(qweight|u|vt|bias)_(\d+)$")


def _refuse_scales(state: dict[str, torch.Tensor]) -> None:
    scaled = sorted(k for k in state if k.endswith(".scales"))
    if scaled:
        raise CheckpointError(
            f"bitstack: the checkpoint holds activation-aware scales ({scaled[0]!r}"
            f"{f' and {len(scaled) - 1} more' if len(scaled) > 1 else ''}) from BitStack's "
            "--no_fuse_scale (ScaledActivation); expected scales fused into the weights; "
            "re-run BitStack without --no_fuse_scale (the default fuses them)"
        )


def _fp16(name: str, what: str, t: torch.Tensor, report: ImportReport) -> np.ndarray:
    h = t.detach().to(torch.float16)
    if t.dtype != torch.float16 and not torch.equal(h.to(t.dtype), t.detach()):
        report.warnings.append(
            f"layer {name!r}: {what} was {t.dtype}, not float16 as BitStack saves it; "
            "rounded to float16"
        )
    return h.cpu().numpy().copy()


def convert(model: torch.nn.Module, state: dict[str, torch.Tensor],
            report: ImportReport, importance: Any = None) -> tuple[list[str], set[str]]:
    """Replace layers with BitStack blocks by BitStack-decoded layers (``importance`` is
    read by :func:`finish`).

    Returns:
        ``(replaced layer names, consumed checkpoint keys)``.
    """
    _refuse_scales(state)
    groups = group_by_module(state)
    replaced: list[str] = []
    consumed: set[str] = set()
    for layer in list(iter_layers(model)):
        leaves = groups.get(layer.name, {})
        blocks: dict[str, dict[int, str]] = {"qweight": {}, "u": {}, "vt": {}, "bias": {}}
        for leaf, key in leaves.items():
            m = _BLOCK.match(leaf)
            if m:
                blocks[m.group(1)][int(m.group(2))] = key
        if not blocks["u"] and not blocks["vt"] and not blocks["qweight"]:
            report.dense[layer.name] = "no BitStack blocks in the checkpoint; loaded dense"
            continue
        avd = bool(blocks["qweight"])
        parts = ("qweight", "u", "vt") if avd else ("u", "vt")
        n = max(max(blocks[p], default=-1) for p in parts) + 1
        for i in range(n):
            have = [p for p in parts if i in blocks[p]]
            lack = [p for p in parts if i not in blocks[p]]
            if lack:
                held = f"{layer.name}.{have[0]}_{i}" if have else f"blocks up to {n - 1}"
                raise CheckpointError(
                    f"layer {layer.name!r}: the checkpoint has {held} but no "
                    f"{', '.join(f'{layer.name}.{p}_{i}' for p in lack)}; every BitStack "
                    f"block i = 0..{n - 1} stores qweight_i, u_i and vt_i; check that the "
                    "checkpoint is complete"
                )
        shape = layer_shape(layer)
        out, cols = shape[0], int(np.prod(shape[1:]))
        u0 = state[blocks["u"][0]]
        if u0.ndim != 2:
            raise CheckpointError(
                f"layer {layer.name!r}: {blocks['u'][0]} has shape {list(u0.shape)}, expected "
                f"a matrix [out={out}, k]"
            )
        k = int(u0.shape[1])
        u_list, v_list, s_list = [], [], []
        for i in range(n):
            u, vt = state[blocks["u"][i]], state[blocks["vt"][i]]
            check_shape(layer.name, blocks["u"][i], u, (out, k), "u_i is [out, k]")
            check_shape(layer.name, blocks["vt"][i], vt, (k, cols), "vt_i is [k, in]")
            u_list.append(_fp16(layer.name, f"u_{i}", u, report))
            v_list.append(_fp16(layer.name, f"vt_{i}", vt, report))
            consumed |= {blocks["u"][i], blocks["vt"][i]}
            if avd:
                q = state[blocks["qweight"][i]]
                check_shape(layer.name, blocks["qweight"][i], q.reshape(-1),
                            (packed_size(out * cols),), "qweight_i is ceil(out*in/8) bytes")
                if q.dtype not in (torch.uint8, torch.int8):
                    raise CheckpointError(
                        f"layer {layer.name!r}: {blocks['qweight'][i]} is {q.dtype}; expected "
                        "uint8 packed signs"
                    )
                s_list.append(q.reshape(-1).view(torch.uint8).cpu().numpy().copy())
                consumed.add(blocks["qweight"][i])
        if blocks["bias"]:
            consumed |= set(blocks["bias"].values())
            report.warnings.append(
                f"layer {layer.name!r}: ignored {len(blocks['bias'])} bias_i buffer(s); "
                "BitStack's forward pass never adds them"
            )
        bias = None
        if "bias" in leaves:
            bias = state[leaves["bias"]]
            check_shape(layer.name, leaves["bias"], bias, (out,))
            consumed.add(leaves["bias"])
        elif getattr(layer.module, "bias", None) is not None:
            report.warnings.append(
                f"layer {layer.name!r}: the model's layer has a bias but the checkpoint has "
                "none for it (BitStackLinear has no bias); the imported layer has no bias"
            )
        if avd:
            stack = BitStackStack(np.stack(s_list), np.stack(u_list), np.stack(v_list), shape)
            new = CompressedLayer.like(layer, BitStackWeight(stack))
            new.bias = bias_parameter(bias)
            what = f"BitStack -> {n} block(s) of rank {k}"
        else:
            if layer.kind != "linear":
                raise CheckpointError(
                    f"layer {layer.name!r}: BitStack --no_avd factors on a {layer.kind} layer "
                    "are not supported; only linear layers"
                )
            factors = LowRankFactors(np.concatenate(u_list, axis=1),
                                     np.concatenate(v_list, axis=0), shape)
            new = LowRankLinear(factors, None if bias is None else float_tensor(bias))
            what = f"BitStack --no_avd -> low-rank, rank {n * k} ({n} x {k})"
        replace_module(model, layer.name, new)
        replaced.append(layer.name)
        report.converted[layer.name] = what
    if not replaced:
        raise CheckpointError(
            "bitstack: no layer of the checkpoint has BitStack blocks; expected "
            "<layer>.qweight_0, <layer>.u_0, <layer>.vt_0, ...; found keys like "
            f"{', '.join(repr(k) for k in list(state)[:5])}"
        )
    return replaced, consumed


def finish(model: torch.nn.Module, ckpt: Checkpoint, report: ImportReport,
           importance: Any = None) -> None:
    """Give the imported model BitStack's own block order
    (:mod:`edgestack.compress.importers.bitstack_order`): from ``importance`` (a file or
    folder), else from ``compression_config.json`` / ``reduced_ppl_average.json`` beside the
    checkpoint; without them the report warns that a package will not be importance-ranked."""
    apply_importance(model, ckpt.where, report, importance)
