"""FLAP checkpoints -> physically smaller dense layers with bias compensation.

Upstream: github.com/CASIA-IVA-Lab/FLAP, ``lib/prune.py`` (``compress``, ``prune_flap``),
``main.py`` (``get_llm``: zero ``o_proj``/``down_proj`` biases on every layer;
``model.save_pretrained``), ``models/hf_llama/modeling_llama.py``.

Layout: a Hugging Face folder saved by ``save_pretrained`` whose ``config.json`` is the
*unpruned* model's (FLAP never updates it). Per decoder layer, real pruning keeps heads
(``attn_mask.repeat_interleave(head_dim)``) and MLP neurons:

- ``q_proj``/``k_proj``/``v_proj.weight``: ``[kept_heads * head_dim, hidden]``,
- ``o_proj.weight``: ``[hidden, kept_heads * head_dim]`` and ``o_proj.bias`` ``[hidden]``
  (the bias compensation ``(mean_inp * ~mask) @ W_o.T``), even though the config says
  ``attention_bias: false``,
- ``gate_proj``/``up_proj.weight``: ``[kept, hidden]``; ``down_proj.weight``
  ``[hidden, kept]`` and ``down_proj.bias`` ``[hidden]``,
- every layer has the two biases (zero where nothing was pruned); layers may keep
  different counts (``AL-AM``). ``--unstr`` keeps shapes and only adds the biases.
  ``lm_head.weight`` is present (unused by a bare ``AutoModel``).

Import: build the model from config (or take ``base``), give every layer whose checkpoint
weight shape (or bias presence) differs a layer of the checkpoint's shape
(:func:`edgestack.compress.resize.resize_layer_to`), update head counts
(:func:`edgestack.compress.resize.sync_attention_heads`), check that each attention
block's projections agree, then load every tensor strictly. The same works for any model
whose layers were pruned the same way (GPT-2 ``c_attn``/``c_proj``/``c_fc``, BERT
``query``/``key``/``value``/``dense``); a head count comes from the projection width.
"""

from __future__ import annotations

import torch
from torch import nn

from edgestack.compress.importers.common import ImportReport
from edgestack.compress.resize import resize_layer_to, sync_attention_heads
from edgestack.compress.walk import LayerInfo, iter_layers, layer_kind
from edgestack.errors import CheckpointError, CompressError

OPTIONS: dict[str, object] = {}


def _target_shape(layer: LayerInfo, w: torch.Tensor) -> tuple[int, int]:
    """``(out, in)`` features of the layer the checkpoint weight ``w`` belongs to."""
    m = layer.module
    cur = tuple(m.weight.shape)
    if w.ndim != len(cur) or (layer.kind != "linear" and tuple(w.shape[2:]) != cur[2:]):
        raise CheckpointError(
            f"layer {layer.name!r}: checkpoint tensor {layer.name}.weight has shape "
            f"{list(w.shape)}, expected {len(cur)} dimensions like the model's {list(cur)}"
            + ("" if layer.kind == "linear" else " with the same kernel size")
            + "; structured pruning changes only the output/input feature counts"
        )
    if layer.transposed:  # GPT-2 Conv1D stores [in, out]
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1]) * int(getattr(m, "groups", 1))


