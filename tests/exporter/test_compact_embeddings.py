"""CompactEmbeddingsPass on small hand-made ONNX models: what is rewritten, what is left alone,
and that ONNX Runtime (and OpenVINO when installed) compute the numpy dequantization."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgestack.exporter.parity import ort_session
from edgestack.exporter.passes import (META_COMPACT_EMBEDDINGS, CompactEmbeddingsPass,
                                       compact_embeddings, dequantize_rows, quantize_rows)

ROWS, DIM = 700, 96  # 700*96*4 = 262 KiB: above the default 256 KiB threshold


def _tables(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    word = rng.normal(0, 0.05, (ROWS, DIM)).astype(np.float32)
    word[3] = 0.0  # an all-zero row (padding token)
    word[5, 7] = 2.5  # an outlier: the row's scale follows it
    return {
        "word": word,
        "pos": rng.normal(0, 0.02, (ROWS, DIM)).astype(np.float32),
        "small": rng.normal(0, 1, (8, DIM)).astype(np.float32),
        "tied": rng.normal(0, 0.05, (ROWS, DIM)).astype(np.float32),
    }


def _model(tables: dict[str, np.ndarray]) -> onnx.ModelProto:
    """ids -> word[ids] + pos[range] + small[type_ids] ; also logits = h @ tied^T with
    h = tied[ids] (an LM head sharing its table with the embedding)."""
    nodes = [
        helper.make_node("Gather", ["word", "ids"], ["we"], axis=0, name="g_word"),
        helper.make_node("Constant", [], ["pos_ids"], name="c_pos",
                         value=numpy_helper.from_array(np.arange(4, dtype=np.int64))),
        helper.make_node("Gather", ["pos", "pos_ids"], ["pe"], name="g_pos"),
        helper.make_node("Gather", ["small", "type_ids"], ["te"], axis=0, name="g_small"),
        helper.make_node("Add", ["we", "pe"], ["s1"]),
        helper.make_node("Add", ["s1", "te"], ["emb"]),
        helper.make_node("Gather", ["tied", "ids"], ["h"], axis=0, name="g_tied"),
        helper.make_node("Transpose", ["tied"], ["tied_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "tied_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 4]),
         helper.make_tensor_value_info("type_ids", TensorProto.INT64, ["b", 4])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", 4, DIM]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 4, ROWS])],
        [numpy_helper.from_array(a, name) for name, a in tables.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds() -> dict[str, np.ndarray]:
    return {"ids": np.array([[3, 5, 0, ROWS - 1], [1, 2, 5, 3]], dtype=np.int64),
            "type_ids": np.array([[0, 1, 0, 7], [7, 7, 0, 0]], dtype=np.int64)}


def _run(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    sess = ort_session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, _feeds())))


def test_quantize_rows_error_bound_and_zero_row() -> None:
    t = _tables()["word"]
    codes, scale = quantize_rows(t)
    assert codes.dtype == np.int8 and codes.shape == t.shape and scale.shape == (ROWS, 1)
    assert np.abs(codes).max() == 127 and codes.min() >= -127
    np.testing.assert_allclose(scale[:, 0], np.abs(t).max(axis=1) / 127, rtol=1e-6)
    err = np.abs(dequantize_rows(codes, scale) - t)
    assert (err <= scale / 2 * (1 + 1e-5) + 1e-12).all()
    assert scale[3, 0] == 0 and not codes[3].any()
    # the outlier row: its other entries round to few levels, but stay within the bound
    assert err[5].max() <= scale[5, 0] / 2 * (1 + 1e-5)


def test_pass_rewrites_large_gather_tables_only() -> None:
    tables = _tables()
    proto = _model(tables)
    model = ir.serde.deserialize_model(proto)
    p = CompactEmbeddingsPass()
    result = p(model)
    assert result.modified
    done = {t["name"]: t for t in p.report["tables"]}
    assert set(done) == {"word", "pos"}
    assert done["word"] == {"name": "word", "bits": 8, "rows": ROWS, "cols": DIM,
                            "bytes_before": ROWS * DIM * 4,
                            "bytes_after": ROWS * DIM + ROWS * 4}
    assert "tied" in p.report["skipped"] and "tied weights" in p.report["skipped"]["tied"]
    assert "small" not in p.report["skipped"]  # below the threshold: not worth a line
    inits = model.graph.initializers
    assert "word" not in inits and "pos" not in inits
    assert inits["word_int8"].dtype == ir.DataType.INT8
    assert inits["tied"].dtype == ir.DataType.FLOAT and inits["small"].dtype == ir.DataType.FLOAT
    ops = [n.op_type for n in model.graph]
    assert ops.count("Gather") == 2 * 2 + 2  # word, pos: codes + scale; small, tied: as is
    meta = json.loads(model.metadata_props[META_COMPACT_EMBEDDINGS])
    assert [m["name"] for m in meta] == ["word", "pos"]
    # a second run finds nothing to do and keeps the record
    p2 = CompactEmbeddingsPass()
    assert not p2(model).modified
    assert json.loads(model.metadata_props[META_COMPACT_EMBEDDINGS]) == meta


def test_rewritten_model_matches_numpy_and_bound() -> None:
    tables = _tables()
    proto = _model(tables)
    before = _run(proto)
    after_proto = compact_embeddings(proto, log=lambda _: None)
    onnx.checker.check_model(after_proto, full_check=True)
    after = _run(after_proto)
    feeds = _feeds()
    deq = {k: dequantize_rows(*quantize_rows(tables[k])) for k in ("word", "pos")}
    expect = (deq["word"][feeds["ids"]] + deq["pos"][np.arange(4)]
              + tables["small"][feeds["type_ids"]])
    np.testing.assert_array_equal(after["emb"], expect)  # same float ops as numpy
    # against fp32: within half a step of each of the two quantized rows added
    scale = {k: quantize_rows(tables[k])[1][:, 0] for k in ("word", "pos")}
    bound = (scale["word"][feeds["ids"]] + scale["pos"][np.arange(4)]) / 2
    assert (np.abs(after["emb"] - before["emb"]) <= bound[..., None] * 1.001 + 1e-7).all()
    assert np.abs(after["emb"] - before["emb"]).max() > 0  # it did quantize
    np.testing.assert_array_equal(after["logits"], before["logits"])  # tied head untouched


def test_min_bytes_parameter_and_tiny_threshold() -> None:
    tables = _tables()
    model = ir.serde.deserialize_model(_model(tables))
    p = CompactEmbeddingsPass(min_bytes=ROWS * DIM * 4 + 1)
    assert not p(model).modified
    assert p.report == {"tables": [], "skipped": {}, "bytes_saved": 0}  # all below it
    assert "word" in model.graph.initializers
    model = ir.serde.deserialize_model(_model(tables))
    p = CompactEmbeddingsPass(min_bytes=0)
    p(model)
    assert {t["name"] for t in p.report["tables"]} == {"word", "pos", "small"}
    with pytest.raises(ValueError, match="min_bytes"):
        CompactEmbeddingsPass(min_bytes=-1)


def test_openvino_computes_the_same_numbers(tmp_path) -> None:
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed")
    tables = _tables()
    proto = compact_embeddings(_model(tables), log=lambda _: None)
    path = tmp_path / "emb.onnx"
    onnx.save(proto, str(path))
    compiled = ov.Core().compile_model(str(path), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(_feeds())
    emb = next(v for k, v in got.items() if "emb" in k.get_names())
    np.testing.assert_allclose(emb, _run(proto)["emb"], rtol=0, atol=1e-7)
