"""ort-cpu transformer fusions (TransformerFusionPass) and its session options
(``disabled_optimizers``, ``spinning``).

A tiny BERT (transformers ``BertModel``: 2 layers, 4 heads, hidden 64, the same dynamo-exported
attention as MiniLM), shift 4-bit DeepShift (7 levels: exact int8), compiled for ``ort-cpu``
with the fusions (default) and without (``transformer=off``, no disabled optimizers):

- the fused graph has one ``MultiHeadAttention`` per layer and no ``Softmax`` left;
- fp32: fused == unfused to fp32 summation noise, with a padded attention mask;
- int8: the integer matmul weights times their scales equal the shift decode bit for bit,
  and the fused int8 model is within int8 tolerance of the unfused one and of torch;
- non-transformers: ``auto`` compiles them unchanged and logs why, ``require`` fails clearly.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgestack.errors import TargetError
from edgestack.targets import get_target
from edgestack.targets.parity import TOLERANCES, compare_output

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
    assert rep["bias_gelu_fused"] == LAYERS
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
    assert list(skipped) == ["head_softmax"] and "MatMul(P, V)" in skipped["head_softmax"]
    assert "MultiHeadAttention" not in _ops(art) and "Softmax" in _ops(art)
    with pytest.raises(TargetError, match="head_softmax.*MatMul\\(P, V\\)"):
        t.lower(tmp_path / "cls.onnx", tmp_path / "b", transformer="require")


def test_bad_options_fail_clearly(tiny_bert, tmp_path) -> None:
    path, _, _ = tiny_bert
    t = get_target("ort-cpu")
    with pytest.raises(TargetError, match="transformer must be one of auto, off, require"):
        t.lower(path, tmp_path / "a", transformer="yes")
    with pytest.raises(TargetError, match="num_heads must be a positive integer"):
        t.lower(path, tmp_path / "b", num_heads=0)
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


def test_num_heads_option_when_the_graph_hides_it(tmp_path) -> None:
    """``Reshape(q, [B, S, -1, d])`` and no shape/bias to read the hidden size from: the head
    count must come from the option (without it: skipped, and the reason names num_heads)."""
    import onnx_ir as ir

    from edgestack.targets.passes import TransformerFusionPass

    model = _bare_attention(hidden=32, heads=4)
    onnx.save(model, tmp_path / "att.onnx")

    def load() -> ir.Model:
        m = ir.load(tmp_path / "att.onnx")
        for v in m.graph.inputs:
            v.shape = ir.Shape([1, 5, "D"])      # rank known, hidden size not
        return m

    p = TransformerFusionPass()
    p(load())
    assert p.report["attention_fused"] == 0
    assert "num_heads" in p.report["attention_skipped"]["sm"]
    m = load()
    p = TransformerFusionPass(num_heads=4)
    p(m)
    assert p.report["attention_fused"] == 1 and p.report["num_heads"] == [4]
    (mha,) = [n for n in m.graph if n.op_type == "MultiHeadAttention"]
    assert mha.attributes["num_heads"].value == 4
    assert mha.attributes["scale"].value == pytest.approx(8 ** -0.5)


def test_opset12_softmax_default_axis_is_not_the_last(tmp_path) -> None:
    """Before opset 13 a Softmax without ``axis`` normalizes over axis 1 onwards: not fused."""
    import onnx_ir as ir

    from edgestack.targets.passes import TransformerFusionPass

    onnx.save(_bare_attention(hidden=32, heads=4, opset=12), tmp_path / "att12.onnx")
    m = ir.load(tmp_path / "att12.onnx")
    for v in m.graph.inputs:
        v.shape = ir.Shape([1, 5, 32])
    p = TransformerFusionPass()
    p(m)
    assert p.report["attention_fused"] == 0
    assert p.report["attention_skipped"] == {"sm": "Softmax is not over the last axis"}


def _bare_attention(hidden: int, heads: int, opset: int = 20) -> onnx.ModelProto:
    """q, k, v graph inputs -> unmasked attention with ``-1`` heads in the Reshapes (opset
    < 13: the Softmax has no ``axis``, i.e. the old default 1)."""
    from onnx import TensorProto, helper

    d = hidden // heads
    inits = [numpy_helper.from_array(np.array([1, 5, -1, d], np.int64), "s4"),
             numpy_helper.from_array(np.array([1, 5, -1], np.int64), "s3"),
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
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "qkv"]
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph(nodes, "att", ins, [out], inits),
                             opset_imports=[helper.make_opsetid("", opset)])


def test_ort_arm_keeps_the_portable_defaults() -> None:
    opts = get_target("ort-arm").default_options(None)
    assert "transformer" not in opts and "disabled_optimizers" not in opts
