"""ort-cpu transformer fusions (TransformerFusionPass: onnxscript's ORT fusion rules) and its
session options (``disabled_optimizers``, ``spinning``).

A tiny BERT (transformers ``BertModel``: 2 layers, 4 heads, hidden 64, the same dynamo-exported
attention as MiniLM), shift 4-bit DeepShift (7 levels: exact int8), compiled for ``ort-cpu``
with the fusions (default) and without (``transformer=off``, no disabled optimizers):

- the fused graph has one ``MultiHeadAttention`` per layer and no ``Softmax`` left;
- fp32: fused == unfused to fp32 summation noise, with a padded attention mask;
- int8: the integer matmul weights times their scales equal the shift decode bit for bit,
  and the fused int8 model is within int8 tolerance of the unfused one and of torch;
- every int8 mode and ``weights=keep``: the fusion leaves the earlier passes' initializers and
  functions alone (its weights are small enough that onnxscript's global optimizer, not used,
  would fold them);
- gpt2_tiny's SDPA-form attention fuses; a head merge to 2-D fuses through
  ``sdpa_via_mha`` (the guard on onnxscript's MHA rule); a hidden head count is skipped;
- non-transformers: ``auto`` compiles them unchanged and logs why, ``require`` fails clearly;
  without onnxscript (or another version) the pass changes nothing and says why.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgestack.core.ort import cpu_session
from edgestack.errors import TargetError
from edgestack.targets import get_target
from edgestack.targets.parity import TOLERANCES, compare_output
from edgestack.targets.passes import TransformerFusionPass
from edgestack.targets.passes import transformer as fusion

from targets_cases import linear_case, random_shift

LAYERS, HEADS = 2, 4
PLAIN = {"transformer": "off", "disabled_optimizers": []}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """(exported shift model path, feeds with padding, torch outputs)."""
    import torch
    from transformers import BertConfig, BertModel

    from edgestack.compress import compress
    from edgestack.exporter import export

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=128,
                     max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"      # as edgestack.compress.hf loads MiniLM
    model = BertModel(cfg).eval()
    seq = 12
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 500, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.int64)
    mask[1, 8:] = 0                       # padding: the additive mask matters
    inputs = {"input_ids": ids, "attention_mask": mask}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress(model, "shift", calib=[inputs], bits=4, zero=True, scale="maxabs")
        path = tmp_path_factory.mktemp("bert") / "bert.onnx"
        export(model, inputs, path, parity=False)
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state.numpy()
    feeds = {k: v.numpy() for k, v in inputs.items()}
    return path, feeds, ref


def _run(art, feeds):
    t = get_target("ort-cpu")
    with t.runner(art) as r:
        return r.infer({k: v for k, v in feeds.items() if k in art.inputs})


def _ops(art) -> list[str]:
    return [n.op_type for n in onnx.load(str(art.path())).graph.node]


def test_fused_fp32_graph_matches_unfused(tiny_bert, tmp_path) -> None:
    path, feeds, ref = tiny_bert
    t = get_target("ort-cpu")
    plain = t.lower(path, tmp_path / "plain", int8="off", **PLAIN)
    fused = t.lower(path, tmp_path / "fused", int8="off")
    rep = fused.report["passes"]["TransformerFusionPass"]
    assert rep["attention_fused"] == LAYERS and rep["num_heads"] == [HEADS]
    assert rep["bias_gelu_fused"] == LAYERS and rep["attention_skipped"] == {}
    assert rep["rules"]["sdpa"] == rep["rules"]["mha"] == rep["rules"]["mha_bias"] == LAYERS
    ops = _ops(fused)
    assert ops.count("MultiHeadAttention") == LAYERS and "Softmax" not in ops
    assert ops.count("BiasGelu") == LAYERS and "Gelu" not in ops
    assert "TransformerFusionPass" not in plain.report["passes"]
    assert fused.options["disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert plain.options["disabled_optimizers"] == []
    a, b = _run(plain, feeds), _run(fused, feeds)
    assert a.keys() == b.keys()
    for name in a:
        chk = compare_output(name, b[name], a[name], TOLERANCES["fp32"])
        assert chk.passed and chk.max_rel < 1e-5, chk
    chk = compare_output("last_hidden_state", b["last_hidden_state"], ref, TOLERANCES["fp32"])
    assert chk.passed, chk


def test_fused_int8_weights_are_the_exact_shift_decode(tiny_bert, tmp_path) -> None:
    from edgestack.formats import ShiftCodes

    path, feeds, ref = tiny_bert
    t = get_target("ort-cpu")
    fused = t.lower(path, tmp_path / "fused", int8="dynamic")
    plain = t.lower(path, tmp_path / "plain", int8="dynamic", **PLAIN)
    assert fused.precision == "int8"
    assert fused.report["passes"]["TransformerFusionPass"]["attention_fused"] == LAYERS
    # decode every ShiftWeight of the source, keyed by its node name
    src = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in src.graph.initializer}
    decoded = {}
    for n in src.graph.node:
        if n.op_type == "ShiftWeight":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            sc = ShiftCodes(inits[n.input[0]], inits[n.input[1]], tuple(a["shape"]),
                            int(a["bits"]), bool(a["zero"]))
            decoded[n.name] = sc.decode()
    low = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fused.path())).graph.initializer}
    checked = 0
    for name, w in decoded.items():
        q, s = low.get(f"{name}_qT"), low.get(f"{name}_ws")
        assert q is not None and s is not None, f"{name} was not lowered to int8"
        assert q.dtype == np.int8
        assert np.array_equal(q.T.astype(np.float32) * s[:, None], w)   # bit for bit
        checked += 1
    assert checked == 6 * LAYERS + 1           # q, k, v, out, ffn1, ffn2 per layer + pooler
    assert _ops(fused).count("MultiHeadAttention") == LAYERS
    a, b = _run(plain, feeds), _run(fused, feeds)
    chk = compare_output("last_hidden_state", b["last_hidden_state"], a["last_hidden_state"],
                         TOLERANCES["int8"])
    assert chk.passed, chk
    chk = compare_output("last_hidden_state", b["last_hidden_state"], ref, TOLERANCES["int8"])
    assert chk.passed, chk


def test_non_transformer_compiles_unchanged_and_logs_why(tmp_path, caplog) -> None:
    model, feeds, ref = linear_case(random_shift(np.random.default_rng(0), (24, 16), 4, True),
                                    2, 3)
    onnx.save(model, tmp_path / "lin.onnx")
    t = get_target("ort-cpu")
    with caplog.at_level(logging.INFO, logger="edgestack.targets.passes.transformer"):
        art = t.lower(tmp_path / "lin.onnx", tmp_path / "a", int8="off")
    rep = art.report["passes"]["TransformerFusionPass"]
    assert rep["attention_fused"] == 0 and rep["modified"] is False
    assert "not a transformer" in caplog.text
    assert _ops(art) == _ops(t.lower(tmp_path / "lin.onnx", tmp_path / "c", int8="off",
                                     transformer="off"))
    out = _run(art, feeds)
    assert compare_output("y", out["y"], ref["y"], TOLERANCES["fp32"]).passed
    with pytest.raises(TargetError, match="transformer=require.*not a transformer"):
        t.lower(tmp_path / "lin.onnx", tmp_path / "b", transformer="require")


def test_softmax_outside_attention_is_skipped_with_its_reason(tmp_path) -> None:
    from onnx import helper

    model, feeds, _ = linear_case(random_shift(np.random.default_rng(1), (24, 16), 4, True),
                                  2, 3)
    g = model.graph
    g.node[-1].output[0] = "logits"
    g.node.append(helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name="head_softmax"))
    onnx.save(model, tmp_path / "cls.onnx")
    t = get_target("ort-cpu")
    art = t.lower(tmp_path / "cls.onnx", tmp_path / "a")
    skipped = art.report["passes"]["TransformerFusionPass"]["attention_skipped"]
    assert list(skipped) == ["head_softmax"]
    assert skipped["head_softmax"].startswith(fusion.NO_MATCH)
    assert "not read by a MatMul(P, V)" in skipped["head_softmax"]
    assert "MultiHeadAttention" not in _ops(art) and "Softmax" in _ops(art)
    with pytest.raises(TargetError, match="head_softmax.*MatMul\\(P, V\\)"):
        t.lower(tmp_path / "cls.onnx", tmp_path / "b", transformer="require")




@pytest.mark.parametrize("int8,weights", [("off", "materialize"), ("weights", "materialize"),
                                          ("dynamic", "materialize"), ("off", "keep")])
def test_fusion_leaves_the_earlier_passes_weights_alone(tiny_bert, tmp_path, int8,
                                                        weights) -> None:
    """Every initializer of the fused graph is the unfused graph's, byte for byte (only those
    the replaced nodes read are gone), and the functions are the same: no folding of the int8
    weights to float32 and no inlining of ``weights=keep``'s decode functions."""
    path, _, _ = tiny_bert
    t = get_target("ort-cpu")
    fused = t.lower(path, tmp_path / "f", int8=int8, weights=weights)
    plain = t.lower(path, tmp_path / "p", int8=int8, weights=weights, transformer="off")
    assert fused.report["passes"]["TransformerFusionPass"]["attention_fused"] == LAYERS
    f, p = onnx.load(str(fused.path())), onnx.load(str(plain.path()))
    before = {i.name: numpy_helper.to_array(i) for i in p.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in f.graph.initializer}
    assert set(after) <= set(before)
    for name, arr in after.items():
        assert arr.dtype == before[name].dtype and np.array_equal(arr, before[name]), name
    gone = {before[n].dtype for n in set(before) - set(after)}
    assert gone <= {np.dtype(np.float32), np.dtype(np.int64)}   # scales, reshape shapes
    kept = {k: v.nbytes for k, v in before.items() if v.dtype in (np.int8, np.uint8)}
    assert kept == {k: after[k].nbytes for k in kept}
    assert ([(fn.domain, fn.name) for fn in f.functions]
            == [(fn.domain, fn.name) for fn in p.functions])
    assert {o.domain for o in f.opset_import} == {o.domain for o in p.opset_import} | {
        "com.microsoft"}


