"""Check a package's manifest against its graphs (host side: reads the graphs with onnx-ir).

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

Reads the graphs with onnx-ir (``import edgestack.package`` does not import this module, so
the package layer stays importable without onnx).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir

from edgestack.errors import PackageError
from edgestack.package.format import DENSE_DATA, DENSE_FILES, NBITS_BLOCK, VARIANT_FILE
from edgestack.package.reader import Package

_FIX = "the manifest and the graph disagree: repack the model"


def _nodes(graph: ir.Graph, parents: tuple[str, ...] = ()
           ) -> Iterator[tuple[ir.Node, tuple[str, ...]]]:
    """Every node of ``graph`` and of its subgraphs (``If`` branches, loops), depth first,
    with the names of the nodes whose subgraphs hold it (outermost first)."""
    for node in graph:
        yield node, parents
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _nodes(attr.as_graph(), (*parents, str(node.name)))
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    yield from _nodes(sub, (*parents, str(node.name)))


def _dims(value: ir.Value) -> list[int | str | None]:
    return [d if isinstance(d, int) else d.value for d in value.shape or []]


def _dtype(dtype: ir.DataType | None) -> str:
    try:
        return str(dtype.numpy()) if dtype is not None else "untyped"
    except TypeError:  # no numpy dtype
        return dtype.name if dtype is not None else "untyped"


def check_graphs(pkg: Package) -> list[str]:
    """Check the manifest of ``pkg`` against its graph files (see the module doc).

    Returns:
        The graph files checked.

    Raises:
        PackageError: the first disagreement, naming the graph file, the layer or table,
            expected vs found.
    """
    checked = []
    layers = pkg.layers
    for name in (pkg.graph_file, VARIANT_FILE, *DENSE_FILES.values()):
        if name not in pkg.files:
            continue
        try:
            model = ir.from_proto(onnx.load_model_from_string(pkg.read_file(name)))
        except PackageError:
            raise
        except Exception as exc:  # DecodeError, a bad external-data offset, ...
            while (exc.__cause__ or exc.__context__) is not None:  # the error that names
                exc = exc.__cause__ or exc.__context__   # the field (onnx-ir wraps it)
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
        inputs = {v.name: v for v in g.inputs}
        nodes, within = {}, {}
        for nd, parents in _nodes(g):
            if nd.name:
                nodes[nd.name], within[nd.name] = nd, parents
        for layer, info in layers.items():
            a = info.graph
            if a is None:
                raise PackageError(f"{where}: layer {layer!r} has no layers[].graph; {_FIX}")
            node = nodes.get(a.node)
            if (node is None or node.domain != "edgestack" or node.op_type != "BitStackWeight"
                    or [v and v.name for v in node.inputs] != [a.signs, a.u, a.v]
                    or [v.name for v in node.outputs] != [a.output]):
                found = ("no node of that name" if node is None else
                         f"{node.domain or 'ai.onnx'}.{node.op_type}"
                         f"({', '.join(str(v and v.name) for v in node.inputs)}) -> "
                         f"{', '.join(str(v.name) for v in node.outputs)}")
                raise PackageError(
                    f"{where}: layer {layer!r}: expected node {a.node!r} to be "
                    f"edgestack.BitStackWeight({a.signs}, {a.u}, {a.v}) -> {a.output}, found "
                    f"{found}; {_FIX}")
            shape = node.attributes.get_ints("shape")
            if shape is None or list(shape) != list(info.shape):
                raise PackageError(
                    f"{where}: layer {layer!r}: node {a.node!r} has shape "
                    f"{shape if shape is None else list(shape)}, the manifest's layer has "
                    f"{list(info.shape)}; {_FIX}")
            (m, n), k = info.matrix_shape, info.rank
            for part, dtype, want in ((a.signs, ir.DataType.UINT8, [info.signs_bytes]),
                                      (a.u, ir.DataType.FLOAT16, [m, k]),
                                      (a.v, ir.DataType.FLOAT16, [k, n])):
                v = inputs.get(part)
                dims = _dims(v) if v is not None else []
                if (v is None or v.dtype != dtype or len(dims) != len(want) + 1
                        or isinstance(dims[0], int) or dims[1:] != want):
                    found = "not a graph input" if v is None else f"{_dtype(v.dtype)} {dims}"
                    raise PackageError(
                        f"{where}: layer {layer!r}: input {part!r} should be "
                        f"{_dtype(dtype)} [blocks, {', '.join(map(str, want))}] (first "
                        f"dimension symbolic) for shape {list(info.shape)} and rank {k}, found "
                        f"{found}; {_FIX}")
            site = a.site
            if name == VARIANT_FILE and site is not None:
                fed = [site.fp32, site.w] + ([site.int8, site.q, site.scale]
                                             if site.int8 is not None else [])
                missing = [x for x in fed if x not in inputs]
                if missing:
                    raise PackageError(f"{where}: layer {layer!r}: site inputs {missing} are "
                                       f"not inputs of the mixed graph; {_FIX}")
                if f"{site.prefix}.if_fp32" not in within[a.node]:
                    raise PackageError(
                        f"{where}: layer {layer!r}: site {site.prefix!r} is not the layer's "
                        f"(its node {a.node!r} lies in {list(within[a.node]) or 'the graph'}, "
                        f"not in {site.prefix}.if_fp32); {_FIX}")
        if name == pkg.graph_file:
            _check_tables(g, pkg, where)
        checked.append(name)
    return checked


def _dense_dims(form: str, key: str, kind: str, m: int, n: int) -> list[int] | None:
    """The dims the packer gives a layer's own (unfused) tensor ``key`` in the ``form``
    graph (see :mod:`edgestack.packer.variants`)."""
    kb = -(-n // NBITS_BLOCK)
    return {("fp32", "w"): [n, m] if kind == "matmul" else [m, n],
            ("int8", "q"): [n, m], ("int8", "scale"): [m],
            ("nbits8", "b"): [m, kb, NBITS_BLOCK], ("nbits8", "s"): [m, kb]}.get((form, key))


def _external(graph: ir.Graph) -> dict[str, ir.ExternalTensor]:
    """The graph's initializers stored as external data, by name."""
    return {str(v.name): v.const_value for v in graph.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}


