"""The ``edgestack`` ONNX op domain: ops that decode a compressed weight inside the graph.

Each op keeps a weight compressed in the ONNX file: its inputs are the packed arrays of a
:mod:`edgestack.formats` container (initializers), its output is the dense float32 weight that
a standard consumer (``MatMul``, ``Gemm``, ``Conv``) reads. Every op has three implementations
that tests hold equal:

- the torch op (:mod:`edgestack.compress.ops`) that compressed models call in ``forward``;
- the numpy reference (:mod:`edgestack.formats`: ``ShiftCodes.decode``, ``BitStackStack.decode``);
- the ONNX function body below, in standard ``ai.onnx`` ops (opset >= 18), which exported
  models carry in ``model.functions`` so that any ONNX runtime can run (or inline) the op.

Ops (domain ``edgestack``, version :data:`DOMAIN_VERSION`; docs/ops.md is the full spec):

``ShiftWeight(codes: uint8 [ceil(numel*bits/8)], scale: float [out]) -> weight: float [shape]``
    attributes ``bits`` (int, 2..5), ``zero`` (int, 0/1), ``shape`` (ints).
``BitStackWeight(signs: uint8 [nb, ceil(m*n/8)], u: float16 [nb, m, k], v: float16 [nb, k, n])
-> weight: float [shape]``
    attribute ``shape`` (ints, ``shape[0] == m``, ``prod(shape[1:]) == n``); any ``nb >= 1``.

Function bodies keep every broadcast 2-D (bytes are reshaped to ``[B, 1]`` and shifted by an
``[8]`` constant): OpenVINO computed a BitShift with a 3-D broadcast on a constant wrongly.
Attributes reach the bodies as ``Constant`` nodes with ``ref_attr_name`` (``value_int = @bits``,
``value_ints = @shape``), so one function serves every ``bits``, ``zero`` and ``shape``.
Powers of two come from a constant table (``Gather``), not ``Pow``, so the shift decode is
exact on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx.defs import OpSchema

from edgestack.errors import ExportError
from edgestack.formats import BitStackStack, ShiftCodes
from edgestack.formats.shift import MAX_BITS

DOMAIN = "edgestack"
"""The ONNX domain of the ops."""

DOMAIN_VERSION = 1
"""Version of the ``edgestack`` op domain (bump when an op's meaning or signature changes)."""

MIN_OPSET = 18
"""Lowest default-domain opset the function bodies need (BitwiseAnd, ReduceProd axes input)."""

_INT64_MAX = np.iinfo(np.int64).max

#: Row ``b`` holds the 8 signs of byte ``b``, MSB first: +1 for a set bit, -1 for a clear one.
SIGN_TABLE = np.where((np.arange(256)[:, None] >> np.arange(7, -1, -1)[None, :]) & 1,
                      1.0, -1.0).astype(np.float32)


class _Body:
    """Records the nodes of a function body, naming every value (``<prefix><n>``)."""

    def __init__(self) -> None:
        self.tape = ir.tape.Tape()
        self.inputs: list[ir.Value] = []
        self._count = 0

    def input(self, name: str, dtype: ir.DataType) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype))
        self.inputs.append(value)
        return value

    def op(self, op_type: str, *inputs: ir.Value, **attributes: Any) -> ir.Value:
        out = self.tape.op(op_type, list(inputs), attributes=attributes or None)
        self._count += 1
        out.name = f"{op_type[0].lower()}{op_type[1:]}_{self._count}"
        return out

    def const(self, array: np.ndarray) -> ir.Value:
        return self.op("Constant", value=ir.tensor(np.asarray(array)))

    def ints(self, *values: int) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64))

    def ref(self, attr: str, kind: ir.AttributeType) -> ir.Value:
        """A ``Constant`` holding the function attribute ``attr`` (int -> scalar, ints -> 1-D)."""
        key = "value_int" if kind == ir.AttributeType.INT else "value_ints"
        return self.op("Constant", **{key: ir.RefAttr(key, attr, kind)})

    def unpack_bits(self, packed: ir.Value) -> ir.Value:
        """uint8 bytes (any shape) -> uint8 0/1 bits ``[bytes, 8]``, MSB first (2-D broadcast)."""
        col = self.op("Reshape", packed, self.ints(-1, 1))
        shifts = self.const(np.arange(7, -1, -1, dtype=np.uint8))
        shifted = self.op("BitShift", col, shifts, direction="RIGHT")
        return self.op("BitwiseAnd", shifted, self.const(np.array([1], dtype=np.uint8)))

    def function(self, name: str, outputs: Sequence[ir.Value], attrs: Sequence[ir.Attr],
                 opset: int) -> ir.Function:
        graph = ir.Graph(self.inputs, outputs, nodes=self.tape.nodes,
                         opset_imports={"": opset}, name=name)
        return ir.Function(DOMAIN, name, graph=graph, attributes=list(attrs))


