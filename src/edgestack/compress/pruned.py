"""Saving and loading structurally pruned Hugging Face models as model folders.

A pruned model has layers of per-layer sizes that a Hugging Face config often cannot
express: BERT derives the head size from ``hidden_size / num_attention_heads`` (so fewer
heads of the same size cannot be written as a smaller ``num_attention_heads``) and has one
``intermediate_size`` for all layers. :func:`save_pruned` therefore writes:

- ``config.json``: the original config, where a size is the same in every layer updated to
  the pruned value (``intermediate_size`` / GPT-2 ``n_inner`` when every MLP kept the same
  width), plus the key ``edgestack_pruned``::

      {"version": 1,
       "layers": {"encoder.layer.0.intermediate.dense": {"out": 1152, "in": 384,
                                                         "bias": true}, ...},
       "heads": {"encoder.layer.0.attention.self": 9, ...},
       "norms": {"resnet.embedder.embedder.normalization": 8, ...}}

  listing the size of every layer that differs from what the config builds (a
  convolution's entry has its ``groups`` too), the head count of every attention module and
  the channels of every BatchNorm that differs (``norms``, only when one does);
- ``model.safetensors`` (and what ``save_pretrained`` writes next to it).

:func:`load_pruned` builds the model from the config (the auto class of the task its
``config.architectures`` names, e.g. ``AutoModelForCausalLM`` for ``LlamaForCausalLM``; eager
attention), resizes the listed layers (:func:`~edgestack.compress.resize.resize_layer_to`),
syncs head counts and loads the weights strictly (every tensor must match).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgestack.compress.hf import TASKS, detect_task
from edgestack.compress.resize import resize_layer_to, resize_norm_to, sync_attention_heads
from edgestack.compress.walk import LayerInfo, iter_layers
from edgestack.errors import CheckpointError, CompressError

KEY = "edgestack_pruned"


def _sizes(layer: LayerInfo) -> tuple[int, int]:
    w = layer.module.weight
    if layer.transposed:
        return int(w.shape[1]), int(w.shape[0])
    if layer.kind == "linear":
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[0]), int(w.shape[1]) * int(layer.module.groups)


def _entry(layer: LayerInfo) -> dict[str, Any]:
    out_f, in_f = _sizes(layer)
    entry = {"out": out_f, "in": in_f,
             "bias": getattr(layer.module, "bias", None) is not None}
    if layer.kind != "linear":  # a pruned depthwise conv has fewer groups
        entry["groups"] = int(layer.module.groups)
    return entry


def _norms(model: nn.Module) -> dict[str, int]:
    return {name: int(m.num_features) for name, m in model.named_modules()
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))}


def _auto_class(config: Any) -> Any:
    """The transformers auto class of the model's task (``config.architectures``), so a
    causal LM is rebuilt with its LM head and its module names."""
    import transformers

    return getattr(transformers, TASKS[detect_task(config)])


def _heads(model: nn.Module) -> dict[str, int]:
    out = {}
    for name, mod in model.named_modules():
        if all(hasattr(mod, a) for a in ("q_proj", "head_dim")) and \
                not hasattr(mod, "num_heads"):  # Llama-style: heads from the q_proj rows
            out[name] = int(mod.q_proj.weight.shape[0]) // int(mod.head_dim)
            continue
        for attr in ("num_attention_heads", "num_heads"):
            if hasattr(mod, attr) and any(hasattr(mod, a) for a in ("query", "c_attn", "q_proj")):
                out[name] = int(getattr(mod, attr))
                break
    return out


def save_pruned(model: nn.Module, folder: str | Path) -> Path:
    """Save a pruned Hugging Face model (see module docstring) and return the folder.

    Raises:
        CompressError: the model is not a Hugging Face ``PreTrainedModel``.
    """
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise CompressError(
            f"save_pruned: expected a Hugging Face PreTrainedModel, found "
            f"{type(model).__name__}; save a plain torch model with torch.save"
        )
    folder = Path(folder)
    config = model.config.__class__.from_dict(model.config.to_dict())
    mlp = [layer for layer in iter_layers(model)
           if layer.name.endswith(("intermediate.dense", "mlp.c_fc", "mlp.up_proj"))]
    widths = {_sizes(layer)[0] for layer in mlp}
    if len(widths) == 1:
        width = widths.pop()
        if hasattr(config, "intermediate_size"):
            config.intermediate_size = width
        elif hasattr(config, "n_inner"):
            config.n_inner = width
    if hasattr(config, KEY):
        delattr(config, KEY)
    config._attn_implementation = "eager"
    config.architectures = [type(model).__name__]  # what load_pruned rebuilds
    fresh = type(model)(config)
    built = {layer.name: _entry(layer) for layer in iter_layers(fresh)}
    layers = {}
    for layer in iter_layers(model):
        entry = _entry(layer)
        if built.get(layer.name) != entry:
            layers[layer.name] = entry
    built_norms = _norms(fresh)
    norms = {n: f for n, f in _norms(model).items() if built_norms.get(n) != f}
    setattr(config, KEY, {"version": 1, "layers": layers, "heads": _heads(model),
                          **({"norms": norms} if norms else {})})
    model.config, saved = config, model.config
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        model.config = saved
    return folder


def load_pruned(folder: str | Path) -> nn.Module:
    """Load a folder written by :func:`save_pruned` as an fp32 eval-mode model.

    Raises:
        CheckpointError: no config.json, or weights that do not match the recorded sizes.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"load_pruned: {folder} has no config.json")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    info: dict[str, Any] = getattr(config, KEY, None) or {"layers": {}, "heads": {}}
    config._attn_implementation = "eager"
    if hasattr(config, "use_cache"):
        config.use_cache = False
    model = _auto_class(config).from_config(config)
    by_name = {layer.name: layer for layer in iter_layers(model)}
    for name, size in info.get("layers", {}).items():
        if name not in by_name:
            raise CheckpointError(f"load_pruned: config lists layer {name!r}, which the "
                                  f"{type(model).__name__} built from the config lacks")
        resize_layer_to(model, by_name[name], size["out"], size["in"], size["bias"],
                        size.get("groups"))
    for name, features in info.get("norms", {}).items():
        resize_norm_to(model, name, features)
    sync_attention_heads(model)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise CheckpointError(f"load_pruned: no .safetensors weights in {folder}")
    prefix = getattr(model, "base_model_prefix", "")
    own = model.state_dict()
    if prefix and not any(k in own for k in state) and any(
            k.startswith(prefix + ".") for k in state):
        state = {k[len(prefix) + 1:]: v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"load_pruned: weights do not match the recorded sizes: {exc}") \
            from None
    # a tied weight (an LM head sharing the embedding table) is saved once, under one name
    shared: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), set()).add(name)
    loaded = set(state)
    tied = {n for names in shared.values() if names & loaded for n in names}
    missing = [k for k in missing if not k.endswith("position_ids") and k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"load_pruned: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


__all__ = ["save_pruned", "load_pruned"]
