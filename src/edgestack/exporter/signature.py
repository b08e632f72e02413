"""How a torch model's inputs and outputs map to the inputs and outputs of its ONNX graph.

Inputs are a dict of keyword tensors (what :mod:`edgestack.zoo` factories return; ONNX inputs
are named after the keys) or a tuple of positional tensors (named after the ``forward``
parameters). Outputs are flattened in order to a tuple of tensors: a Hugging Face
``ModelOutput`` or a dict gives its non-None tensor fields, named after the keys
(``last_hidden_state``); tuples and lists give their items (``<parent>_<i>``); a single tensor
is ``output``. This is the order in which ``torch.export`` flattens outputs too.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgestack.errors import ExportError


@dataclass(frozen=True)
class ModelInputs:
    """Example inputs, normalised.

    Attributes:
        args: positional tensors (empty when keyword inputs are given).
        kwargs: keyword tensors (empty when positional inputs are given).
        names: ONNX input names, in graph order.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    names: tuple[str, ...]

    def tensors(self) -> list[Any]:
        """The input tensors, in :attr:`names` order."""
        return list(self.args) if self.args else [self.kwargs[n] for n in self.names]

    def by_name(self) -> dict[str, Any]:
        """``{name: tensor}``."""
        return dict(zip(self.names, self.tensors(), strict=True))

    def numpy(self) -> dict[str, np.ndarray]:
        """``{name: ndarray}``, what ONNX Runtime is fed."""
        return {n: t.detach().cpu().numpy() for n, t in self.by_name().items()}


def normalize_inputs(model: Any, inputs: Any, names: Sequence[str] | None = None
                     ) -> ModelInputs:
    """Check and normalise example inputs (dict of keyword tensors or tuple of tensors).

    ``names``: the ONNX names of positional inputs (default: the ``forward`` parameters',
    ``input_<i>`` past them, e.g. for ``*args``); keyword inputs are named by their keys.

    Raises:
        ExportError: inputs are neither, hold something other than tensors, or ``names``
            does not name each positional input once.
    """
    import torch

    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, Mapping):
        kwargs = dict(inputs)
        bad = {k: type(v).__name__ for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        if bad:
            raise ExportError(
                f"export inputs: expected a dict of tensors, found non-tensor values {bad}; "
                "pass only tensors (fixed options belong in the model)"
            )
        return ModelInputs((), kwargs, tuple(kwargs))
    if isinstance(inputs, (tuple, list)):
        args = tuple(inputs)
        bad = {i: type(v).__name__ for i, v in enumerate(args) if not isinstance(v, torch.Tensor)}
        if bad:
            raise ExportError(
                f"export inputs: expected a tuple of tensors, found non-tensor items at {bad}; "
                "pass only tensors"
            )
        if names is None:
            return ModelInputs(args, {}, tuple(_positional_names(model, len(args))))
        names = tuple(str(n) for n in names)
        if len(names) != len(args) or len(set(names)) != len(names):
            raise ExportError(
                f"export inputs: input_names must name each of the {len(args)} positional "
                f"inputs once, found {len(names)} name(s) ({', '.join(names)})"
            )
        return ModelInputs(args, {}, names)
    raise ExportError(
        f"export inputs: expected a dict of keyword tensors or a tuple of tensors, found "
        f"{type(inputs).__name__}; e.g. pass the inputs an edgestack.zoo factory returns"
    )


def _positional_names(model: Any, count: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:count]]
    return names + [f"input_{i}" for i in range(len(names), count)]


def flatten_outputs(outputs: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``[(name, tensor)]`` of a model's outputs, in ``torch.export``'s flattening order."""
    import torch

    if isinstance(outputs, torch.Tensor):
        return [(prefix or "output", outputs)]
    if outputs is None:
        return []
    items: list[tuple[str, Any]]
    if isinstance(outputs, Mapping):  # dict and Hugging Face ModelOutput
        items = [(str(k), v) for k, v in outputs.items()]
    elif isinstance(outputs, (tuple, list)):
        items = [(str(i) if prefix else f"output_{i}", v) for i, v in enumerate(outputs)]
    else:
        return []  # non-tensor leaves (ints, strings) are constants in the graph
    flat: list[tuple[str, Any]] = []
    for key, value in items:
        flat.extend(flatten_outputs(value, f"{prefix}_{key}" if prefix else key))
    return flat


def unique_names(names: list[str]) -> list[str]:
    """Make names unique by suffixing repeats (``x``, ``x_1``)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        else:
            seen[n] = 0
        out.append(n)
    return out


__all__ = ["ModelInputs", "normalize_inputs", "flatten_outputs", "unique_names"]