def _shift_body(opset: int) -> ir.Function:
    b = _Body()
    codes = b.input("codes", ir.DataType.UINT8)
    scale = b.input("scale", ir.DataType.FLOAT)
    bits = b.op("Reshape", b.ref("bits", ir.AttributeType.INT), b.ints(1))      # [1]
    zero = b.ref("zero", ir.AttributeType.INT)                                   # scalar
    shape = b.ref("shape", ir.AttributeType.INTS)                                # [rank]
    numel = b.op("ReduceProd", shape, b.ints(0), keepdims=1)                     # [1]
    stream = b.op("Reshape", b.unpack_bits(codes), b.ints(-1))                  # [B*8]
    used = b.op("Slice", stream, b.ints(0), b.op("Mul", numel, bits))           # [numel*bits]
    planes = b.op("Reshape", used, b.op("Concat", b.ints(-1), bits, axis=0))    # [numel, bits]
    sign = b.op("Slice", planes, b.ints(0), b.ints(1), b.ints(1))               # [numel, 1]
    exp_planes = b.op("Slice", planes, b.ints(1), b.ints(_INT64_MAX), b.ints(1))
    # Place values of the exponent bits: the last bits-1 entries of [2^(MAX-2) .. 1].
    places_all = b.const(1 << np.arange(MAX_BITS - 2, -1, -1, dtype=np.int64))
    places = b.op("Slice", places_all, b.op("Sub", b.ints(MAX_BITS), bits), b.ints(_INT64_MAX))
    exp = b.op("ReduceSum", b.op("Mul", b.op("Cast", exp_planes, to=ir.DataType.INT64), places),
               b.ints(1), keepdims=1)                                            # [numel, 1]
    table = b.const(np.exp2(-np.arange(1 << (MAX_BITS - 1), dtype=np.float32)))
    mag = b.op("Gather", table, exp, axis=0)                                     # [numel, 1]
    # zero != 0: the all-ones exponent field (= sum of the places) decodes to 0.
    is_zero = b.op("And", b.op("Equal", exp, b.op("ReduceSum", places, b.ints(0), keepdims=0)),
                   b.op("Cast", zero, to=ir.DataType.BOOL))
    mag = b.op("Where", is_zero, b.const(np.array(0.0, dtype=np.float32)), mag)
    sign_f = b.op("Sub", b.const(np.array(1.0, dtype=np.float32)),
                  b.op("Mul", b.op("Cast", sign, to=ir.DataType.FLOAT),
                       b.const(np.array(2.0, dtype=np.float32))))
    val = b.op("Mul", mag, sign_f)
    out = b.op("Slice", shape, b.ints(0), b.ints(1))
    rows = b.op("Reshape", val, b.op("Concat", out, b.ints(-1), axis=0))         # [out, n]
    scaled = b.op("Mul", rows, b.op("Reshape", scale, b.ints(-1, 1)))
    weight = b.op("Reshape", scaled, shape)
    weight.name = "weight"
    attrs = [ir.Attr("bits", ir.AttributeType.INT, None),
             ir.Attr("zero", ir.AttributeType.INT, None),
             ir.Attr("shape", ir.AttributeType.INTS, None)]
    return b.function("ShiftWeight", [weight], attrs, opset)


def _bitstack_body(opset: int) -> ir.Function:
    b = _Body()
    signs = b.input("signs", ir.DataType.UINT8)
    u = b.input("u", ir.DataType.FLOAT16)
    v = b.input("v", ir.DataType.FLOAT16)
    shape = b.ref("shape", ir.AttributeType.INTS)
    numel = b.op("ReduceProd", shape, b.ints(0), keepdims=1)                     # [1] = m*n
    nb = b.op("Shape", signs, start=0, end=1)                                    # [1]
    # One Gather from a [256, 8] table of +-1 turns each byte into its 8 signs (MSB first):
    # a third of the full-size passes of shift/and/cast/affine, which matters when the
    # runtime decodes on every call.
    idx = b.op("Cast", b.op("Reshape", signs, b.ints(-1)), to=ir.DataType.INT32)  # [nb*S]
    pm = b.op("Gather", b.const(SIGN_TABLE), idx, axis=0)                        # [nb*S, 8]
    rows = b.op("Reshape", pm, b.op("Concat", nb, b.ints(-1), axis=0))          # [nb, S*8]
    sign = b.op("Slice", rows, b.ints(0), numel, b.ints(1))                     # [nb, m*n]
    mag = b.op("MatMul", b.op("Cast", u, to=ir.DataType.FLOAT),
               b.op("Cast", v, to=ir.DataType.FLOAT))                            # [nb, m, n]
    mag = b.op("Reshape", mag, b.op("Concat", nb, numel, axis=0))               # [nb, m*n]
    total = b.op("ReduceSum", b.op("Mul", sign, mag), b.ints(0), keepdims=0)     # [m*n]
    weight = b.op("Reshape", total, shape)
    weight.name = "weight"
    return b.function("BitStackWeight", [weight],
                      [ir.Attr("shape", ir.AttributeType.INTS, None)], opset)


