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
from edgestack.exporter.passes import (
    META_COMPACT_EMBEDDINGS,
    CompactEmbeddingsPass,
    compact_embeddings,
    dequantize_rows,
    quantize_rows,
)

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
        "dense": rng.normal(0, 0.05, (ROWS, ROWS)).astype(np.float32),  # a layer weight
    }


def _model(tables: dict[str, np.ndarray]) -> onnx.ModelProto:
    """ids -> word[ids] + pos[range] + small[type_ids] ; also logits = (h @ tied^T) @ dense
    with h = tied[ids] (an LM head sharing its table with the embedding)."""
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
        helper.make_node("MatMul", ["h", "tied_t"], ["logits0"]),
        helper.make_node("MatMul", ["logits0", "dense"], ["logits"]),
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
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, _feeds()), strict=True))


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
    assert set(p.report["skipped"]) == {"tied"}  # small: below the threshold; dense: no Gather
    inits = model.graph.initializers
    assert "word" not in inits and "pos" not in inits
    assert inits["word_int8"].dtype == ir.DataType.INT8
    assert inits["tied"].dtype == ir.DataType.FLOAT and inits["small"].dtype == ir.DataType.FLOAT
    ops = [n.op_type for n in model.graph]
    assert ops.count("Gather") == 2 * 2 + 2  # word, pos: codes + scale; small, tied: as is
    assert inits["dense"].dtype == ir.DataType.FLOAT
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


# --- through export(): a built-in model with a 1000x128 word table (512 KiB) ---------------

def _gpt2(lm_head: bool = False):
    import torch
    from transformers import GPT2LMHeadModel

    from edgestack import zoo

    if not lm_head:
        return zoo.gpt2_tiny()
    model, inputs = zoo.gpt2_tiny()
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(model.config).eval()  # lm_head.weight is wte.weight (tied)
    assert lm.lm_head.weight is lm.transformer.wte.weight
    return lm, inputs


def _export(tmp_path, method: str = "shift", lm_head: bool = False, name: str = "m", **kw):
    import warnings

    from edgestack.compress import compress
    from edgestack.exporter import export

    model, inputs = _gpt2(lm_head)
    report = None
    if method != "none":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = compress(model, method, bits=4, scale="maxabs", skip=("lm_head",))
    out = tmp_path / f"{name}.onnx"
    lines: list[str] = []
    result = export(model, inputs, out, metadata={"method": method, "compression": report},
                    log=lines.append, **kw)
    return model, inputs, result, lines


def test_export_compacts_word_table_and_parity_uses_it(tmp_path) -> None:
    import torch

    from edgestack.exporter.export import compacted_tables

    model, inputs, result, lines = _export(tmp_path)
    assert [t["name"] for t in result.compact_embeddings] == ["wte.weight"]
    # wpe (128x128 fp32, 64 KiB) is below the threshold
    proto = onnx.load(str(result.path))
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits["wte.weight_int8"].data_type == TensorProto.INT8
    assert "wte.weight" not in inits and inits["wpe.weight"].data_type == TensorProto.FLOAT
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[META_COMPACT_EMBEDDINGS]) == result.compact_embeddings
    assert any("wte.weight [1000x128] -> int8" in line for line in lines)
    # parity at the default tolerance against the torch model with the stored int8 table
    assert result.parity.passed and result.parity.max_rel <= 1e-4, result.parity.table()
    assert any("int8 tables vs fp32 tables" in n for n in result.parity.notes)
    # ... which is what ONNX Runtime runs; the fp32-table model differs by the int8 rounding
    got = _run_named(result.path, inputs)
    with torch.no_grad():
        fp32 = model(**inputs).last_hidden_state.numpy()
        with compacted_tables(model, result.compact_embeddings) as missing:
            int8 = model(**inputs).last_hidden_state.numpy()
    assert missing == []
    np.testing.assert_allclose(got, int8, atol=1e-4)
    assert np.abs(got - fp32).max() > 1e-4
    # the context restored the fp32 table
    with torch.no_grad():
        np.testing.assert_array_equal(model(**inputs).last_hidden_state.numpy(), fp32)


def _run_named(path, inputs) -> np.ndarray:
    sess = ort_session(path)
    return sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def test_export_option_off_and_uncompressed_model_keep_float(tmp_path) -> None:
    _, _, on, _ = _export(tmp_path, name="on")
    _, _, off, _ = _export(tmp_path, name="off", compact_embeddings=False)
    assert off.compact_embeddings == [] and on.compact_embeddings
    meta = {p.key for p in onnx.load(str(off.path)).metadata_props}
    assert META_COMPACT_EMBEDDINGS not in meta
    saved = on.compact_embeddings[0]["bytes_before"] - on.compact_embeddings[0]["bytes_after"]
    assert off.file_bytes - on.file_bytes == pytest.approx(saved, abs=4096)
    _, _, dense, _ = _export(tmp_path, method="none", name="dense")
    assert dense.compact_embeddings == [] and dense.parity.max_abs <= 1e-4


def test_export_leaves_tied_lm_head_table_float(tmp_path) -> None:
    _, _, result, lines = _export(tmp_path, lm_head=True)
    assert result.compact_embeddings == []
    assert any("left float" in line and "tied weights" in line for line in lines), lines
    inits = {t.name: t.data_type for t in onnx.load(str(result.path)).graph.initializer}
    assert TensorProto.INT8 not in inits.values()
    assert result.parity.passed, result.parity.table()
