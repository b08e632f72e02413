"""WeLore checkpoints -> :class:`~edgestack.compress.layers.LowRankLinear`.

Upstream: github.com/VITA-Group/WeLore, ``lib/LowRankLayer.py`` (``LowRankLayer``,
``LowRankLayerEval``), ``lib/rank_reduction.py`` (``do_rank_reduction``),
``welore_continual_finetune.py`` (``torch.save(model.state_dict(), ...model_checkpoint.pt)``).

Layout, per factored layer ``<layer>`` (Llama ``self_attn.*_proj`` and ``mlp.*_proj`` whose
rank reduction passed ``min_ratio``):

- ``<layer>.U.weight``: ``[out, k]`` (``U = nn.Linear(k, out, bias=False)``),
- ``<layer>.V.weight``: ``[k, in]`` (``V = nn.Linear(in, k, bias=False)``),
- the forward pass is ``U(V(x))``: V first; bfloat16 tensors.
- No bias: ``LowRankLayer`` drops the original layer's bias (Llama has none). As an
  extension, a ``<layer>.U.bias`` or ``<layer>.bias`` in the checkpoint becomes the bias.

Layers without U/V keep ``<layer>.weight`` and load dense. Keys carry the causal-LM prefix
``model.`` and an unused ``lm_head.weight`` when imported into a bare ``AutoModel``.
Only ``nn.Linear`` (and GPT-2 ``Conv1D``) layers can be factored; U/V on a convolution is
refused. Factors are stored as float32 (bf16 has no edgestack format; the cast is exact);
upstream computes in bf16, the imported layer in float32.
"""

from __future__ import annotations

import torch

from edgestack.compress.importers.common import (
    ImportReport,
    check_shape,
    float_tensor,
    group_by_module,
    layer_shape,
)
from edgestack.compress.layers import LowRankLinear
from edgestack.compress.walk import iter_layers, replace_module
from edgestack.errors import CheckpointError
from edgestack.formats import LowRankFactors

OPTIONS: dict[str, object] = {}


def _factor(t: torch.Tensor):
    t = t.detach()
    if t.dtype in (torch.float32, torch.float16):
        return t.cpu().numpy().copy()
    return float_tensor(t).numpy()


def convert(model: torch.nn.Module, state: dict[str, torch.Tensor],
            report: ImportReport) -> tuple[list[str], set[str]]:
    """Replace layers with WeLore U/V factors by low-rank layers.

    Returns:
        ``(replaced layer names, consumed checkpoint keys)``.
    """
    groups = group_by_module(state)
    replaced: list[str] = []
    consumed: set[str] = set()
    for layer in list(iter_layers(model)):
        u_leaves = groups.get(layer.name + ".U", {})
        v_leaves = groups.get(layer.name + ".V", {})
        if "weight" not in u_leaves and "weight" not in v_leaves:
            report.dense[layer.name] = "no U/V factors in the checkpoint; loaded dense"
            continue
        if "weight" not in u_leaves or "weight" not in v_leaves:
            have, lack = ("U", "V") if "weight" in u_leaves else ("V", "U")
            raise CheckpointError(
                f"layer {layer.name!r}: the checkpoint has {layer.name}.{have}.weight but no "
                f"{layer.name}.{lack}.weight; a WeLore layer stores both factors; check that "
                "the checkpoint is complete"
            )
        if layer.kind != "linear":
            raise CheckpointError(
                f"layer {layer.name!r}: WeLore factors found for a {layer.kind} layer; WeLore "
                "factors only linear layers; check that base is the checkpoint's architecture"
            )
        out, n = layer_shape(layer)
        u, v = state[u_leaves["weight"]], state[v_leaves["weight"]]
        if u.ndim != 2 or v.ndim != 2:
            raise CheckpointError(
                f"layer {layer.name!r}: WeLore U/V must be matrices, found U {list(u.shape)} "
                f"and V {list(v.shape)}"
            )
        k = int(u.shape[1])
        check_shape(layer.name, u_leaves["weight"], u, (out, k), "U is [out, k]")
        check_shape(layer.name, v_leaves["weight"], v, (k, n), "V is [k, in], applied first")
        consumed |= {u_leaves["weight"], v_leaves["weight"]}
        if "bias" in v_leaves:
            if state[v_leaves["bias"]].abs().max() > 0:
                raise CheckpointError(
                    f"layer {layer.name!r}: {v_leaves['bias']} is non-zero; WeLore's V has no "
                    "bias and edgestack's low-rank layer cannot hold one; fold it into the "
                    "layer bias (bias + U @ V.bias) first"
                )
            consumed.add(v_leaves["bias"])
        bias = None
        own = groups.get(layer.name, {})
        for key in (u_leaves.get("bias"), own.get("bias")):
            if key is not None and bias is None:
                bias = state[key]
                check_shape(layer.name, key, bias, (out,))
                consumed.add(key)
        if bias is None and getattr(layer.module, "bias", None) is not None:
            report.warnings.append(
                f"layer {layer.name!r}: the model's layer has a bias but the checkpoint has "
                "none for it (WeLore's LowRankLayer drops it); the imported layer has no bias"
            )
        if "weight" in own:
            report.warnings.append(
                f"layer {layer.name!r}: the checkpoint also holds a dense {own['weight']}; "
                "the U/V factors were used"
            )
        factors = LowRankFactors(_factor(u), _factor(v), (out, n))
        new = LowRankLinear(factors, None if bias is None else float_tensor(bias))
        replace_module(model, layer.name, new)
        replaced.append(layer.name)
        report.converted[layer.name] = f"WeLore U/V -> low-rank, rank {k} of {min(out, n)}"
    if not replaced:
        raise CheckpointError(
            "welore: no layer of the checkpoint has WeLore factors; expected "
            "<layer>.U.weight [out, k] and <layer>.V.weight [k, in]; found keys like "
            f"{', '.join(repr(k) for k in list(state)[:5])}"
        )
    return replaced, consumed