def _shift_reference(codes: np.ndarray, scale: np.ndarray, *, bits: int, zero: int,
                     shape: Sequence[int]) -> np.ndarray:
    return ShiftCodes(codes, scale, tuple(shape), int(bits), bool(zero)).decode()


def _bitstack_reference(signs: np.ndarray, u: np.ndarray, v: np.ndarray, *,
                        shape: Sequence[int]) -> np.ndarray:
    return BitStackStack(signs, u, v, tuple(shape)).decode()


def _custom_opset() -> Any:
    import onnxscript

    return onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _translate_shift(codes: Any, scale: Any, bits: int, zero: bool, shape: Sequence[int]) -> Any:
    # A plain function, not an onnxscript @script: a @script translation produced no outputs
    # under torch 2.13 (DESIGN.md, measured facts).
    return _custom_opset().ShiftWeight(codes, scale, bits=int(bits), zero=int(bool(zero)),
                                       shape=[int(d) for d in shape])


def _translate_bitstack(signs: Any, u: Any, v: Any, shape: Sequence[int]) -> Any:
    return _custom_opset().BitStackWeight(signs, u, v, shape=[int(d) for d in shape])


class EdgestackOp:
    """One op of the ``edgestack`` domain.

    Attributes:
        name: ONNX op type, e.g. ``"ShiftWeight"``.
        torch_name: name of the torch custom op, e.g. ``"shift_weight"``
            (``torch.ops.edgestack.shift_weight``).
        inputs: ``(name, onnx type string)`` of each input, in order.
        attributes: ``(name, OpSchema.AttrType)`` of each (required) attribute.
        doc: one-paragraph description (the schema's doc string).
    """

    def __init__(self, name: str, torch_name: str, inputs: Sequence[tuple[str, str]],
                 attributes: Sequence[tuple[str, OpSchema.AttrType]], doc: str,
                 body: Callable[[int], ir.Function], reference: Callable[..., np.ndarray],
                 translation: Callable[..., Any]) -> None:
        self.name = name
        self.torch_name = torch_name
        self.inputs = tuple(inputs)
        self.attributes = tuple(attributes)
        self.doc = doc
        self._body = body
        self._reference = reference
        self._translation = translation

    def __repr__(self) -> str:
        return f"EdgestackOp({DOMAIN}.{self.name} v{DOMAIN_VERSION})"

    @property
    def schema(self) -> OpSchema:
        """The ONNX schema of the op (inputs typed exactly, one float output)."""
        return OpSchema(
            self.name, DOMAIN, DOMAIN_VERSION, self.doc,
            inputs=[OpSchema.FormalParameter(n, t) for n, t in self.inputs],
            outputs=[OpSchema.FormalParameter("weight", "tensor(float)")],
            attributes=[OpSchema.Attribute(n, t, "", required=True) for n, t in self.attributes],
        )

    def function(self, opset: int = 20) -> ir.Function:
        """The op's ONNX function (onnx-ir), its body in default-domain ``opset`` ops.

        Raises:
            ExportError: ``opset`` is below :data:`MIN_OPSET`.
        """
        if opset < MIN_OPSET:
            raise ExportError(
                f"edgestack.{self.name}: the function body needs ai.onnx opset >= {MIN_OPSET}, "
                f"found opset {opset}; export with opset={MIN_OPSET} or higher"
            )
        return self._body(opset)

    def function_proto(self, opset: int = 20) -> onnx.FunctionProto:
        """:meth:`function` as a ``FunctionProto``."""
        return ir.serde.serialize_function(self.function(opset))

    def node_model(self, inputs: Sequence[np.ndarray], attrs: dict[str, Any],
                   opset: int = 20) -> onnx.ModelProto:
        """A model of one node of this op, its inputs graph inputs shaped like ``inputs``.

        The model carries the op's function, so any runtime can run it (tests and target
        lowerings check the function bodies with it). Output: ``weight``.
        """
        values = [ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(a.dtype)),
                           shape=ir.Shape(a.shape))
                  for (name, _), a in zip(self.inputs, inputs, strict=False)]
        node = ir.Node(DOMAIN, self.name, values, attributes=ir.convenience.convert_attributes(
            {k: [int(x) for x in v] if isinstance(v, (list, tuple)) else int(v)
             for k, v in attrs.items()}), num_outputs=1)
        out = node.outputs[0]
        out.name = "weight"
        out.type = ir.TensorType(ir.DataType.FLOAT)
        if "shape" in attrs:
            out.shape = ir.Shape([int(d) for d in attrs["shape"]])
        graph = ir.Graph(values, [out], nodes=[node],
                         opset_imports={"": opset, DOMAIN: DOMAIN_VERSION}, name=self.name)
        fn = self.function(opset)
        model = ir.Model(graph, ir_version=10, producer_name="edgestack",
                         functions=[fn])
        return ir.serde.serialize_model(model)

    def reference(self, *inputs: np.ndarray, **attrs: Any) -> np.ndarray:
        """The numpy reference kernel (the :mod:`edgestack.formats` decode)."""
        return self._reference(*inputs, **attrs)

    @property
    def torch_op(self) -> Any:
        """The torch op this node translates, ``torch.ops.edgestack.<torch_name>.default``."""
        import torch

        from edgestack.compress import ops as _torch_ops  # noqa: F401  (registers; lazy: torch)

        return getattr(torch.ops.edgestack, self.torch_name).default

    @property
    def translation(self) -> Callable[..., Any]:
        """The ``custom_translation_table`` entry: emits the ``edgestack`` node."""
        return self._translation