def _check_dense(g: ir.Graph, pkg: Package, form: str, where: str) -> None:
    """The dense graph reads exactly the ranges of its data file the manifest names, each
    layer's from its own tensor (``<prefix>.<key>``, with the layer's dims) or from its fused
    group's (``<first prefix>.group.<key>``, the members' slices tiling it)."""
    data = DENSE_DATA[form]
    tensors: dict[tuple[int, int], tuple[str, list[int]]] = {}
    for tname, t in _external(g).items():
        if t.location != data:
            continue
        if t.length is None:
            raise PackageError(f"{where}: initializer {tname!r} in {data} has no length; "
                               f"{_FIX}")
        tensors[(t.offset or 0, t.length)] = (tname, [int(d) for d in t.shape])
    want: dict[tuple[int, int], str] = {}
    for layer, info in pkg.layers.items():
        site = info.graph.site if info.graph is not None else None
        layout = site.files.get(form) if site is not None else None
        if site is None or layout is None:
            raise PackageError(f"{where}: layer {layer!r} has no {form} layout "
                               f"(graph.site.files.{form}); {_FIX}")
        for key, entry in layout.items():
            if key.endswith("_cols"):
                continue
            if len(entry) != 2:
                raise PackageError(f"{where}: layer {layer!r}: graph.site.files.{form}.{key} "
                                   f"is {list(entry)}, expected [offset, bytes]; {_FIX}")
            rng = (entry[0], entry[1])
            want[rng] = layer
            own = tensors.get(rng)
            if own is not None and own[0] == f"{site.prefix}.{key}":
                dims = _dense_dims(form, key, site.kind, *info.matrix_shape)
                if dims is not None and own[1] != dims:
                    raise PackageError(
                        f"{where}: layer {layer!r}: tensor {own[0]!r} has dims {own[1]}, the "
                        f"layer's shape {list(info.shape)} gives {dims}; {_FIX}")
                continue
            holder = next((name for (o, b), (name, _d) in tensors.items()
                           if o <= rng[0] and rng[0] + rng[1] <= o + b), None)
            if holder is None or not holder.endswith(f".group.{key}"):
                found = f"in no tensor of {data}" if holder is None else f"in {holder!r}"
                raise PackageError(
                    f"{where}: layer {layer!r}: graph.site.files.{form}.{key} {list(rng)} is "
                    f"{found}, expected {site.prefix}.{key} (or its fused group's); {_FIX}")
    # a fused group's tensor is written in slices, one per layer (its scales, its rows):
    # the manifest's ranges must tile each of the graph's tensors exactly
    for (start, size), (name, _dims) in sorted(tensors.items()):
        pos = start
        for o, b in sorted(r for r in want if start <= r[0] and r[0] + r[1] <= start + size):
            if o != pos:
                break
            pos = o + b
        if pos != start + size:
            raise PackageError(
                f"{where}: tensor {name!r} ({data} [{start}, {size}]) is not written whole by "
                f"the layers' graph.site.files.{form} (they cover it up to byte {pos}); {_FIX}")


def _check_tables(g: ir.Graph, pkg: Package, where: str) -> None:
    """Each mapped table is the graph's initializer at its offset in the weights file."""
    rt = pkg.manifest.runtime
    external = _external(g)
    for tname, table in rt.tables.items():
        t = external.get(tname)
        found = t and (str(t.location), t.offset or 0, t.length,
                       tuple(int(d) for d in t.shape), _dtype(t.dtype))
        want = (rt.weights_file, table.offset, table.bytes, tuple(table.shape),
                str(np.dtype(table.dtype)))
        if t is None or found != want:
            raise PackageError(
                f"{where}: runtime.tables[{tname!r}]: expected an initializer in "
                f"{rt.weights_file} at offset {table.offset}, {table.bytes} bytes, shape "
                f"{list(table.shape)}, {np.dtype(table.dtype)}; found "
                f"{'no such initializer' if t is None else found}; {_FIX}")


__all__ = ["check_graphs"]