def test_gpt2_sdpa_attention_fuses(tmp_path) -> None:
    """zoo.gpt2_tiny (``attn_implementation="sdpa"``: ``q``/``k`` pre-scaled, ``IsNaN``/``Where``
    guard after the Softmax, ``Conv1D`` reading the merged heads as ``[B*S, D]``)."""
    from edgestack import zoo
    from edgestack.exporter import export

    model, inputs = zoo.gpt2_tiny(seq=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, inputs, tmp_path / "gpt2.onnx", parity=False)
    t = get_target("ort-cpu")
    fused = t.lower(tmp_path / "gpt2.onnx", tmp_path / "f", int8="off")
    plain = t.lower(tmp_path / "gpt2.onnx", tmp_path / "p", int8="off", **PLAIN)
    rep = fused.report["passes"]["TransformerFusionPass"]
    assert rep["attention_fused"] == 2 and rep["num_heads"] == [4], rep
    assert rep["rules"]["sdpa_via_mha"] == 2      # the 2-D head merge: onnxscript's MHA guarded
    assert "Softmax" not in _ops(fused)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    a, b = _run(plain, feeds), _run(fused, feeds)
    for name in a:
        chk = compare_output(name, b[name], a[name], TOLERANCES["fp32"])
        assert chk.passed and chk.max_rel < 1e-5, chk


