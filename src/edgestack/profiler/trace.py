"""Every module output of one torch model run, for ``edgestack diff``: a forward hook on
every module records what it returned, in the order the modules returned.

Keys are module names (as ``model.named_modules()`` gives them): a module that returns one
tensor is its name; one that returns several is ``name[key]`` per tensor (the keys of
:func:`edgestack.exporter.signature.flatten_outputs`); the second call of a module is
``name#2``. The root module's return is the capture's final outputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from edgestack.errors import TargetError
from edgestack.exporter.signature import flatten_outputs
from edgestack.profiler.capture import Capture, Entry


def _tensors(out: Any) -> list[tuple[str, torch.Tensor]]:
    return [(k, t) for k, t in flatten_outputs(out) if isinstance(t, torch.Tensor)]


def _array(t: torch.Tensor) -> np.ndarray:
    """A copy (a later in-place op, e.g. ``ReLU(inplace=True)``, must not change it)."""
    t = t.detach().to("cpu", copy=True)
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.numpy()


def capture_torch(model: nn.Module, feeds: Mapping[str, Any], label: str) -> Capture:
    """Run ``model(**feeds)`` under ``torch.no_grad`` with a forward hook on every module.

    Args:
        model: the torch model (eval mode is set).
        feeds: keyword inputs (numpy arrays or tensors).
        label: how reports name the model.

    Raises:
        TargetError: the model's ``forward`` does not take the inputs, or fails on them.
    """
    model.eval()
    kwargs = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray)
              else v for k, v in feeds.items()}
    entries: list[Entry] = []
    arrays: dict[str, np.ndarray] = {}
    calls: dict[str, int] = {}
    handles = []

    def record(name: str, module: nn.Module, out: Any) -> None:
        calls[name] = calls.get(name, 0) + 1
        base = name if calls[name] == 1 else f"{name}#{calls[name]}"
        tensors = _tensors(out)
        for key, t in tensors:
            k = base if len(tensors) == 1 else f"{base}[{key}]"
            arrays[k] = _array(t)
            entries.append(Entry(k, type(module).__name__, name))

    for name, module in model.named_modules():
        if name:   # the root's return is the final outputs
            handles.append(module.register_forward_hook(
                lambda mod, _args, out, name=name: record(name, mod, out)))
    try:
        with torch.no_grad():
            out = model(**kwargs)
    except TypeError as exc:
        params = list(inspect.signature(model.forward).parameters)
        raise TargetError(f"{label}: forward does not take the inputs {sorted(kwargs)} "
                          f"({exc}); it takes {params}; give --inputs with arrays named "
                          "after them") from None
    except Exception as exc:  # the model's own failure on these inputs
        raise TargetError(f"{label}: the torch model failed on the inputs "
                          f"({type(exc).__name__}: {str(exc)[:300]}); give --inputs that "
                          "fit it") from exc
    finally:
        for h in handles:
            h.remove()
    outputs = []
    for key, t in _tensors(out):
        k = f"<output>{key}"
        arrays[k] = _array(t)
        outputs.append((key, k))
    many = sorted(n for n, c in calls.items() if c > 1)
    notes = [f"{len(many)} module(s) ran more than once ({', '.join(many[:3])}"
             f"{', ...' if len(many) > 3 else ''}): later calls are keyed name#2, ..."] \
        if many else []
    return Capture(label, "torch", entries, arrays, outputs, notes=notes)


__all__ = ["capture_torch"]
