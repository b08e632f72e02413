"""Transformer fusions for ONNX Runtime's CPU kernels (``com.microsoft`` contrib ops).

ONNX Runtime's own optimizer already fuses ``Add + LayerNormalization`` into
``SkipLayerNormalization`` and the int8 matmul graph into ``DynamicQuantizeMatMul``, but its
attention fusion (C++ and ``onnxruntime.transformers.optimizer``) does not recognize the
self-attention that ``torch.onnx.export(dynamo=True)`` writes (keys transposed with
``perm=[0, 2, 3, 1]``, the scale multiplied after ``Q @ K^T``, an additive ``Where`` mask):
``optimize_model(model_type="bert")`` reports 0 ``Attention`` on MiniLM. This pass matches
that form itself, so the attention runs in one kernel.

Rewrites (``q``, ``k``, ``v``: ``[B, S, D]`` tensors, whatever computes them: fp32 MatMul + Add,
integer matmuls, ...):

- self-attention::

      Q = Transpose(Reshape(q, [B, S, H, d]), [0, 2, 1, 3])
      K = Transpose(Reshape(k, [B, S, H, d]), [0, 2, 3, 1])
      V = Transpose(Reshape(v, [B, S, H, d]), [0, 2, 1, 3])
      P = Softmax(Add(Mul(MatMul(Q, K), c), mask), axis=-1)     # Mul by c or Div by 1/c;
      out = Reshape(Transpose(MatMul(P, V), [0, 2, 1, 3]), [B, S, D])   # the Add is optional

  -> ``com.microsoft.MultiHeadAttention(q, k, v, attention_bias=mask, num_heads=H, scale=c)``
  (``mask`` must be 4-D ``[B|1, H|1, S, T]`` with the scores' ``S, T``; q/k/v float32 and 3-D;
  the head count comes from the Reshape shape, from ``D / d``, or from the ``num_heads``
  option). Same math in fp32 (summation order differs).
- ``Gelu(Add(x, b))`` with a constant 1-D ``b`` -> ``com.microsoft.BiasGelu(x, b)`` (erf form)
  or ``com.microsoft.FastGelu(x, b)`` (``approximate="tanh"``).

A graph with no attention match is left alone; the pass records why in its report
(``attention_skipped``: Softmax node -> reason) and logs it, so non-transformer models
compile unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from edgestack.targets.passes._util import (
    attrs,
    const_array,
    drop_unused_initializers,
    replace_node,
)

log = logging.getLogger(__name__)
MS_DOMAIN = "com.microsoft"


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _single_use(value: ir.Value) -> bool:
    return len(list(value.uses())) == 1 and not value.is_graph_output()


def _perm(node: ir.Node | None) -> list[int] | None:
    return None if node is None else attrs(node).get("perm")


def _scalar(value: ir.Value | None) -> float | None:
    arr = const_array(value)
    if arr is None or arr.size != 1 or not np.issubdtype(arr.dtype, np.floating):
        return None
    return float(arr.reshape(()))


class _NoMatch(Exception):
    pass


def _need(cond: object, why: str) -> None:
    if not cond:
        raise _NoMatch(why)


class TransformerFusionPass(ir.passes.InPlacePass):
    """Fuse self-attention into ``MultiHeadAttention`` and ``Add + Gelu`` into ``BiasGelu``.

    Args:
        num_heads: head count to use when the graph does not say (the Reshape has ``-1`` heads
            and the hidden size is unknown); ``None``: infer, skip the layer if impossible.
    """

    def __init__(self, num_heads: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.report: dict = {}

    # ---- attention ----------------------------------------------------------------------
    def _split_heads(self, t: ir.Node | None, perm: list[int], what: str
                     ) -> tuple[ir.Value, ir.Node, ir.Node, list[int]]:
        _need(t is not None and t.op_type == "Transpose" and _perm(t) == perm,
              f"{what} is not Transpose(perm={perm})")
        rs = _producer(t.inputs[0], "Reshape")
        _need(rs is not None, f"{what}: Transpose input is not a Reshape")
        shape = const_array(rs.inputs[1])
        _need(shape is not None and shape.size == 4 and int(shape[3]) > 0,
              f"{what}: Reshape shape is not a constant [B, S, H, d] with d > 0")
        _need(_single_use(t.outputs[0]) and _single_use(rs.outputs[0]),
              f"{what}: head split read by other nodes")
        return rs.inputs[0], rs, t, [int(x) for x in shape]

    def _heads(self, shape: list[int], x: ir.Value) -> int:
        if shape[2] > 0:
            return shape[2]
        hidden = x.shape[-1] if x.shape is not None and len(x.shape) else None
        if isinstance(hidden, int) and hidden % shape[3] == 0:
            return hidden // shape[3]
        # the hidden size from a constant bias added just before (Linear's Add)
        add = _producer(x, "Add")
        for inp in (add.inputs if add is not None else ()):
            b = const_array(inp)
            if b is not None and b.ndim == 1 and b.size % shape[3] == 0:
                return b.size // shape[3]
        _need(self.num_heads, "head count unknown (Reshape has -1 heads, hidden size not "
              "inferable); pass num_heads")
        return int(self.num_heads)

    def _match_attention(self, sm: ir.Node, opset: int) -> tuple[dict, list[ir.Node]]:
        # opset < 13: Softmax flattens at ``axis`` (default 1); 3 on 4-D scores is the last axis
        axis = attrs(sm).get("axis", -1 if opset >= 13 else 1)
        _need(axis in (-1, 3), "Softmax is not over the last axis")
        pv_uses = list(sm.outputs[0].uses())
        _need(len(pv_uses) == 1 and pv_uses[0].node.op_type == "MatMul" and pv_uses[0].idx == 0,
              "Softmax output is not only read by MatMul(P, V)")
        pv = pv_uses[0].node
        x = sm.inputs[0]
        mask = None
        nodes = [sm, pv]
        add = _producer(x, "Add")
        if add is not None:
            _need(_single_use(x), "masked scores read by other nodes")
            a, b = add.inputs
            mul_a = _producer(a, "Mul") or _producer(a, "Div") or _producer(a, "MatMul")
            x, mask = (a, b) if mul_a is not None else (b, a)
            nodes.append(add)
        scale = None
        sc = _producer(x, "Mul") or _producer(x, "Div")
        if sc is not None:
            _need(_single_use(x), "scaled scores read by other nodes")
            c = _scalar(sc.inputs[1])
            x = sc.inputs[0]
            if c is None and sc.op_type == "Mul":
                c, x = _scalar(sc.inputs[0]), sc.inputs[1]
            _need(c is not None and c != 0, f"score scale {sc.op_type} is not by a scalar")
            scale = c if sc.op_type == "Mul" else 1.0 / c
            nodes.append(sc)
        qk = _producer(x, "MatMul")
        _need(qk is not None and _single_use(x), "scores are not a single-use MatMul(Q, K^T)")
        nodes.append(qk)
        q, rq, tq, sq = self._split_heads(qk.inputs[0].producer(), [0, 2, 1, 3], "Q")
        k, rk, tk, sk = self._split_heads(qk.inputs[1].producer(), [0, 2, 3, 1], "K^T")
        v, rv, tv, sv = self._split_heads(pv.inputs[1].producer(), [0, 2, 1, 3], "V")
        _need(sq[3] == sk[3] == sv[3], "Q, K, V head sizes differ")
        nodes += [rq, tq, rk, tk, rv, tv]
        _need(_single_use(pv.outputs[0]), "attention output read by other nodes")
        to = pv.outputs[0].uses()
        to = next(iter(to)).node
        _need(to.op_type == "Transpose" and _perm(to) == [0, 2, 1, 3] and
              _single_use(to.outputs[0]), "attention output is not Transpose([0, 2, 1, 3])")
        ro = next(iter(to.outputs[0].uses())).node
        oshape = const_array(ro.inputs[1]) if ro.op_type == "Reshape" else None
        _need(oshape is not None and oshape.size == 3, "heads are not merged by a Reshape "
              "to [B, S, D]")
        nodes += [to, ro]
        heads = self._heads(sq, q)
        _need(sk[2] in (-1, heads) and sv[2] in (-1, heads), "Q, K, V head counts differ")
        if scale is None:
            scale = 1.0
        for name, val in (("Q", q), ("K", k), ("V", v)):
            _need(val.shape is not None and len(val.shape) == 3,
                  f"{name} input is not known to be 3-D [B, S, D]")
            _need(val.dtype in (None, ir.DataType.FLOAT), f"{name} is {val.dtype}, not float32 "
                  "(ONNX Runtime's CPU MultiHeadAttention runs float32)")
            hidden = val.shape[-1]
            _need(not isinstance(hidden, int) or hidden == heads * sq[3],
                  f"{name} has {hidden} features, not num_heads {heads} x head size {sq[3]}")
        if mask is not None:
            ms, ss = mask.shape, add.outputs[0].shape
            _need(ms is not None and ss is not None and len(ms) == 4 and len(ss) == 4
                  and ms[2] == ss[2] and ms[3] == ss[3] and ms[0] in (1, ss[0])
                  and ms[1] in (1, ss[1]),
                  f"mask shape {ms} is not [B|1, H|1, S, T] of scores {ss} (MultiHeadAttention "
                  "takes that attention_bias only)")
        return {"q": q, "k": k, "v": v, "mask": mask, "heads": heads, "scale": scale,
                "head_size": sq[3], "out": ro}, nodes

    def _fuse_attention(self, graph: ir.Graph, opset: int
                        ) -> tuple[int, dict[str, str], set[int]]:
        fused, skipped, heads = 0, {}, set()
        for sm in [n for n in graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]:
            try:
                m, nodes = self._match_attention(sm, opset)
            except _NoMatch as exc:
                skipped[sm.name] = str(exc)
                continue
            base = sm.name or "attn"
            inputs = [m["q"], m["k"], m["v"], None, None, m["mask"]]
            while inputs and inputs[-1] is None:
                inputs.pop()
            mha = ir.Node(MS_DOMAIN, "MultiHeadAttention", inputs, attributes=[
                ir.AttrInt64("num_heads", m["heads"]), ir.AttrFloat32("scale", m["scale"])],
                name=f"{base}_mha", num_outputs=1)
            out = mha.outputs[0]
            out.name = f"{base}_mha_out"
            out.dtype = ir.DataType.FLOAT
            old = m["out"]
            if old.outputs[0].shape is not None:
                out.shape = old.outputs[0].shape
            replace_node(graph, old, out, [mha])
            # the rest of the matched subgraph, now unused
            graph.remove([n for n in nodes if n is not old], safe=True)
            fused += 1
            heads.add(m["heads"])
        return fused, skipped, heads

    # ---- gelu ---------------------------------------------------------------------------
    def _fuse_gelu(self, graph: ir.Graph) -> int:
        done = 0
        for g in [n for n in graph if n.op_type == "Gelu" and n.domain in ("", "ai.onnx")]:
            add = _producer(g.inputs[0], "Add")
            if add is None or not _single_use(add.outputs[0]):
                continue
            a, b = add.inputs
            ba = const_array(b)
            if ba is None or ba.ndim != 1:
                a, b = b, a
                ba = const_array(b)
            if ba is None or ba.ndim != 1 or ba.dtype != np.float32:
                continue
            op = {"none": "BiasGelu", "tanh": "FastGelu"}.get(
                attrs(g).get("approximate", "none"))
            if op is None:
                continue
            node = ir.Node(MS_DOMAIN, op, [a, b], name=f"{g.name or 'gelu'}_{op}",
                           num_outputs=1)
            node.outputs[0].name = f"{g.name or 'gelu'}_{op}_out"
            node.outputs[0].dtype = g.outputs[0].dtype
            node.outputs[0].shape = g.outputs[0].shape
            replace_node(graph, g, node.outputs[0], [node])
            graph.remove(add, safe=True)
            done += 1
        return done

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
        fused, skipped, heads = self._fuse_attention(graph, opset)
        gelu = self._fuse_gelu(graph)
        if fused or gelu:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        if not fused:
            why = ("no Softmax in the graph (not a transformer)" if not skipped else
                   "; ".join(sorted(set(skipped.values()))))
            log.info("attention fusion skipped: %s", why)
        drop_unused_initializers(model)
        self.report = {"attention_fused": fused, "num_heads": sorted(heads),
                       "attention_skipped": skipped, "bias_gelu_fused": gelu}
        return ir.passes.PassResult(model, bool(fused or gelu))