SHIFT_WEIGHT = EdgestackOp(
    "ShiftWeight", "shift_weight",
    inputs=[("codes", "tensor(uint8)"), ("scale", "tensor(float)")],
    attributes=[("bits", OpSchema.AttrType.INT), ("zero", OpSchema.AttrType.INT),
                ("shape", OpSchema.AttrType.INTS)],
    doc=("Decodes packed power-of-two weight codes (edgestack.formats.shift): each "
         "bits-wide MSB-first code is sign bit + exponent e, w = (-1)^sign * 2^-e * scale[o]; "
         "with zero=1 the all-ones exponent means 0."),
    body=_shift_body, reference=_shift_reference, translation=_translate_shift,
)

BITSTACK_WEIGHT = EdgestackOp(
    "BitStackWeight", "bitstack_weight",
    inputs=[("signs", "tensor(uint8)"), ("u", "tensor(float16)"), ("v", "tensor(float16)")],
    attributes=[("shape", OpSchema.AttrType.INTS)],
    doc=("Decodes BitStack residual blocks (edgestack.formats.bitstack): "
         "W = sum_i sign_i * (u_i @ v_i) over the nb blocks given, signs packed MSB-first "
         "(bit 1 = +1), reshaped to shape."),
    body=_bitstack_body, reference=_bitstack_reference, translation=_translate_bitstack,
)

OPS: dict[str, EdgestackOp] = {op.name: op for op in (SHIFT_WEIGHT, BITSTACK_WEIGHT)}
"""The registry: ONNX op type -> op."""


def get_op(name: str) -> EdgestackOp:
    """The op named ``name``.

    Raises:
        ExportError: no such op; the message lists the ops of the domain.
    """
    try:
        return OPS[name]
    except KeyError:
        raise ExportError(
            f"unknown op {DOMAIN}.{name}; domain {DOMAIN} v{DOMAIN_VERSION} has "
            f"{', '.join(sorted(OPS))}"
        ) from None


def register_schemas() -> None:
    """Register every op's schema with ``onnx.defs`` (idempotent).

    Needed before onnxscript can emit the ops, and lets ``onnx.checker`` and shape inference
    type-check ``edgestack`` nodes.
    """
    for op in OPS.values():
        existing = (onnx.defs.get_schema(op.name, DOMAIN_VERSION, DOMAIN)
                    if onnx.defs.has(op.name, DOMAIN) else None)
        if existing is not None and existing.since_version == DOMAIN_VERSION:
            continue
        onnx.defs.register_schema(op.schema)


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``{torch op: translation}`` for ``torch.onnx.export(custom_translation_table=...)``.

    Registers the schemas first.
    """
    register_schemas()
    return {op.torch_op: op.translation for op in OPS.values()}


__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "MIN_OPSET",
    "EdgestackOp",
    "SHIFT_WEIGHT",
    "BITSTACK_WEIGHT",
    "OPS",
    "get_op",
    "register_schemas",
    "translation_table",
]
