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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from edgestack.package.format import DENSE_ALIGN, DENSE_DATA, NBITS_BLOCK, LayerGraph, Site


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name),
                default)


def _copy(model: Any) -> tuple[Any, dict[str, list[Any]], set[str], dict[str, Any]]:
    """A copy of ``model`` importing ``com.microsoft``, with its main graph's consumers by
    value, output names and nodes by output."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    consumers: dict[str, list[Any]] = {}
    for nd in m.graph.node:
        for i in nd.input:
            consumers.setdefault(i, []).append(nd)
    return (m, consumers, {o.name for o in m.graph.output},
            {o: nd for nd in m.graph.node for o in nd.output})


def _site_of(graph: Any, output: str, consumers: Mapping[str, list[Any]],
             graph_outputs: set[str]) -> tuple[str, list[Any]]:
    """``(kind, nodes after the decode node that move into the site)``."""
    users = consumers.get(output, [])
    if output in graph_outputs or len(users) != 1:
        return "generic", []
    nd = users[0]
    if (nd.op_type == "Transpose" and nd.domain in ("", "ai.onnx")
            and list(_attr(nd, "perm", [1, 0])) == [1, 0]
            and nd.output[0] not in graph_outputs):
        nxt = consumers.get(nd.output[0], [])
        if (len(nxt) == 1 and nxt[0].op_type == "MatMul" and nxt[0].domain in ("", "ai.onnx")
                and list(nxt[0].input) == [nxt[0].input[0], nd.output[0]]
                and nxt[0].input[0] != nd.output[0]):
            return "matmul", [nd, nxt[0]]
    if (nd.op_type == "Gemm" and nd.domain in ("", "ai.onnx") and len(nd.input) >= 2
            and nd.input[1] == output and nd.input[0] != output
            and _attr(nd, "transB", 0) == 1 and _attr(nd, "transA", 0) == 0
            and _attr(nd, "alpha", 1.0) == 1.0 and _attr(nd, "beta", 1.0) == 1.0):
        return "gemm", [nd]
    return "generic", []


def add_sites(model: Any, graphs: dict[str, LayerGraph],
              shapes: Mapping[str, list[int]]) -> Any:
    """The mixed variant of ``model`` (a new ModelProto; ``model`` is unchanged) whose
    BitStack layers (``graphs``: layer -> its :class:`LayerGraph`, ``shapes``: layer -> dense
    shape) are sites (see the module doc); sets each ``graphs[layer].site``."""
    import onnx
    from onnx import TensorProto, helper

    m, consumers, graph_outputs, by_output = _copy(model)
    g = m.graph
    swap: dict[int, Any] = {}        # id(node) -> the If node taking its place
    drop: set[int] = set()
    new_inputs = []

    def boolean(name: str) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.BOOL, [])

    for i, (layer, a) in enumerate(graphs.items()):
        p = f"es.{i}"
        decode = by_output[a.output]
        kind, moved = _site_of(g, a.output, consumers, graph_outputs)
        shape = list(shapes[layer])
        last = moved[-1] if moved else decode
        y = last.output[0]
        inner = f"{p}.y"                 # the moved nodes' output, renamed inside the branch
        otf_nodes = []
        for nd in [decode, *moved]:
            c = onnx.NodeProto()
            c.CopyFrom(nd)
            if nd is last:
                c.output[0] = inner
            otf_nodes.append(c)
            drop.add(id(nd))
        otf = helper.make_graph(otf_nodes, f"{p}.on_the_fly", [],
                                [helper.make_tensor_value_info(inner, TensorProto.FLOAT, None)])
        if kind == "matmul":
            x = moved[1].input[0]
            dense_node = helper.make_node("MatMul", [x, f"{p}.w"], [f"{p}.yd"])
            w_shape = [f"{p}.n", f"{p}.m"]          # W^T, as the MatMul reads it
        elif kind == "gemm":
            x = moved[0].input[0]
            dense_node = helper.make_node("Gemm", [x, f"{p}.w", *moved[0].input[2:3]],
                                          [f"{p}.yd"], transB=1)
            w_shape = [f"{p}.m", f"{p}.n"]
        else:
            dense_node = helper.make_node("Identity", [f"{p}.w"], [f"{p}.yd"])
            w_shape = [f"{p}.d{j}" for j in range(len(shape))]
        fp32 = helper.make_graph([dense_node], f"{p}.fp32_branch", [],
                                 [helper.make_tensor_value_info(f"{p}.yd", TensorProto.FLOAT,
                                                                None)])
        inner_if = helper.make_node("If", [f"{p}.fp32"], [f"{p}.ye"], then_branch=fp32,
                                    else_branch=otf, name=f"{p}.if_fp32")
        new_inputs += [boolean(f"{p}.fp32"),
                       helper.make_tensor_value_info(f"{p}.w", TensorProto.FLOAT, w_shape)]
        if kind == "generic":
            inner_if.output[0] = y
            swap[id(decode)] = inner_if
        else:
            bias = moved[0].input[2:3] if kind == "gemm" else []
            dq = helper.make_node("DynamicQuantizeMatMul",
                                  [x, f"{p}.q", f"{p}.scale", *(["", bias[0]] if bias else [])],
                                  [f"{p}.yq"], domain="com.microsoft")
            int8 = helper.make_graph([dq], f"{p}.int8_branch", [],
                                     [helper.make_tensor_value_info(f"{p}.yq", TensorProto.FLOAT,
                                                                    None)])
            rest = helper.make_graph([inner_if], f"{p}.rest", [],
                                     [helper.make_tensor_value_info(f"{p}.ye", TensorProto.FLOAT,
                                                                    None)])
            outer = helper.make_node("If", [f"{p}.int8"], [y], then_branch=int8,
                                     else_branch=rest, name=f"{p}.if_int8")
            swap[id(last)] = outer
            new_inputs += [boolean(f"{p}.int8"),
                           helper.make_tensor_value_info(f"{p}.q", TensorProto.INT8,
                                                         [f"{p}.n", f"{p}.m"]),
                           helper.make_tensor_value_info(f"{p}.scale", TensorProto.FLOAT,
                                                         [f"{p}.m"])]
        graphs[layer] = replace(a, site=Site(kind, p))
    nodes = []
    for nd in g.node:
        if id(nd) in swap:
            nodes.append(swap[id(nd)])
        elif id(nd) not in drop:
            nodes.append(nd)
    del g.node[:]
    g.node.extend(nodes)
    g.input.extend(new_inputs)
    return m


def _bias_of(g: Any, y: str, consumers: Mapping[str, list[Any]],
             graph_outputs: set[str]) -> tuple[str, Any] | None:
    """``(bias initializer, Add node)`` where the only consumer of ``y`` adds a 1-D
    initializer to it (a ``Linear``'s bias after its ``MatMul``), else None."""
    users = consumers.get(y, [])
    if y in graph_outputs or len(users) != 1:
        return None
    add = users[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == y else add.input[0]
    init = next((t for t in g.initializer if t.name == other), None)
    if other == y or init is None or len(init.dims) != 1:
        return None
    return other, add


def _quantized_site(form: str, x: str, y: str, bias: str | None, p: str, m_out: int,
                    n_in: int, external: Any) -> tuple[Any, dict[str, list[int]]]:
    """The int8 or nbits8 node ``y = X @ W^T [+ bias]`` over ``[n_in] -> [m_out]`` and its
    data-file entries (``external(name, dtype, dims, itemsize)`` places a tensor)."""
    from onnx import TensorProto, helper

    if form == "int8":
        node = helper.make_node("DynamicQuantizeMatMul",
                                [x, f"{p}.q", f"{p}.scale", *(["", bias] if bias else [])],
                                [y], domain="com.microsoft", name=f"{p}.matmul")
        return node, {"q": external(f"{p}.q", TensorProto.INT8, [n_in, m_out], 1),
                      "scale": external(f"{p}.scale", TensorProto.FLOAT, [m_out], 4)}
    kb = -(-n_in // NBITS_BLOCK)
    node = helper.make_node("MatMulNBits", [x, f"{p}.b", f"{p}.s", *(["", "", bias] if bias
                                                                      else [])],
                            [y], domain="com.microsoft", name=f"{p}.matmul", K=n_in, N=m_out,
                            bits=8, block_size=NBITS_BLOCK, accuracy_level=4)
    return node, {"b": external(f"{p}.b", TensorProto.UINT8, [m_out, kb, NBITS_BLOCK], 1),
                  "s": external(f"{p}.s", TensorProto.FLOAT, [m_out, kb], 4)}


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


def _concat_biases(names: list[str | None], g: Any, base_dir: str | None) -> Any:
    """The biases of a group's layers, concatenated (float32), None when no layer has one,
    False when they cannot be fused (some have one, or a value cannot be read)."""
    import numpy as np
    from onnx import numpy_helper

    if all(n is None for n in names):
        return None
    if any(n is None for n in names):
        return False
    by_name = {t.name: t for t in g.initializer}
    try:
        return np.concatenate([numpy_helper.to_array(by_name[n], base_dir=base_dir or "")
                               .astype(np.float32).ravel() for n in names])
    except (KeyError, OSError, ValueError):
        return False


def dense_graph(model: Any, graphs: dict[str, LayerGraph], form: str,
                base_dir: str | None = None) -> Any | None:
    """The **int8** or **fp32** variant (``form``): every BitStack site is its dense form
    directly, no ``If``, no decode and no block inputs: what a plan with every layer in
    ``form`` runs. The site tensors are **initializers** in the external-data file
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
    biases concatenated from ``base_dir``'s external data; without it, or when only some
    have a bias, they stay apart). Measured on MiniLM int8: 10.4 -> 9.7 ms a call, outputs
    bit-identical (per-column quantization does not see its neighbours).

    Records in each ``graphs[layer].site.files[form]`` the tensors' ``[offset, bytes]``
    in the data file (``q``/``scale``, ``b``/``s`` or ``w``, page-aligned, in layer order; a
    fused int8 layer's ``q`` is its group's, with ``q_cols`` ``[first, end, total]``: its
    columns). None when a
    layer has no such form (a ``generic`` site has no int8 form and no site node of its
    own). ``graphs`` must hold the sites (:func:`add_sites` first); ``model`` is unchanged."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if form not in DENSE_DATA:
        raise ValueError(f"form must be one of {sorted(DENSE_DATA)}, found {form!r}")
    if not graphs or any(a.site is None or a.site.kind == "generic" for a in graphs.values()):
        return None
    m, consumers, graph_outputs, by_output = _copy(model)
    g = m.graph
    swap: dict[int, Any] = {}
    drop: set[int] = set()
    drop_inputs: set[str] = set()
    initializers = []
    layout: dict[str, dict[str, list[int]]] = {}
    offset = 0

    def external(name: str, dtype: int, dims: list[int], itemsize: int) -> list[int]:
        nonlocal offset
        t = TensorProto(name=name, data_type=dtype, dims=dims,
                        data_location=TensorProto.EXTERNAL)
        size = itemsize
        for d in dims:
            size *= d
        for key, value in (("location", DENSE_DATA[form]), ("offset", str(offset)),
                           ("length", str(size))):
            t.external_data.add(key=key, value=value)
        initializers.append(t)
        entry = [offset, size]
        offset += -(-size // DENSE_ALIGN) * DENSE_ALIGN
        return entry

    entries = []
    for layer, a in graphs.items():
        site = a.site
        assert site is not None
        decode = by_output[a.output]
        kind, moved = _site_of(g, a.output, consumers, graph_outputs)
        if kind != site.kind:
            return None
        last = moved[-1]
        x, y = last.input[0], last.output[0]
        p = site.prefix
        shape = list(_attr(decode, "shape", []))
        m_out, n_in = shape[0], math.prod(shape[1:])
        drop |= {id(decode), *(id(nd) for nd in moved[:-1])}
        drop_inputs |= {a.signs, a.u, a.v}
        if form == "fp32":
            swap[id(last)] = (
                helper.make_node("MatMul", [x, site.w], [y], name=f"{p}.matmul")
                if kind == "matmul" else
                helper.make_node("Gemm", [x, site.w, *last.input[2:3]], [y], transB=1,
                                 name=f"{p}.gemm"))
            dims = [n_in, m_out] if kind == "matmul" else [m_out, n_in]
            layout[layer] = {"w": external(site.w, TensorProto.FLOAT, dims, 4)}
            continue
        bias = last.input[2:3] if kind == "gemm" else []
        found = _bias_of(g, y, consumers, graph_outputs) if kind == "matmul" else None
        if found is not None:
            bias, add = [found[0]], found[1]
            y = add.output[0]
            drop.add(id(add))
        entries.append((layer, x, y, bias[0] if bias else None, last, p, m_out, n_in))
    # layers reading the same input (attention's query, key, value) become one matmul over
    # their concatenated weights and a Split: measured on MiniLM int8, 10.4 -> 9.7 ms a call
    groups: dict[str, list[Any]] = {}
    for e in entries:
        groups.setdefault(e[1], []).append(e)
    split_opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)
    position = {id(nd): i for i, nd in enumerate(g.node)}
    for x, members in groups.items():
        members.sort(key=lambda e: position[id(e[4])])   # the fused node takes the first place
        biases = _concat_biases([e[3] for e in members], g, base_dir)
        if len(members) < 2 or biases is False:
            for layer, _x, y, bias, last, p, m_out, n_in in members:
                swap[id(last)], layout[layer] = _quantized_site(
                    form, x, y, bias, p, m_out, n_in, external)
            continue
        p = members[0][5] + ".group"
        total = sum(e[6] for e in members)
        bias_name = None
        if biases is not None:
            bias_name = f"{p}.bias"
            initializers.append(numpy_helper.from_array(biases, bias_name))
        node, entry = _quantized_site(form, x, f"{p}.y", bias_name, p, total, members[0][7],
                                      external)
        sizes = [e[6] for e in members]
        outs = [e[2] for e in members]
        if split_opset >= 13:
            initializers.append(numpy_helper.from_array(np.array(sizes, np.int64),
                                                        f"{p}.sizes"))
            split = helper.make_node("Split", [f"{p}.y", f"{p}.sizes"], outs, axis=-1,
                                     name=f"{p}.split")
        else:
            split = helper.make_node("Split", [f"{p}.y"], outs, axis=-1, split=sizes,
                                     name=f"{p}.split")
        swap[id(members[0][4])] = [node, split]
        drop |= {id(e[4]) for e in members[1:]}
        col = 0
        for layer, _x, _y, _b, _last, _p, m_out, n_in in members:
            layout[layer] = _member_layout(form, entry, col, m_out, total, n_in)
            col += m_out
    nodes = []
    for nd in g.node:
        if id(nd) not in drop:
            new = swap.get(id(nd), nd)
            nodes.extend(new if isinstance(new, list) else [new])
    del g.node[:]
    g.node.extend(nodes)
    inputs = [vi for vi in g.input if vi.name not in drop_inputs]
    del g.input[:]
    g.input.extend(inputs)
    g.initializer.extend(initializers)
    for layer, entry in layout.items():
        site = graphs[layer].site
        assert site is not None
        graphs[layer] = replace(graphs[layer], site=replace(site, files={**site.files,
                                                                          form: entry}))
    return m


__all__ = ["add_sites", "dense_graph"]