def _ort(model: ir.Model | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return cpu_session(proto.SerializeToString(), 1, "all", "on", []).run(None, feeds)


def _qkv_feeds(hidden: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((1, 5, hidden)).astype(np.float32) for n in "qkv"}


def test_heads_merged_to_2d_fuse_through_sdpa_via_mha() -> None:
    """onnxscript 0.7.2's MHA rule would replace a merge to ``[S, D]`` with a 3-D MHA output;
    the guard leaves it to ``sdpa_via_mha``, which keeps the graph's own reshapes."""
    proto = _bare_attention(hidden=32, heads=4, shape=[1, 5, 32], merge=[5, 32])
    m = ir.serde.deserialize_model(proto)
    p = TransformerFusionPass()
    p(m)
    assert p.report["attention_fused"] == 1 and p.report["num_heads"] == [4]
    assert p.report["rules"]["mha"] == 0 and p.report["rules"]["sdpa_via_mha"] == 1
    assert not [n for n in m.graph if n.domain == fusion.FUSION_DOMAIN]
    assert fusion.FUSION_DOMAIN not in m.opset_imports
    feeds = _qkv_feeds(32)
    (want,), (got,) = _ort(proto, feeds), _ort(m, feeds)
    assert got.shape == (5, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_static_heads_fuse_and_a_hidden_head_count_is_skipped(tmp_path) -> None:
    """``Reshape(q, [B, S, -1, d])``: the head count comes from the inferred shapes; with the
    hidden size unknown it cannot (each Reshape gets its own unknown head dim), and the Softmax
    is reported with onnxscript's reason."""
    proto = _bare_attention(hidden=32, heads=4, shape=[1, 5, 32])
    m = ir.serde.deserialize_model(proto)
    p = TransformerFusionPass()
    p(m)
    assert p.report["attention_fused"] == 1 and p.report["num_heads"] == [4]
    (mha,) = [n for n in m.graph if n.op_type == "MultiHeadAttention"]
    assert mha.attributes["num_heads"].as_int() == 4
    assert "scale" not in mha.attributes            # 1/sqrt(head size): the default
    feeds = _qkv_feeds(32)
    np.testing.assert_allclose(_ort(m, feeds)[0], _ort(proto, feeds)[0], rtol=1e-5, atol=1e-6)

    m = ir.serde.deserialize_model(_bare_attention(hidden=32, heads=4, shape=[1, 5, "D"]))
    p = TransformerFusionPass()
    result = p(m)
    assert p.report["attention_fused"] == 0 and not result.modified
    assert p.report["attention_skipped"]["sm"].startswith(fusion.NO_MATCH)
    assert "does not have expected size" in p.report["attention_skipped"]["sm"]
    assert not [n for n in m.graph if n.domain == fusion.FUSION_DOMAIN]


def test_opset12_softmax_default_axis_is_not_the_last() -> None:
    """Before opset 13 a Softmax without ``axis`` normalizes over axis 1 onwards: not fused."""
    m = ir.serde.deserialize_model(_bare_attention(hidden=32, heads=4, opset=12,
                                                   shape=[1, 5, 32]))
    p = TransformerFusionPass()
    p(m)
    assert p.report["attention_fused"] == 0
    assert p.report["attention_skipped"] == {"sm": fusion.NO_MATCH}


def _bare_attention(hidden: int, heads: int, opset: int = 20, shape: list | None = None,
                    merge: list[int] | None = None) -> onnx.ModelProto:
    """q, k, v graph inputs (``shape``) -> unmasked attention with ``-1`` heads in the
    Reshapes, scaled by ``1/sqrt(d)``, heads merged to ``merge`` (default ``[1, 5, -1]``)
    (opset < 13: the Softmax has no ``axis``, i.e. the old default 1)."""
    d = hidden // heads
    inits = [numpy_helper.from_array(np.array([1, 5, -1, d], np.int64), "s4"),
             numpy_helper.from_array(np.array(merge or [1, 5, -1], np.int64), "s3"),
             numpy_helper.from_array(np.array(d ** -0.5, np.float32), "c")]
    nodes = []
    for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [n, "s4"], [f"{n}4"]),
                  helper.make_node("Transpose", [f"{n}4"], [f"{n}t"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["qt", "kt"], ["sc"]),
              helper.make_node("Mul", ["sc", "c"], ["scs"]),
              (helper.make_node("Softmax", ["scs"], ["p"], axis=-1, name="sm") if opset >= 13
               else helper.make_node("Softmax", ["scs"], ["p"], name="sm")),
              helper.make_node("MatMul", ["p", "vt"], ["pv"]),
              helper.make_node("Transpose", ["pv"], ["pvt"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["pvt", "s3"], ["o"])]
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph(nodes, "att", ins, [out], inits),
                             opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("approximate,op", [("none", "BiasGelu"), ("tanh", "FastGelu")])
def test_gelu_with_bias(approximate: str, op: str) -> None:
    """``Gelu(Add(x, b))`` -> ``BiasGelu`` (onnxscript's rule), or ``FastGelu`` for the tanh
    form (this module's rule: onnxscript's skips it)."""
    b = np.linspace(-1, 1, 8, dtype=np.float32)
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["b", "x"], ["xb"]),
         helper.make_node("Gelu", ["xb"], ["y"], approximate=approximate)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(b, "b")]), opset_imports=[helper.make_opsetid("", 20)])
    m = ir.serde.deserialize_model(proto)
    p = TransformerFusionPass()
    assert p(m).modified
    assert [(n.domain, n.op_type) for n in m.graph] == [("com.microsoft", op)]
    assert p.report["bias_gelu_fused"] == 1 and p.report["attention_fused"] == 0
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)}
    np.testing.assert_allclose(_ort(m, feeds)[0], _ort(proto, feeds)[0], rtol=1e-5, atol=1e-6)


