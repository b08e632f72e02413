"""export(): compressed zoo models to ONNX that keeps the compression, with parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgestack import zoo
from edgestack.exporter import export, layer_sizes
from edgestack.exporter.export import (
    META_COMPRESSION,
    META_DOMAIN_VERSION,
    META_LOWRANK,
    META_VERSION,
    NODE_LAYER_KEY,
    compacted_tables,
)

from exporter_models import compressed

FACTORIES = {"small_cnn": zoo.small_cnn, "gpt2_tiny": zoo.gpt2_tiny,
             "conv1d_net": zoo.conv1d_net}
CUSTOM_OP = {"shift": "ShiftWeight", "bitstack": "BitStackWeight"}


def assert_not_stored_dense(proto: onnx.ModelProto, model: torch.nn.Module,
                            report: object) -> None:
    """No float initializer holds a compressed layer's full weight.

    An initializer of such a shape may only be another, uncompressed parameter of the model
    (GPT-2's 128x128 position embedding), found under its own state_dict name.
    """
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    floats = [t for t in proto.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    for layer in report.layers:
        for t in floats:
            if tuple(t.dims) in weight_shapes(layer.shape):
                assert params.get(t.name) == tuple(t.dims) and not t.name.startswith(
                    layer.name + "."), f"{layer.name} is stored dense as {t.name} {t.dims}"


def weight_shapes(layer_shape: list[int]) -> set[tuple[int, ...]]:
    """A layer's dense weight as it could appear: as is, transposed (2-D), as a matrix."""
    shape = tuple(layer_shape)
    out = {shape, (shape[0], int(np.prod(shape[1:])))}
    if len(shape) == 2:
        out.add(shape[::-1])
    return out


@pytest.mark.parametrize("method", ["shift", "bitstack", "lowrank"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_export_compressed_model(tmp_path: Path, name: str, method: str) -> None:
    model, inputs, report = compressed(FACTORIES[name], method)
    assert report.layers, "the pass compressed nothing: the test would prove nothing"
    out = tmp_path / f"{name}-{method}.onnx"

    result = export(model, inputs, out, metadata={"compression": report})

    onnx.checker.check_model(str(out), full_check=True)
    proto = onnx.load(str(out))
    assert result.path == out and result.data_path is None
    assert result.input_names == list(inputs)
    assert [v.name for v in proto.graph.input] == list(inputs)
    assert result.parity is not None and result.parity.passed, result.parity.table()
    assert result.parity.max_rel <= 1e-4

    nodes = [n for n in proto.graph.node if n.domain == "edgestack"]
    names = [layer.name for layer in report.layers]
    if method in CUSTOM_OP:
        assert [n.op_type for n in nodes] == [CUSTOM_OP[method]] * len(names)
        layers = [next(p.value for p in n.metadata_props if p.key == NODE_LAYER_KEY)
                  for n in nodes]
        assert layers == names
        assert {f.name for f in proto.functions} == {CUSTOM_OP[method]}
        assert {(o.domain, o.version) for o in proto.opset_import} >= {("edgestack", 1),
                                                                       ("", 20)}
    else:
        assert not nodes and not proto.functions
        assert json.loads(result.lowrank_layers and
                          {p.key: p.value for p in proto.metadata_props}[META_LOWRANK]) == names

    assert_not_stored_dense(proto, model, report)

    # the bytes in the file are the compressed format's bytes
    sizes = layer_sizes(out)
    assert sorted(r.layer for r in sizes.layers) == sorted(names)
    for row in sizes.layers:
        assert 1.0 <= row.ratio <= 1.1, sizes.table()
        assert row.kind == method
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[META_COMPRESSION])["method"] == method


def test_small_cnn_shift_bits_and_sizes(tmp_path: Path) -> None:
    model, inputs, report = compressed(zoo.small_cnn, "shift", bits=3, zero=True)
    export(model, inputs, tmp_path / "m.onnx", parity=False)
    sizes = layer_sizes(tmp_path / "m.onnx")
    for row, layer in zip(sizes.layers, report.layers, strict=False):
        numel = int(np.prod(layer.shape))
        assert row.details == {"bits": 3, "zero": True}
        assert row.theoretical_bytes == numel * 3 / 8 + 4 * layer.shape[0]
        assert row.actual_bytes == (numel * 3 + 7) // 8 + 4 * layer.shape[0]
        # about 8x below the 4-byte dense weight
        assert row.actual_bytes < 4 * numel / 7


def test_bitstack_tier_exports_active_prefix(tmp_path: Path) -> None:
    from edgestack.compress.layers import BitStackWeight

    model, inputs, report = compressed(zoo.conv1d_net, "bitstack", n_blocks=3, k=1)
    weights = [m for m in model.modules() if isinstance(m, BitStackWeight)]
    for w in weights:
        w.active_blocks = 2
    stored = [w.signs.data_ptr() for w in weights]

    result = export(model, inputs, tmp_path / "tier2.onnx")

    assert result.parity.passed, result.parity.table()
    sizes = layer_sizes(tmp_path / "tier2.onnx")
    assert [r.details["blocks"] for r in sizes.layers] == [2, 2]
    for row in sizes.layers:
        assert 1.0 <= row.ratio <= 1.1
    proto = onnx.load(str(tmp_path / "tier2.onnx"))
    signs = [t for t in proto.graph.initializer if t.name.endswith("weight_module.signs")]
    assert len(signs) == 2 and all(t.dims[0] == 2 for t in signs)
    # the model is given back unchanged: all 3 blocks, the same buffers, 2 active
    assert [w.n_blocks for w in weights] == [3, 3]
    assert [w.signs.data_ptr() for w in weights] == stored
    assert [w.active_blocks for w in weights] == [2, 2]


def test_prune_sizes_and_mixed_metadata(tmp_path: Path) -> None:
    model, inputs, report = compressed(zoo.small_cnn, "prune")
    result = export(model, inputs, tmp_path / "p.onnx", metadata=report)
    assert result.parity.passed
    sizes = layer_sizes(tmp_path / "p.onnx")
    assert {r.layer for r in sizes.layers} == {layer.name for layer in report.layers}
    for row in sizes.layers:
        assert row.kind == "pruned" and row.ratio == 1.0
        original = report.layer(row.layer).shape
        assert int(np.prod(row.shape)) < int(np.prod(original)) or row.shape != tuple(original)


def test_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    model, inputs, _ = compressed(zoo.gpt2_tiny, "shift")
    out = tmp_path / "dyn.onnx"
    result = export(model, inputs, out, dynamic=True)
    assert result.parity.passed
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for meta in sess.get_inputs():
        assert meta.shape == ["batch", "sequence"]
    assert sess.get_outputs()[0].name == "last_hidden_state"
    assert sess.get_outputs()[0].shape == ["batch", "sequence", 128]
    ids = torch.randint(0, 1000, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.int64)
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    # the word table (1000x128 fp32) is stored as int8 per row: the reference uses it too
    assert [t["name"] for t in result.compact_embeddings] == ["wte.weight"]
    with torch.no_grad(), compacted_tables(model, result.compact_embeddings):
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    assert got.shape == (3, 7, 128)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_static_export_keeps_example_shapes(tmp_path: Path) -> None:
    model, inputs, _ = compressed(zoo.conv1d_net, "shift")
    export(model, inputs, tmp_path / "s.onnx", parity=False)
    proto = onnx.load(str(tmp_path / "s.onnx"))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == list(inputs["signal"].shape)


def test_metadata_props(tmp_path: Path) -> None:
    import edgestack

    model, inputs, report = compressed(zoo.conv1d_net, "lowrank")
    result = export(model, inputs, tmp_path / "m.onnx", parity=False,
                    metadata={"compression": report, "note": "hello", "extra": {"a": 1},
                              "acme.run": "7"})
    assert result.parity is None
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props[META_VERSION] == edgestack.__version__
    assert props[META_DOMAIN_VERSION] == "1"
    assert json.loads(props[META_LOWRANK]) == ["net.0", "net.2"] == result.lowrank_layers
    assert json.loads(props[META_COMPRESSION]) == json.loads(json.dumps(report.to_dict()))
    # a caller's keys go into the edgestack. namespace unless they name their own
    assert props["edgestack.note"] == "hello" and json.loads(props["edgestack.extra"]) == {"a": 1}
    assert props["acme.run"] == "7" and "note" not in props
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert (proto.producer_name, proto.producer_version) == ("edgestack", edgestack.__version__)


def test_positional_inputs_and_tuple_outputs(tmp_path: Path) -> None:
    class TwoOut(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(6, 5)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h = self.lin(x)
            return h, {"scaled": h * y, "sum": h.sum(-1)}

    from edgestack.compress import compress

    model = TwoOut().eval()
    compress(model, "shift", bits=5)
    inputs = (torch.randn(2, 6), torch.randn(2, 5))
    result = export(model, inputs, tmp_path / "t.onnx")
    assert result.input_names == ["x", "y"]
    assert result.output_names == ["output_0", "output_1_scaled", "output_1_sum"]
    assert result.parity.passed and len(result.parity.outputs) == 3
    assert result.custom_nodes == {"ShiftWeight": 1}
