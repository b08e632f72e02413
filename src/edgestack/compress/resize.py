"""Physically resizing layers: what structured pruning and the FLAP importer share.

:func:`shrink_layer` keeps chosen output rows and/or input columns of a supported layer and
puts a smaller layer of the same type in its place. :func:`sync_attention_heads` updates the
head-count attributes of Hugging Face attention modules after their projections changed
size (BERT, GPT-2 and Llama-style modules read the head count from these attributes or
from ``-1`` in a view, so both must agree with the weights).
"""

from __future__ import annotations

import torch
from torch import nn

from edgestack.compress.walk import LayerInfo, layer_kind, replace_module
from edgestack.errors import CompressError


def _grouped_keep_in(layer: LayerInfo, w: torch.Tensor, groups: int, keep_in: torch.Tensor,
                     keep_out: torch.Tensor | None
                     ) -> tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
    """Drop input channels of a grouped convolution: each group's rows keep their own kept
    channels, every kept group the same count; a group that keeps no input channel (a
    depthwise filter) goes whole, with its output rows, so ``groups`` shrinks.

    Returns the weight (rows of the dropped groups removed), the new group count,
    ``keep_out`` renumbered for the remaining rows, and the kept rows of the original layer.
    """
    per_in, per_out = w.shape[1], w.shape[0] // groups
    rows, counts, kept_groups = [], set(), []
    for g in range(groups):
        cols = keep_in[(keep_in // per_in) == g] - g * per_in
        if cols.numel():
            rows.append(w[g * per_out:(g + 1) * per_out].index_select(1, cols))
            counts.add(int(cols.numel()))
            kept_groups.append(g)
    if len(counts) != 1:
        raise CompressError(
            f"layer {layer.name!r}: a grouped convolution (groups={groups}) must keep the "
            f"same number of input channels in every group it keeps, found {sorted(counts)}"
        )
    if keep_out is None:
        keep_out = torch.arange(w.shape[0], device=w.device) if len(kept_groups) < groups \
            else None
    original = keep_out
    if keep_out is not None:
        group_of = keep_out // per_out
        if not torch.isin(group_of, torch.tensor(kept_groups, device=keep_out.device)).all():
            raise CompressError(
                f"layer {layer.name!r}: keeps output channels of a group whose input "
                "channels are all removed"
            )
        rank = {g: i for i, g in enumerate(kept_groups)}
        keep_out = torch.tensor([rank[int(g)] * per_out + int(r) % per_out
                                 for g, r in zip(group_of.tolist(), keep_out.tolist(),
                                                 strict=True)],
                                dtype=torch.int64, device=w.device)
    return torch.cat(rows), len(kept_groups), keep_out, original


def _new_like(layer: LayerInfo, out_f: int, in_f: int, bias: bool,
              groups: int | None = None) -> nn.Module:
    m = layer.module
    if layer.transposed:
        from transformers.pytorch_utils import Conv1D

        return Conv1D(out_f, in_f)  # Conv1D(nf=out, nx=in), always with bias
    if layer.kind == "linear":
        return nn.Linear(in_f, out_f, bias=bias)
    conv = nn.Conv1d if layer.kind == "conv1d" else nn.Conv2d
    groups = m.groups if groups is None else groups
    if groups != 1 and (out_f % groups or in_f % groups):
        raise CompressError(
            f"layer {layer.name!r}: a grouped convolution (groups={groups}) can only keep "
            f"channel counts divisible by the group count, found out={out_f}, in={in_f}"
        )
    return conv(in_f, out_f, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                bias=bias, padding_mode=m.padding_mode)


def shrink_layer(
    model: nn.Module,
    layer: LayerInfo,
    keep_out: torch.Tensor | None = None,
    keep_in: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> nn.Module:
    """Replace ``layer`` by a smaller layer of the same type holding only kept rows/columns.

    Args:
        model: the model that holds the layer (modified in place).
        layer: the layer, as yielded by :func:`~edgestack.compress.walk.iter_layers`.
        keep_out: sorted int64 indices of output features/channels to keep (default: all).
        keep_in: sorted int64 indices of input features/channels to keep (default: all).
            For grouped convolutions, index the full input channels; every group keeps the
            same count, or none (a depthwise filter: the group goes, ``groups`` shrinks).
        bias: a replacement bias for the kept outputs (bias compensation), or None to keep
            the sliced original bias. A layer without bias gets one when ``bias`` is given.

    Returns:
        The new module (already in the model).
    """
    m = layer.module
    w = m.weight.detach()
    if layer.transposed:  # GPT-2 Conv1D: [in, out]
        w = w.t()
    groups = int(getattr(m, "groups", 1))
    bias_rows = keep_out  # rows of the original layer, for its bias
    if keep_in is not None and groups != 1:
        w, groups, keep_out, bias_rows = _grouped_keep_in(layer, w, groups, keep_in, keep_out)
    elif keep_in is not None:
        w = w.index_select(1, keep_in)
    if keep_out is not None:
        if groups != 1:
            counts = torch.bincount(keep_out // (w.shape[0] // groups), minlength=groups)
            if counts.unique().numel() != 1:
                raise CompressError(
                    f"layer {layer.name!r}: a grouped convolution (groups={groups}) must keep "
                    f"the same number of output channels in every group, found "
                    f"{counts.tolist()}"
                )
        w = w.index_select(0, keep_out)
    old_bias = getattr(m, "bias", None)
    new_bias = bias
    if new_bias is None and old_bias is not None:
        new_bias = old_bias.detach()
        if bias_rows is not None:
            new_bias = new_bias.index_select(0, bias_rows)
    in_total = w.shape[1] * groups
    new = _new_like(layer, w.shape[0], in_total, new_bias is not None, groups)
    with torch.no_grad():
        new.weight.copy_(w.t() if layer.transposed else w)
        if new_bias is not None:
            new.bias.copy_(new_bias)
        elif getattr(new, "bias", None) is not None:
            new.bias.zero_()
    new.to(dtype=m.weight.dtype, device=m.weight.device).requires_grad_(False)
    replace_module(model, layer.name, new)
    return new


def sync_attention_heads(model: nn.Module) -> list[tuple[str, int]]:
    """Update head counts of HF attention modules to match their (pruned) projections.

    Returns:
        ``(module name, new head count)`` for each attention module that changed.
    """
    changed: list[tuple[str, int]] = []
    for name, mod in model.named_modules():
        # BERT-style: query/key/value Linear, attention_head_size fixed.
        if hasattr(mod, "attention_head_size") and hasattr(mod, "query"):
            heads = mod.query.out_features // mod.attention_head_size
            if heads != mod.num_attention_heads:
                mod.num_attention_heads = heads
                mod.all_head_size = heads * mod.attention_head_size
                changed.append((name, heads))
        # GPT-2: fused c_attn Conv1D [in, 3*heads*head_dim].
        elif hasattr(mod, "split_size") and hasattr(mod, "c_attn") and hasattr(mod, "head_dim"):
            kind = layer_kind(mod.c_attn)
            width = mod.c_attn.weight.shape[1] if kind and kind[1] else mod.c_attn.weight.shape[0]
            heads = width // (3 * mod.head_dim)
            if heads != mod.num_heads:
                mod.num_heads = heads
                mod.split_size = heads * mod.head_dim
                changed.append((name, heads))
        # Llama-style: q_proj/k_proj with head_dim; heads come from -1 in views.
        elif hasattr(mod, "q_proj") and hasattr(mod, "k_proj") and hasattr(mod, "head_dim"):
            heads = mod.q_proj.weight.shape[0] // mod.head_dim
            kv_heads = mod.k_proj.weight.shape[0] // mod.head_dim
            if kv_heads < 1 or heads % kv_heads:
                raise CompressError(
                    f"attention {name!r}: {heads} query heads are not a multiple of "
                    f"{kv_heads} key/value heads; prune heads in whole key/value groups"
                )
            if hasattr(mod, "num_key_value_groups"):
                mod.num_key_value_groups = heads // kv_heads
            for attr, val in (("num_heads", heads), ("num_key_value_heads", kv_heads)):
                if hasattr(mod, attr):
                    setattr(mod, attr, val)
            changed.append((name, heads))
    return changed


def resize_layer_to(
    model: nn.Module, layer: LayerInfo, out_features: int, in_features: int, bias: bool,
    groups: int | None = None,
) -> nn.Module:
    """Replace ``layer`` by a layer of the same type and settings with new feature counts.

    The new layer's weight (and bias) are zero; the caller loads its values. This is how the
    FLAP importer gives a layer the shape a checkpoint holds when the config does not say it.

    Args:
        model: the model that holds the layer (modified in place).
        layer: the layer, as yielded by :func:`~edgestack.compress.walk.iter_layers`.
        out_features: output features (channels) of the new layer.
        in_features: input features (all input channels, for grouped convolutions).
        bias: whether the new layer has a bias (GPT-2 ``Conv1D`` always has one).
        groups: a convolution's new group count (default: unchanged; a pruned depthwise
            convolution has as many groups as channels left).

    Returns:
        The new module (already in the model).
    """
    m = layer.module
    new = _new_like(layer, int(out_features), int(in_features), bool(bias),
                    None if groups is None else int(groups))
    with torch.no_grad():
        new.weight.zero_()
        if getattr(new, "bias", None) is not None:
            new.bias.zero_()
    new.to(dtype=m.weight.dtype, device=m.weight.device).requires_grad_(False)
    replace_module(model, layer.name, new)
    return new


def resize_norm_to(model: nn.Module, name: str, features: int) -> nn.Module:
    """Replace the BatchNorm at ``name`` by one of the same type and settings over
    ``features`` channels (default statistics; the caller loads its values)."""
    bn = model.get_submodule(name)
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
        raise CompressError(f"module {name!r} is a {type(bn).__name__}, not a BatchNorm1d/2d")
    new = type(bn)(int(features), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    ref = next(iter(bn.buffers()), None)
    new.to(device=None if ref is None else ref.device).eval().requires_grad_(False)
    replace_module(model, name, new)
    return new
