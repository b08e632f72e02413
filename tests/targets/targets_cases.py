"""Small ONNX layer models for the target tests: one edgestack decode op feeding a consumer.

Each case is ``(name, model_proto, feeds, reference_outputs, exact)``; the reference is numpy
(or torch for conv) on the :mod:`edgestack.formats` decode of the same weight.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgestack.exporter import ops
from edgestack.formats import BitStackStack, ShiftCodes

from random_weights import random_shift  # noqa: F401 (re-exported)
from random_weights import random_stack as _random_stack

OPSET = 20


def random_stack(rng: np.random.Generator, shape: tuple[int, ...], n_blocks: int,
                 k: int) -> BitStackStack:
    """Random stack with factors scaled by 0.3 (keeps decoded weights near unit scale)."""
    return _random_stack(rng, shape, n_blocks, k, factor_scale=0.3)


def _decode_node(fmt: Any, prefix: str) -> tuple[onnx.NodeProto, list, str]:
    out = f"{prefix}_w"
    if isinstance(fmt, ShiftCodes):
        inits = [numpy_helper.from_array(fmt.codes, f"{prefix}_codes"),
                 numpy_helper.from_array(fmt.scale, f"{prefix}_scale")]
        node = helper.make_node("ShiftWeight", [i.name for i in inits], [out],
                                name=f"{prefix}_decode", domain="edgestack", bits=fmt.bits,
                                zero=int(fmt.zero), shape=list(fmt.shape))
    else:
        inits = [numpy_helper.from_array(fmt.signs, f"{prefix}_signs"),
                 numpy_helper.from_array(fmt.u, f"{prefix}_u"),
                 numpy_helper.from_array(fmt.v, f"{prefix}_v")]
        node = helper.make_node("BitStackWeight", [i.name for i in inits], [out],
                                name=f"{prefix}_decode", domain="edgestack",
                                shape=list(fmt.shape))
    return node, inits, out


def _model(nodes: list, inits: list, inputs: list, outputs: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                     helper.make_opsetid("edgestack", 1)])
    model.ir_version = 10
    used = {n.op_type for n in nodes if n.domain == "edgestack"}
    model.functions.extend(ops.OPS[name].function_proto(OPSET) for name in sorted(used))
    onnx.checker.check_model(model, full_check=True)
    return model


def linear_case(fmt: Any, batch: int, tokens: int, gemm: bool = False,
                rng: np.random.Generator | None = None):
    """``y = x @ W^T + b`` as Transpose+MatMul+Add (``[B, T, in]``) or Gemm(transB=1)."""
    rng = rng or np.random.default_rng(0)
    out_f, in_f = fmt.shape
    node, inits, w = _decode_node(fmt, "fc")
    bias = rng.standard_normal(out_f).astype(np.float32)
    inits.append(numpy_helper.from_array(bias, "fc_b"))
    if gemm:
        x = rng.standard_normal((batch, in_f)).astype(np.float32)
        nodes = [node, helper.make_node("Gemm", ["x", w, "fc_b"], ["y"], transB=1)]
        xin = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_f])
        yout = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_f])
    else:
        x = rng.standard_normal((batch, tokens, in_f)).astype(np.float32)
        nodes = [node, helper.make_node("Transpose", [w], ["wt"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "wt"], ["mm"]),
                 helper.make_node("Add", ["mm", "fc_b"], ["y"])]
        xin = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, tokens, in_f])
        yout = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, tokens, out_f])
    ref = (x.astype(np.float64) @ fmt.decode().astype(np.float64).T + bias).astype(np.float32)
    return _model(nodes, inits, [xin], [yout]), {"x": x}, {"y": ref}


def conv_case(fmt: Any, batch: int, hw: tuple[int, int], groups: int, stride: int, pad: int,
              rng: np.random.Generator | None = None):
    """``Conv(x, W, b)`` with groups, stride and padding; reference: torch conv2d."""
    import torch

    rng = rng or np.random.default_rng(0)
    cout, cin_g, kh, kw = fmt.shape
    cin = cin_g * groups
    node, inits, w = _decode_node(fmt, "conv")
    bias = rng.standard_normal(cout).astype(np.float32)
    inits.append(numpy_helper.from_array(bias, "conv_b"))
    x = rng.standard_normal((batch, cin, *hw)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", w, "conv_b"], ["y"], group=groups,
                            strides=[stride, stride], pads=[pad] * 4)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(),
                                     torch.from_numpy(fmt.decode()).double(),
                                     torch.from_numpy(bias).double(), stride=stride,
                                     padding=pad, groups=groups).float().numpy()
    xin = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))
    yout = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(ref.shape))
    return _model([node, conv], inits, [xin], [yout]), {"x": x}, {"y": ref}


def decode_case(fmts: list):
    """Decode ops alone, one output per weight (``w0, w1, ...``); reference: numpy decode."""
    nodes, inits, outs, ref = [], [], [], {}
    for k, fmt in enumerate(fmts):
        node, ins, _ = _decode_node(fmt, f"d{k}")
        node.output[0] = f"w{k}"
        nodes.append(node)
        inits += ins
        outs.append(helper.make_tensor_value_info(f"w{k}", TensorProto.FLOAT, list(fmt.shape)))
        ref[f"w{k}"] = fmt.decode()
    # a dummy input so every backend has a feed
    nodes.append(helper.make_node("Identity", ["x"], ["x_out"]))
    outs.append(helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1]))
    ref["x_out"] = np.ones(1, np.float32)
    xin = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    return _model(nodes, inits, [xin], outs), {"x": np.ones(1, np.float32)}, ref
