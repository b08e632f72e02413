"""Which ONNX operators and dtypes TensorRT 10's ONNX parser accepts.

Encoded from onnx-tensorrt ``docs/operators.md`` (the TensorRT 10.x support matrix: opsets
9..20; data types FLOAT32, FLOAT16, BFLOAT16, INT32, INT64, INT8/INT4/FP8 as *quantized*
types reachable only through Q/DQ, UINT8 only as a network input or output, BOOL). Ops not
in :data:`SUPPORTED` are rejected (``N`` in the matrix, or not listed, e.g. ``BitShift``,
``MatMulInteger``, ``DynamicQuantizeLinear``, ``ConvInteger``, the ``com.microsoft``
contrib ops). Where the matrix is uncertain for a 10.x minor version this table errs on the
side of rejecting. Restrictions checked by :func:`check_graph`: ``DequantizeLinear`` /
``QuantizeLinear`` zero points must be zero (symmetric), Conv weights must be initializers
or DQ of initializers, and no tensor may be uint8 except a graph input/output.
"""

from __future__ import annotations

from typing import Any

FLOATS = ("float32", "float16", "bfloat16")
INTS = ("int32", "int64")
BOOLS = ("bool",)

#: op type -> dtypes of its (main) tensors TensorRT 10 accepts.
SUPPORTED: dict[str, tuple[str, ...]] = {
    **{op: FLOATS for op in (
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BatchNormalization", "Ceil",
        "Celu", "Cos", "Cosh", "Elu", "Erf", "Exp", "Floor", "Gelu", "GlobalLpPool",
        "GRU", "HardSigmoid", "HardSwish", "InstanceNormalization", "GroupNormalization",
        "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "LRN", "LSTM",
        "LpNormalization", "LpPool", "Mish", "Pow", "PRelu", "RandomNormal",
        "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Reciprocal", "ReduceL1",
        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "Resize", "RNN",
        "Round", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus", "Softsign",
        "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Dropout", "Einsum", "Trilu",
        "QuantizeLinear", "ConvTranspose", "Conv", "MatMul", "Gemm", "AveragePool",
        "GlobalAveragePool", "GlobalMaxPool", "MaxPool", "Relu", "Clip", "Shrink")},
    **{op: FLOATS + INTS for op in (
        "Abs", "Add", "ArgMax", "ArgMin", "CumSum", "Div", "Equal", "Greater",
        "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Neg",
        "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "Range", "Sign",
        "Sub", "Sum", "TopK", "NonZero", "OneHot")},
    **{op: FLOATS + INTS + BOOLS + ("int8",) for op in (
        "Cast", "Concat", "Constant", "ConstantOfShape", "DepthToSpace", "Expand", "EyeLike",
        "Flatten", "Gather", "GatherElements", "GatherND", "Identity", "If", "Loop", "Pad",
        "Reshape", "ScatterElements", "ScatterND", "Shape", "Size", "Slice", "SpaceToDepth",
        "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze", "Where", "Scan",
        "ReverseSequence", "Compress")},
    **{op: BOOLS for op in ("And", "Or", "Xor", "Not")},
    "IsNaN": FLOATS, "IsInf": FLOATS,
    "DequantizeLinear": ("int8", "int4", "float8e4m3fn"),
}

REJECTED_NOTES = {
    "BitShift": "not supported by TensorRT (operators.md: N)",
    "BitwiseAnd": "bitwise ops on integers are not in TensorRT's matrix",
    "MatMulInteger": "integer matmul: use Q/DQ around MatMul instead",
    "DynamicQuantizeLinear": "dynamic quantization is not supported; use static Q/DQ",
    "ConvInteger": "integer conv: use Q/DQ around Conv instead",
    "QLinearMatMul": "use Q/DQ instead", "QLinearConv": "use Q/DQ instead",
}


def _dtype(value: Any) -> str | None:
    import numpy as np

    if value is None or value.dtype is None:
        return None
    return np.dtype(value.dtype.numpy()).name if value.dtype.numpy() is not None else None


def check_graph(model: Any) -> list[dict[str, str]]:
    """Every node of an onnx-ir model TensorRT 10 would reject, with the reason.

    Returns:
        ``[{"node", "op", "reason"}]``; empty when the parser should accept the graph.
    """
    import numpy as np

    from edgestack.targets.passes._util import const_array  # lazy: onnx at import

    io = {v.name for v in model.graph.inputs} | {v.name for v in model.graph.outputs}
    problems: list[dict[str, str]] = []
    funcs = set(model.functions)
    for node in model.graph:
        op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") \
            else node.op_type
        if node.domain not in ("", "ai.onnx"):
            if (node.domain, node.op_type, node.overload) in funcs and node.domain != "edgestack":
                continue
            problems.append({"node": node.name, "op": op, "reason":
                             f"custom domain {node.domain!r}: no TensorRT plugin registered "
                             f"(lower it: materialize or int8)"})
            continue
        if node.op_type not in SUPPORTED:
            problems.append({"node": node.name, "op": op, "reason": REJECTED_NOTES.get(
                node.op_type, "not in TensorRT 10's ONNX operator support matrix")})
            continue
        if node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            zp = node.inputs[2] if len(node.inputs) > 2 else None
            zpv = const_array(zp)
            if zp is not None and (zpv is None or np.any(zpv != 0)):
                problems.append({"node": node.name, "op": op, "reason":
                                 "zero point must be 0 (TensorRT Q/DQ is symmetric)"})
                continue
        allowed = SUPPORTED[node.op_type]
        # The matrix lists input types (comparisons output bool, Shape int64, ...).
        for v in node.inputs:
            dt = _dtype(v)
            if dt is None or dt in allowed:
                continue
            if node.op_type == "DequantizeLinear" and v is not node.inputs[0]:
                continue
            if dt == "uint8" and v.name in io:
                continue
            problems.append({"node": node.name, "op": op, "reason":
                             f"tensor {v.name!r} has dtype {dt}; TensorRT runs {node.op_type} "
                             f"on {', '.join(allowed)}"})
            break
    return problems