def test_bad_options_fail_clearly(tiny_bert, tmp_path) -> None:
    path, _, _ = tiny_bert
    t = get_target("ort-cpu")
    with pytest.raises(TargetError, match="transformer must be one of auto, off, require"):
        t.lower(path, tmp_path / "a", transformer="yes")
    with pytest.raises(TargetError, match="num_heads=12: the option was removed.*graph's "
                                          "shapes.*To fix: drop num_heads"):
        t.lower(path, tmp_path / "b", num_heads=12)
    with pytest.raises(TargetError, match="disabled_optimizers"):
        t.lower(path, tmp_path / "c", disabled_optimizers="Skip LayerNorm")
    with pytest.raises(TargetError, match="spinning must be 'on' or 'off'"):
        t.lower(path, tmp_path / "e", spinning="sometimes")
    art = t.lower(path, tmp_path / "d", int8="off", spinning="off",
                  disabled_optimizers="SkipLayerNormFusion, BiasGeluFusion")
    assert art.options["disabled_optimizers"] == ["SkipLayerNormFusion", "BiasGeluFusion"]
    assert art.options["spinning"] == "off"
    with t.runner(art) as r:
        so = r.session.get_session_options()
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("onnxscript", ["0.9.1", None])
def test_without_the_tested_onnxscript_nothing_changes(tiny_bert, tmp_path, monkeypatch,
                                                       onnxscript) -> None:
    """onnxscript missing, or another minor version (its ort_fusions modules are not public
    API): ``auto`` compiles the graph unfused and reports why; ``require`` fails with the fix."""
    path, _, _ = tiny_bert
    if onnxscript is None:
        monkeypatch.setattr(fusion, "onnxscript", None)
        monkeypatch.setattr(fusion, "_IMPORT_ERROR", "onnxscript's ORT fusions cannot be "
                            "imported (No module named 'onnxscript')", raising=False)
        why = "cannot be imported"
    else:
        monkeypatch.setattr(fusion.onnxscript, "__version__", onnxscript)
        why = "onnxscript 0.9.1 is not the 0.7.x"
    t = get_target("ort-cpu")
    art = t.lower(path, tmp_path / "a", int8="off")
    rep = art.report["passes"]["TransformerFusionPass"]
    assert rep["attention_fused"] == 0 and rep["modified"] is False
    assert why in rep["unavailable"] and "To fix: pip install" in rep["unavailable"]
    assert len(rep["attention_skipped"]) == LAYERS
    assert "MultiHeadAttention" not in _ops(art) and _ops(art).count("Softmax") == LAYERS
    with pytest.raises(TargetError, match=r"transformer=require.*" + why + r".*pip install "
                                          r"'onnxscript==0.7.\*'"):
        t.lower(path, tmp_path / "b", transformer="require")


def test_ort_arm_keeps_the_portable_defaults() -> None:
    opts = get_target("ort-arm").default_options(None)
    assert "transformer" not in opts and "disabled_optimizers" not in opts
