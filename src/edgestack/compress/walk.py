"""Finding the layers a pass can compress, and replacing them in place.

Supported layers are ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and transformers' GPT-2
``Conv1D`` (weight stored ``[in, out]``, computes ``x @ W + b``). Every weight is handed to the
passes in one orientation, ``[out, in, *kernel]``, by :func:`dense_weight`.
Layers with weights of other kinds (``nn.Conv3d``, transposed convolutions, ``nn.Bilinear``,
``nn.MultiheadAttention``'s packed input projection) are reported by
:func:`unsupported_layers` so that passes can leave them dense and say so.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from edgestack.errors import CompressError

_UNSUPPORTED = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.Bilinear, nn.MultiheadAttention)


def _gpt2_conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for non-HF models
        return None
    return Conv1D


@dataclass(frozen=True)
class LayerInfo:
    """A compressible layer.

    Attributes:
        name: qualified module name in the model.
        module: the layer itself.
        kind: ``"linear"`` (also GPT-2 Conv1D), ``"conv1d"`` or ``"conv2d"``.
        transposed: True for GPT-2 Conv1D, whose stored weight is ``[in, out]``.
    """

    name: str
    module: nn.Module
    kind: str
    transposed: bool = False


def layer_kind(module: nn.Module) -> tuple[str, bool] | None:
    """Return ``(kind, transposed)`` for a supported layer, else None."""
    conv1d = _gpt2_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "linear", True
    if isinstance(module, nn.Linear):
        return "linear", False
    if isinstance(module, nn.Conv1d):
        return "conv1d", False
    if isinstance(module, nn.Conv2d):
        return "conv2d", False
    return None


def iter_layers(model: nn.Module, skip: tuple[str, ...] = ()) -> Iterator[LayerInfo]:
    """Yield every supported layer whose name does not start with one of ``skip``."""
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        yield LayerInfo(name, module, kind[0], kind[1])


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of qualified parameter names that are one tensor (tied weights), e.g.
    ``["transformer.wte.weight", "lm_head.weight"]`` of a GPT-2 LM whose output layer reads
    the input embedding; each group in model order, groups in the order of their first
    name."""
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{mname}.{pname}" if mname else pname)
    return [names for names in owners.values() if len(names) > 1]


def unsupported_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, type)`` of layers with weights that no pass handles (left dense)."""
    return [
        (name, type(m).__name__)
        for name, m in model.named_modules()
        if isinstance(m, _UNSUPPORTED)
    ]


def dense_weight(layer: LayerInfo) -> torch.Tensor:
    """The layer's weight as ``[out, in, *kernel]`` float32 (a detached copy)."""
    w = layer.module.weight.detach()
    if layer.transposed:
        w = w.t()
    return w.to(torch.float32).clone()


def check_finite_weight(layer: LayerInfo) -> None:
    """Refuse a layer whose weight holds NaN or Inf, naming the layer."""
    w = layer.module.weight.detach()
    bad = ~torch.isfinite(w)
    if bad.any():
        raise CompressError(
            f"layer {layer.name!r}: weight holds {int(bad.sum())} NaN/Inf value(s); "
            "fix the checkpoint before compressing it"
        )


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at dotted ``name``."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CompressError(f"model has no module named {name!r}") from None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise CompressError(f"model has no module named {name!r}")
    setattr(parent, child, new)
