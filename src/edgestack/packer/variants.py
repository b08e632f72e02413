"""The packed graph's **mixed** variant: every BitStack layer served in the form a plan picks.

The runtime serves each BitStack layer in one of four forms (:data:`FORMS`):

``on-the-fly``
    the blocks are fed and ONNX Runtime runs the ``BitStackWeight`` decode on every call
    (smallest; the plain graph ``model.onnx``);
``int8``
    the tier's decoded weight, quantized per output channel to int8 by the runtime, fed to
    ``com.microsoft.DynamicQuantizeMatMul`` (1 byte a weight; the integer kernels);
``nbits8``
    the tier's decoded weight as 8-bit weight-only ``com.microsoft.MatMulNBits`` (block 32:
    1.16 bytes a weight, the tier's quality within rounding); only in the dense graph below;
``fp32``
    the tier's decoded float32 weight, fed to the layer's own ``MatMul``/``Gemm``.

ONNX Runtime cannot feed an intermediate value, and the device side does not import ``onnx``
to edit graphs, so the packer writes, beside ``model.onnx``, ``model.mixed.onnx`` (role
``variant``, same external weights) in which every BitStack layer is a **site**::

    Y = If(<p>.int8) then DynamicQuantizeMatMul(X, <p>.q, <p>.scale[, bias])
        else If(<p>.fp32) then MatMul(X, <p>.w) | Gemm(X, <p>.w, C, transB=1)
             else the original BitStackWeight -> [Transpose ->] MatMul | Gemm

where ``<p>`` is ``es.<i>``: the runtime feeds the two booleans and the chosen form's values,
and empty arrays to the branches not taken, so one session serves every mix of forms and a
re-tier never rebuilds it. A layer whose weight feeds something else (a ``Conv``, several
nodes) is a ``generic`` site, ``If(<p>.fp32) then Identity(<p>.w) else BitStackWeight``: no
int8 form. :func:`add_sites` records each site as the layer's
:class:`~edgestack.package.format.Site` (its ``kind`` and input ``prefix``), the contract the
runtime reads.

Beside it, :func:`dense_graph` writes ``model.int8.onnx``, ``model.nbits8.onnx`` and
``model.fp32.onnx``: every layer in one form with no ``If`` and no decode, its weights
initializers in a data file the runtime writes per plan (so ONNX Runtime prepacks them), for
the plans that serve every layer in that form.

Both edit a copy of the packed model with onnx-ir (the copy shares its tensors, so no weight
is copied): the site's nodes move into the ``If`` branch, new values take the old ones' uses
and names, and the dense graphs leave dead code to ``RemoveUnusedNodesPass``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgestack.package.format import DENSE_ALIGN, DENSE_DATA, NBITS_BLOCK, LayerGraph, Site

FLOAT = ir.DataType.FLOAT
Place = Callable[[str, ir.DataType, list[int]], tuple[ir.Value, list[int]]]
"""``place(name, dtype, dims)``: a new initializer in the dense data file and its
``[offset, bytes]`` there."""


def _is(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain == ""


def _only_use(value: ir.Value) -> ir.Usage | None:
    """The one use of ``value`` when it has exactly one, in its own graph, and is no graph
    output."""
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1 or uses[0].node.graph is not value.graph:
        return None
    return uses[0]


def _site_of(w: ir.Value) -> tuple[str, list[ir.Node]]:
    """``(kind, nodes after the decode node that move into the site)`` of a decoded weight."""
    use = _only_use(w)
    if use is None:
        return "generic", []
    nd, idx = use
    if _is(nd, "Transpose") and list(nd.attributes.get_ints("perm", [1, 0])) == [1, 0]:
        nxt = _only_use(nd.outputs[0])
        if nxt is not None and _is(nxt.node, "MatMul") and nxt.idx == 1:
            return "matmul", [nd, nxt.node]
    a = nd.attributes
    if (_is(nd, "Gemm") and idx == 1 and a.get_int("transB", 0) == 1
            and a.get_int("transA", 0) == 0 and a.get_float("alpha", 1.0) == 1.0
            and a.get_float("beta", 1.0) == 1.0):
        return "gemm", [nd]
    return "generic", []


def _replace(graph: ir.Graph, at: ir.Node, nodes: list[ir.Node], old: list[ir.Value]) -> None:
    """Insert ``nodes`` before ``at``; the last one's outputs take the place (uses, graph
    outputs, names) of ``old``, whose producers become dead code."""
    graph.insert_before(at, nodes)
    for before, after in zip(old, nodes[-1].outputs, strict=True):
        before.replace_all_uses_with(after, replace_graph_outputs=True)
        after.name, before.name = before.name, None
        after.type, after.shape = before.type, before.shape


def _branch(name: str, node: ir.Node, output: str) -> ir.Graph:
    """An ``If`` branch of one node whose output (float) is named ``output``."""
    y = node.outputs[0]
    y.name, y.dtype = output, y.dtype or FLOAT
    return ir.Graph([], [y], nodes=[node], name=name)


def _if(cond: ir.Value, then: ir.Graph, other: ir.Graph, name: str) -> ir.Node:
    return ir.node("If", [cond], {"then_branch": then, "else_branch": other}, name=name)


def add_sites(model: ir.Model, graphs: dict[str, LayerGraph],
              shapes: Mapping[str, list[int]]) -> ir.Model:
    """The mixed variant of ``model`` (a copy sharing its tensors; ``model`` is unchanged)
    whose BitStack layers (``graphs``: layer -> its :class:`LayerGraph`, ``shapes``: layer ->
    dense shape) are sites (see the module doc); sets each ``graphs[layer].site``."""
    m = model.clone()
    m.opset_imports.setdefault("com.microsoft", 1)
    g = m.graph
    nodes = {nd.name: nd for nd in g}

    def value(name: str, dtype: ir.DataType, shape: list[int | str]) -> ir.Value:
        v = ir.val(name, dtype, shape)
        g.inputs.append(v)
        return v

    for i, (layer, a) in enumerate(graphs.items()):
        p = f"es.{i}"
        decode = nodes[a.node]
        kind, moved = _site_of(decode.outputs[0])
        site_nodes = [decode, *moved]
        y = site_nodes[-1].outputs[0]
        fp32 = value(f"{p}.fp32", ir.DataType.BOOL, [])
        if kind == "generic":
            w = value(f"{p}.w", FLOAT, [f"{p}.d{j}" for j in range(len(shapes[layer]))])
            dense = ir.node("Identity", [w], name=f"{p}.identity")
        else:
            x = site_nodes[-1].inputs[0]
            w = value(f"{p}.w", FLOAT, [f"{p}.n", f"{p}.m"] if kind == "matmul"
                      else [f"{p}.m", f"{p}.n"])             # W^T as the MatMul reads it
            dense = (ir.node("MatMul", [x, w], name=f"{p}.matmul") if kind == "matmul" else
                     ir.node("Gemm", [x, w, *moved[0].inputs[2:3]], {"transB": 1},
                             name=f"{p}.gemm"))
        on_the_fly = ir.Graph([], [], nodes=[], name=f"{p}.on_the_fly")
        site = _if(fp32, _branch(f"{p}.fp32_branch", dense, f"{p}.yd"), on_the_fly,
                   f"{p}.if_fp32")
        if kind != "generic":
            int8 = value(f"{p}.int8", ir.DataType.BOOL, [])
            q = value(f"{p}.q", ir.DataType.INT8, [f"{p}.n", f"{p}.m"])
            scale = value(f"{p}.scale", FLOAT, [f"{p}.m"])
            bias = list(moved[0].inputs[2:3]) if kind == "gemm" else []
            dq = ir.node("DynamicQuantizeMatMul", [x, q, scale, *([None, *bias] if bias else [])],
                         domain="com.microsoft", name=f"{p}.int8_matmul")
            site = _if(int8, _branch(f"{p}.int8_branch", dq, f"{p}.yq"),
                       _branch(f"{p}.rest", site, f"{p}.ye"), f"{p}.if_int8")
        _replace(g, site_nodes[-1], [site], [y])
        g.remove(site_nodes)                # the original decode serves the on-the-fly form
        on_the_fly.extend(site_nodes)
        on_the_fly.outputs.append(y)
        y.name = f"{p}.y"
        graphs[layer] = replace(a, site=Site(kind, p))
    return m


def _bias_of(y: ir.Value) -> tuple[ir.Value, ir.Node] | None:
    """``(bias initializer, Add node)`` where the only consumer of ``y`` adds a 1-D
    initializer to it (a ``Linear``'s bias after its ``MatMul``), else None."""
    use = _only_use(y)
    if use is None or not _is(use.node, "Add") or len(use.node.inputs) != 2:
        return None
    other = use.node.inputs[1 - use.idx]
    if (other is None or other is y or other.const_value is None
            or len(other.const_value.shape) != 1):
        return None
    return other, use.node


def _quantized_site(form: str, x: ir.Value, bias: ir.Value | None, p: str, m_out: int,
                    n_in: int, place: Place) -> tuple[ir.Node, dict[str, list[int]]]:
    """The int8 or nbits8 node ``X @ W^T [+ bias]`` over ``[n_in] -> [m_out]`` and where its
    tensors go in the data file."""
    if form == "int8":
        (q, q_at), (scale, s_at) = (place(f"{p}.q", ir.DataType.INT8, [n_in, m_out]),
                                    place(f"{p}.scale", FLOAT, [m_out]))
        return ir.node("DynamicQuantizeMatMul", [x, q, scale, *([None, bias] if bias else [])],
                       domain="com.microsoft", name=f"{p}.matmul"), {"q": q_at, "scale": s_at}
    kb = -(-n_in // NBITS_BLOCK)
    (b, b_at), (s, s_at) = (place(f"{p}.b", ir.DataType.UINT8, [m_out, kb, NBITS_BLOCK]),
                            place(f"{p}.s", FLOAT, [m_out, kb]))
    return ir.node("MatMulNBits", [x, b, s, *([None, None, bias] if bias else [])],
                   {"K": n_in, "N": m_out, "bits": 8, "block_size": NBITS_BLOCK,
                    "accuracy_level": 4}, domain="com.microsoft", name=f"{p}.matmul"), \
        {"b": b_at, "s": s_at}


def _member_layout(form: str, entry: Mapping[str, list[int]], col: int, m_out: int,
                   total: int, n_in: int) -> dict[str, list[int]]:
    """Where one layer of a fused group goes in the group's tensors: its columns
    ``[col, col + m_out)`` of the ``[n_in, total]`` int8 weight (``q_cols``: the runtime
    fills the group's weight, then writes it) and its slice of the scales; for nbits8 its
    rows, which are contiguous."""
    if form == "int8":
        (q_off, q_size), (s_off, _s) = entry["q"], entry["scale"]
        return {"q": [q_off, q_size], "q_cols": [col, col + m_out, total],
                "scale": [s_off + 4 * col, 4 * m_out]}
    kb = -(-n_in // NBITS_BLOCK)
    (b_off, _b), (s_off, _s) = entry["b"], entry["s"]
    return {"b": [b_off + col * kb * NBITS_BLOCK, m_out * kb * NBITS_BLOCK],
            "s": [s_off + 4 * col * kb, 4 * m_out * kb]}


def _concat_biases(biases: list[ir.Value | None]) -> np.ndarray | None | bool:
    """The biases of a group's layers, concatenated (float32), None when no layer has one,
    False when they cannot be fused (some have one, or one is not a constant)."""
    if all(b is None for b in biases):
        return None
    if any(b is None or b.const_value is None for b in biases):
        return False
    return np.concatenate([b.const_value.numpy().astype(np.float32).ravel()
                           for b in biases if b is not None and b.const_value is not None])


@dataclass
class _Layer:
    """A layer of a quantized dense graph: ``y = X @ W^T [+ bias]`` replaces ``last``."""

    name: str
    x: ir.Value
    y: ir.Value
    bias: ir.Value | None
    last: ir.Node
    prefix: str
    m_out: int
    n_in: int


def dense_graph(model: ir.Model, graphs: dict[str, LayerGraph], form: str) -> ir.Model | None:
    """The **int8**, **nbits8** or **fp32** variant (``form``): every BitStack site is its
    dense form directly, no ``If``, no decode and no block inputs: what a plan with every
    layer in ``form`` runs. The site tensors are **initializers** in the external-data file
    :data:`DENSE_DATA` ``[form]``, which the runtime writes per plan: ONNX Runtime then
    treats them as constants and prepacks them (measured on a 12-block MiniLM package, 2
    threads, avx512_vnni, interleaved: 9.8 ms vs 11.1 ms with the same int8 weights fed as
    inputs, and ORT's own per-channel int8 model 9.7 ms).

    - int8: ``DynamicQuantizeMatMul(X, <p>.q, <p>.scale[, bias])``; a ``MatMul`` whose
      output only gets a bias added takes the bias itself (the ``Add`` goes: measured on
      MiniLM, 18 such ``Add`` nodes cost 1 ms a call, and ORT then fuses the activation alone,
      ``Gelu`` 84 us vs ``BiasGelu`` 284 us);
    - nbits8: ``com.microsoft.MatMulNBits`` 8-bit, symmetric, block 32, ``accuracy_level=4``
      over ``<p>.b`` ``[m, n/32, 32]`` uint8 and ``<p>.s`` ``[m, n/32]`` (the weight-only form:
      1.16 bytes a weight, the tier's quality within rounding), the bias taken in as for int8;
    - fp32: ``MatMul(X, <p>.w)`` / ``Gemm(X, <p>.w, C, transB=1)``, the layer's own op.

    In the quantized forms, layers that read the same input (attention's query, key and
    value) are **fused**: one matmul over their weights side by side, then a ``Split`` (their
    biases concatenated; when only some have a constant bias, they stay apart). Measured on
    MiniLM int8: 10.4 -> 9.7 ms a call, outputs bit-identical (per-column quantization does
    not see its neighbours).

    Records in each ``graphs[layer].site.files[form]`` the tensors' ``[offset, bytes]``
    in the data file (``q``/``scale``, ``b``/``s`` or ``w``, page-aligned, in layer order; a
    fused int8 layer's ``q`` is its group's, with ``q_cols`` ``[first, end, total]``: its
    columns). None when a layer has no such form (a ``generic`` site has no int8 form and no
    site node of its own). ``graphs`` must hold the sites (:func:`add_sites` first);
    ``model`` is unchanged (a copy sharing its tensors is edited, then dead code goes with
    onnx-ir's ``RemoveUnusedNodesPass``)."""
    if form not in DENSE_DATA:
        raise ValueError(f"form must be one of {sorted(DENSE_DATA)}, found {form!r}")
    if not graphs or any(a.site is None or a.site.kind == "generic" for a in graphs.values()):
        return None
    m = model.clone()
    m.opset_imports.setdefault("com.microsoft", 1)
    g = m.graph
    nodes = {nd.name: nd for nd in g}
    layout: dict[str, dict[str, list[int]]] = {}
    offset = 0

    def place(name: str, dtype: ir.DataType, dims: list[int]) -> tuple[ir.Value, list[int]]:
        nonlocal offset
        size = int(dtype.itemsize * math.prod(dims))
        v = ir.val(name, const_value=ir.ExternalTensor(
            DENSE_DATA[form], offset, size, dtype, shape=ir.Shape(dims), name=name))
        g.register_initializer(v)
        at, offset = [offset, size], offset + -(-size // DENSE_ALIGN) * DENSE_ALIGN
        return v, at

    layers = []
    for layer, a in graphs.items():
        site = a.site
        assert site is not None
        kind, moved = _site_of(nodes[a.node].outputs[0])
        if kind != site.kind:
            return None
        last, p = moved[-1], site.prefix
        x, y = last.inputs[0], last.outputs[0]
        shape = list(nodes[a.node].attributes.get_ints("shape", []))
        m_out, n_in = shape[0], math.prod(shape[1:])
        if form == "fp32":
            w, at = place(site.w, FLOAT, [n_in, m_out] if kind == "matmul" else [m_out, n_in])
            layout[layer] = {"w": at}
            _replace(g, last, [ir.node("MatMul", [x, w], name=f"{p}.matmul")
                               if kind == "matmul" else
                               ir.node("Gemm", [x, w, *last.inputs[2:3]], {"transB": 1},
                                       name=f"{p}.gemm")], [y])
            continue
        bias = last.inputs[2] if kind == "gemm" and len(last.inputs) > 2 else None
        found = _bias_of(y) if kind == "matmul" else None
        if found is not None:
            bias, y = found[0], found[1].outputs[0]
        layers.append(_Layer(layer, x, y, bias, last, p, m_out, n_in))
    # layers reading the same input (attention's query, key, value) become one matmul over
    # their concatenated weights and a Split: measured on MiniLM int8, 10.4 -> 9.7 ms a call
    groups: dict[ir.Value, list[_Layer]] = {}
    for e in layers:
        groups.setdefault(e.x, []).append(e)
    position = {nd: i for i, nd in enumerate(g)}
    for x, members in groups.items():
        members.sort(key=lambda e: position[e.last])  # the fused node takes the first place
        biases = _concat_biases([e.bias for e in members])
        if len(members) < 2 or biases is False:
            for e in members:
                node, layout[e.name] = _quantized_site(form, x, e.bias, e.prefix, e.m_out,
                                                       e.n_in, place)
                _replace(g, e.last, [node], [e.y])
            continue
        p, total = members[0].prefix + ".group", sum(e.m_out for e in members)
        bias = None
        if isinstance(biases, np.ndarray):
            bias = ir.val(f"{p}.bias", const_value=ir.tensor(biases, name=f"{p}.bias"))
            g.register_initializer(bias)
        node, entry = _quantized_site(form, x, bias, p, total, members[0].n_in, place)
        sizes = [e.m_out for e in members]
        if g.opset_imports.get("", 13) >= 13:
            split_sizes = ir.val(f"{p}.sizes", const_value=ir.tensor(np.array(sizes, np.int64),
                                                                     name=f"{p}.sizes"))
            g.register_initializer(split_sizes)
            split = ir.node("Split", [node.outputs[0], split_sizes], {"axis": -1},
                            num_outputs=len(members), name=f"{p}.split")
        else:
            split = ir.node("Split", [node.outputs[0]], {"axis": -1, "split": sizes},
                            num_outputs=len(members), name=f"{p}.split")
        node.outputs[0].name = f"{p}.y"
        _replace(g, members[0].last, [node, split], [e.y for e in members])
        col = 0
        for e in members:
            layout[e.name] = _member_layout(form, entry, col, e.m_out, total, e.n_in)
            col += e.m_out
    RemoveUnusedNodesPass()(m)   # the decode nodes, their Transposes, the replaced matmuls
    blocks = {name for a in graphs.values() for name in (a.signs, a.u, a.v)}
    for v in [v for v in g.inputs if v.name in blocks]:
        g.inputs.remove(v)
    for layer, at in layout.items():
        site = graphs[layer].site
        assert site is not None
        graphs[layer] = replace(graphs[layer], site=replace(site, files={**site.files,
                                                                          form: at}))
    return m


__all__ = ["add_sites", "dense_graph"]