def _check_attention(model: nn.Module) -> None:
    """Refuse attention blocks whose projections no longer agree after pruning."""

    def fail(name: str, what: str) -> None:
        raise CheckpointError(
            f"attention {name!r}: {what}; FLAP prunes whole heads, so every projection of a "
            "block keeps the same heads; check that the checkpoint matches the config"
        )

    for name, mod in model.named_modules():
        if all(hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            hd = int(mod.head_dim)
            q, k = mod.q_proj.weight.shape[0], mod.k_proj.weight.shape[0]
            v, o_in = mod.v_proj.weight.shape[0], mod.o_proj.weight.shape[1]
            if q % hd or k % hd or v % hd:
                fail(name, f"projection widths q={q}, k={k}, v={v} are not multiples of "
                           f"head_dim={hd}")
            if v != k:
                fail(name, f"v_proj keeps {v} features, expected k_proj's {k}")
            if o_in != q:
                fail(name, f"o_proj takes {o_in} inputs, expected q_proj's {q} outputs")
        elif all(hasattr(mod, a) for a in ("query", "key", "value", "attention_head_size")):
            hd = int(mod.attention_head_size)
            q, k, v = (getattr(mod, a).weight.shape[0] for a in ("query", "key", "value"))
            if not q == k == v or q % hd:
                fail(name, f"query/key/value widths {q}/{k}/{v} must be equal multiples of "
                           f"the head size {hd}")
        elif all(hasattr(mod, a) for a in ("c_attn", "c_proj", "head_dim", "split_size")):
            kind = layer_kind(mod.c_attn)
            width = mod.c_attn.weight.shape[1 if kind and kind[1] else 0]
            proj_in = mod.c_proj.weight.shape[0 if layer_kind(mod.c_proj)[1] else 1]
            if width % 3 or (width // 3) % int(mod.head_dim):
                fail(name, f"c_attn width {width} is not 3 x (heads x head_dim={mod.head_dim})")
            if proj_in != width // 3:
                fail(name, f"c_proj takes {proj_in} inputs, expected {width // 3}")


def _heads(model: nn.Module) -> dict[str, int]:
    """Attention module name -> query head count, read from the projection widths."""
    heads: dict[str, int] = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "q_proj") and hasattr(mod, "head_dim"):
            heads[name] = int(mod.q_proj.weight.shape[0]) // int(mod.head_dim)
        elif hasattr(mod, "query") and hasattr(mod, "attention_head_size"):
            heads[name] = int(mod.query.weight.shape[0]) // int(mod.attention_head_size)
        elif hasattr(mod, "c_attn") and hasattr(mod, "head_dim"):
            kind = layer_kind(mod.c_attn)
            width = int(mod.c_attn.weight.shape[1 if kind and kind[1] else 0])
            heads[name] = width // (3 * int(mod.head_dim))
    return heads


def convert(model: nn.Module, state: dict[str, torch.Tensor],
            report: ImportReport) -> tuple[list[str], set[str]]:
    """Resize the layers of ``model`` to the checkpoint's shapes (values are loaded later).

    Returns:
        ``([], set())``: no layer is compressed; every tensor is loaded densely afterwards.
    """
    before = _heads(model)
    for layer in list(iter_layers(model)):
        wkey, bkey = layer.name + ".weight", layer.name + ".bias"
        if wkey not in state:
            continue  # reported as missing by the strict load
        m = layer.module
        cur_shape = tuple(m.weight.shape)
        had_bias = getattr(m, "bias", None) is not None
        has_bias = bkey in state or layer.transposed
        if tuple(state[wkey].shape) == cur_shape and has_bias == had_bias:
            report.dense[layer.name] = "same shape as the config; loaded dense"
            continue
        out_f, in_f = _target_shape(layer, state[wkey])
        old = (layer.module.weight.shape[1], layer.module.weight.shape[0]) if layer.transposed \
            else (cur_shape[0], cur_shape[1] * int(getattr(m, "groups", 1)))
        try:
            resize_layer_to(model, layer, out_f, in_f, has_bias)
        except CompressError as exc:
            raise CheckpointError(f"layer {layer.name!r}: {exc}") from None
        what = []
        if (out_f, in_f) != tuple(old):
            what.append(f"resized [out, in] {list(old)} -> {[out_f, in_f]}")
        if has_bias and not had_bias:
            what.append("bias added (FLAP bias compensation)")
        if had_bias and not has_bias:
            what.append("bias removed (none in the checkpoint)")
        report.converted[layer.name] = "; ".join(what)
    _check_attention(model)
    try:
        sync_attention_heads(model)
    except CompressError as exc:
        raise CheckpointError(str(exc)) from None
    after = _heads(model)
    for name, heads in after.items():
        if before.get(name, heads) != heads:
            report.converted[name] = f"attention heads {before[name]} -> {heads}"
    if not report.converted:
        report.warnings.append(
            "flap: every layer has the shape the config gives; the checkpoint looks unpruned"
        )
    return [], set()
