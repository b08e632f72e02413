"""Check a package's manifest against its graphs (host side: reads the graphs with onnx).

The manifest tells the runtime what the graphs hold, so that the runtime never parses a
graph (it imports no onnx). What the runtime relies on is checked here, against the graph
files themselves (``edgestack verify`` runs :func:`check_graphs` wherever onnx is
installed; the runtime checks what ONNX Runtime reports of the graphs it loads, see
``Runtime._check_block_inputs``):

- every BitStack layer's ``graph.node`` is an ``edgestack.BitStackWeight`` node (in the plain
  graph, and inside the mixed graph's branches) reading ``graph.signs``, ``graph.u``,
  ``graph.v`` and writing ``graph.output``, and its ``shape`` attribute is the layer's
  ``shape``;
- those three are graph inputs of types uint8, float16, float16 whose first dimension is
  symbolic and whose other dimensions are ``[ceil(m*n/8)]``, ``[m, k]``, ``[k, n]`` from the
  layer's shape and rank;
- the mixed graph has every site input the runtime feeds (``<prefix>.fp32``, ``.w`` and,
  unless generic, ``.int8``, ``.q``, ``.scale``);
- each dense graph reads from its data file (:data:`~.format.DENSE_DATA`) exactly the
  ``[offset, bytes]`` ranges the layers' ``site.files[form]`` name (the runtime writes the
  tensors there), and nothing else;
- each mapped lookup table (``runtime.tables``) is an initializer of the plain graph stored in
  ``runtime.weights_file`` at the table's offset, with its bytes, shape and dtype.

Imports onnx inside :func:`check_graphs` (the package layer stays importable without it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from edgestack.errors import PackageError
from edgestack.package.format import DENSE_DATA, DENSE_FILES, VARIANT_FILE
from edgestack.package.reader import Package

_FIX = "the manifest and the graph disagree: repack the model"


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of ``graph`` and of its subgraphs (``If`` branches, loops), depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def _dims(value_info: Any) -> list[int | str | None]:
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else d.dim_param or None
            for d in tt.shape.dim]


def _external(tensor: Any) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def check_graphs(pkg: Package) -> list[str]:
    """Check the manifest of ``pkg`` against its graph files (see the module doc).

    Returns:
        The graph files checked.

    Raises:
        PackageError: the first disagreement, naming the graph file, the layer or table,
            expected vs found.
    """
    import onnx
    from onnx import TensorProto, helper

    checked = []
    layers = pkg.layers
    for name in (pkg.graph_file, VARIANT_FILE, *DENSE_FILES.values()):
        if name not in pkg.files:
            continue
        try:
            model = onnx.load_model_from_string(pkg.read_file(name))
        except PackageError:
            raise
        except Exception as exc:  # DecodeError and friends
            raise PackageError(f"{pkg.path}: graph {name!r} is not readable ONNX "
                               f"({type(exc).__name__}: {str(exc)[:120]}); repack the model"
                               ) from None
        g = model.graph
        where = f"{pkg.path}: {name}"
        dense = next((f for f, file in DENSE_FILES.items() if file == name), None)
        if dense is not None:
            _check_dense(g, pkg, dense, where)
            checked.append(name)
            continue
        inputs = {vi.name: vi for vi in g.input}
        nodes = {nd.name: nd for nd in _nodes(g) if nd.name}
        for layer, info in layers.items():
            a = info.graph
            if a is None:
                raise PackageError(f"{where}: layer {layer!r} has no layers[].graph; {_FIX}")
            node = nodes.get(a.node)
            shape = (next((list(x.ints) for x in node.attribute if x.name == "shape"), None)
                     if node is not None else None)
            if (node is None or node.domain != "edgestack" or node.op_type != "BitStackWeight"
                    or list(node.input) != [a.signs, a.u, a.v]
                    or list(node.output) != [a.output]):
                found = ("no node of that name" if node is None else
                         f"{node.domain or 'ai.onnx'}.{node.op_type}({', '.join(node.input)}) "
                         f"-> {', '.join(node.output)}")
                raise PackageError(
                    f"{where}: layer {layer!r}: expected node {a.node!r} to be "
                    f"edgestack.BitStackWeight({a.signs}, {a.u}, {a.v}) -> {a.output}, found "
                    f"{found}; {_FIX}")
            if shape != list(info.shape):
                raise PackageError(
                    f"{where}: layer {layer!r}: node {a.node!r} has shape {shape}, the "
                    f"manifest's layer has {list(info.shape)}; {_FIX}")
            (m, n), k = info.matrix_shape, info.rank
            for part, dtype, want in ((a.signs, TensorProto.UINT8, [info.signs_bytes]),
                                      (a.u, TensorProto.FLOAT16, [m, k]),
                                      (a.v, TensorProto.FLOAT16, [k, n])):
                vi = inputs.get(part)
                dims = _dims(vi) if vi is not None else []
                if (vi is None or vi.type.tensor_type.elem_type != dtype
                        or len(dims) != len(want) + 1 or isinstance(dims[0], int)
                        or dims[1:] != want):
                    found = ("not a graph input" if vi is None else
                             f"{helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)}"
                             f" {dims}" if vi.type.tensor_type.elem_type else "untyped")
                    raise PackageError(
                        f"{where}: layer {layer!r}: input {part!r} should be "
                        f"{np.dtype(helper.tensor_dtype_to_np_dtype(dtype))} [blocks, "
                        f"{', '.join(map(str, want))}] (first dimension symbolic) for shape "
                        f"{list(info.shape)} and rank {k}, found {found}; {_FIX}")
            site = a.site
            if name == VARIANT_FILE and site is not None:
                fed = [site.fp32, site.w] + ([site.int8, site.q, site.scale]
                                             if site.int8 is not None else [])
                missing = [x for x in fed if x not in inputs]
                if missing:
                    raise PackageError(f"{where}: layer {layer!r}: site inputs {missing} are "
                                       f"not inputs of the mixed graph; {_FIX}")
        if name == pkg.graph_file:
            _check_tables(g, pkg, where)
        checked.append(name)
    return checked


def _check_dense(g: Any, pkg: Package, form: str, where: str) -> None:
    """The dense graph reads exactly the ranges of its data file the manifest names."""
    data = DENSE_DATA[form]
    graph_ranges: set[tuple[int, int]] = set()
    for t in g.initializer:
        ext = _external(t)
        if ext.get("location") != data:
            continue
        try:
            graph_ranges.add((int(ext.get("offset", "0")), int(ext["length"])))
        except (KeyError, ValueError):
            raise PackageError(f"{where}: initializer {t.name!r} in {data} has no integer "
                               f"offset and length ({ext}); {_FIX}") from None
    want: set[tuple[int, int]] = set()
    for layer, info in pkg.layers.items():
        site = info.graph.site if info.graph is not None else None
        layout = site.files.get(form) if site is not None else None
        if layout is None:
            raise PackageError(f"{where}: layer {layer!r} has no {form} layout "
                               f"(graph.site.files.{form}); {_FIX}")
        for key, entry in layout.items():
            if not key.endswith("_cols"):
                if len(entry) != 2:
                    raise PackageError(f"{where}: layer {layer!r}: graph.site.files.{form}."
                                       f"{key} is {list(entry)}, expected [offset, bytes]; {_FIX}")
                want.add((entry[0], entry[1]))
    # a fused group's tensor is written in slices, one per layer (its scales, its rows):
    # the manifest's ranges must tile each of the graph's tensors exactly, and lie in one
    problems = []
    left = sorted(want)
    for start, size in sorted(graph_ranges):
        inside = [r for r in left if start <= r[0] and r[0] + r[1] <= start + size]
        pos = start
        for o, b in inside:
            if o != pos:
                break
            pos = o + b
        if pos != start + size:
            problems.append(f"the graph's tensor [{start}, {size}] is not covered exactly by "
                            f"the manifest's ranges {[list(r) for r in inside[:4]]}")
        left = [r for r in left if r not in inside]
    if left:
        problems.append(f"the manifest's ranges {[list(r) for r in left[:4]]} are in no "
                        f"tensor the graph reads from {data}")
    if problems:
        raise PackageError(f"{where}: {problems[0]}; {_FIX}")


def _check_tables(g: Any, pkg: Package, where: str) -> None:
    """Each mapped table is the graph's initializer at its offset in the weights file."""
    from onnx import helper

    rt = pkg.manifest.runtime
    inits = {t.name: t for t in g.initializer}
    for tname, table in rt.tables.items():
        t = inits.get(tname)
        ext = _external(t) if t is not None else {}
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)) if t else None
            found = (ext.get("location"), int(ext.get("offset", "0")),
                     int(ext.get("length", "-1")), tuple(t.dims) if t else None, dtype)
        except (ValueError, KeyError, TypeError):
            found = (ext.get("location"), ext.get("offset"), ext.get("length"), None, None)
        want = (rt.weights_file, table.offset, table.bytes, tuple(table.shape),
                np.dtype(table.dtype))
        if t is None or found != want:
            raise PackageError(
                f"{where}: runtime.tables[{tname!r}]: expected an initializer in "
                f"{rt.weights_file} at offset {table.offset}, {table.bytes} bytes, shape "
                f"{list(table.shape)}, {np.dtype(table.dtype)}; found "
                f"{'no such initializer' if t is None else found}; {_FIX}")


__all__ = ["check_graphs"]
