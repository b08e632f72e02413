"""Example inputs for an ONNX graph: what compile ``--golden``, parity, bench and pack feed
a model when the user gives no inputs."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from edgestack.errors import TargetError


def input_specs(graph: Any, skip: Collection[str] = ()
                ) -> list[tuple[str, np.dtype, tuple[int | None, ...]]]:
    """``(name, numpy dtype, shape)`` of every input a graph must be fed (an
    ``onnx.GraphProto``; initializers listed as inputs and ``skip`` left out). The dtype is
    ``object`` for an element type numpy has no dtype for; a dimension is ``None`` when it
    is symbolic or unknown."""
    import onnx

    leave = set(skip) | {i.name for i in graph.initializer}
    out = []
    for inp in graph.input:
        if inp.name in leave:
            continue
        tt = inp.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            dtype = np.dtype(object)
        out.append((inp.name, dtype, tuple(int(d.dim_value) if d.HasField("dim_value")
                                           and d.dim_value > 0 else None
                                           for d in tt.shape.dim)))
    return out


def example_feeds(model: str | Path | Any, *, batch: int = 1, seq: int = 16, seed: int = 0,
                  high: int = 100, skip: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Deterministic inputs for every graph input of an ONNX model.

    Args:
        model: A model path (weights are not loaded), an ``onnx.ModelProto`` or a
            ``GraphProto``.
        batch: Size of each input's first symbolic dimension.
        seq: Size of its other symbolic dimensions.
        seed: Seed of the random values.
        high: Integer inputs are token ids in ``[0, high)``, except names containing
            ``mask`` (ones) and ``type`` (zeros); booleans are ones; floats standard normal.
        skip: Input names to leave out (and initializers listed as inputs are left out).

    Raises:
        TargetError: an input of a type this cannot generate (give the inputs explicitly).
    """
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, dtype, dims in input_specs(graph, skip):
        if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            raise TargetError(f"graph input {name!r} has a type ({dtype}) "
                              "which the example-input generator does not support; give the "
                              "inputs explicitly (an .npz file or a mapping)")
        shape = [d if d is not None else batch if i == 0 else seq
                 for i, d in enumerate(dims)]
        low = name.lower()
        if dtype == np.bool_ or (np.issubdtype(dtype, np.integer) and "mask" in low):
            feeds[name] = np.ones(shape, dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[name] = (np.zeros(shape, dtype) if "type" in low
                           else rng.integers(0, high, shape).astype(dtype))
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def load_feeds(path: str | Path) -> dict[str, np.ndarray]:
    """Inputs from an ``.npz`` file (input name -> array; no pickled objects).

    Raises:
        TargetError: the file is missing, not an npz archive, or holds no arrays.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as npz:
            feeds = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise TargetError(f"input file {p} does not exist; expected an .npz file mapping "
                          f"input names to arrays (numpy.savez)") from None
    except (OSError, ValueError) as exc:
        raise TargetError(f"input file {p} is not a readable .npz archive of arrays ({exc}); "
                          f"write it with numpy.savez(path, input_name=array, ...)") from None
    if not feeds:
        raise TargetError(f"input file {p} holds no arrays; expected one per model input")
    return feeds
