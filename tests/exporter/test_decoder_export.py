"""Text-generation export with a KV cache (edgestack.exporter.decoder, edgestack.core.decoding).

For tiny random GPT-2, Llama (grouped-query attention: 2 key/value heads for 4 query heads,
rotary) and Qwen2 (tied LM head) decoders, each compressed with every method: 64 greedy
tokens from ONNX Runtime with the KV cache (the numpy loop of edgestack.core.decoding, the
contract read back from the file) equal the 64 greedy tokens of the compressed torch model
(transformers' ``generate`` with its own cache). The weights are drawn with a scale (std
0.3) so that the top two logits of every step are far apart: argmax is decided, not a tie
broken by float noise.

Tied LM heads (GPT-2, Qwen2) stay dense and are stored once: one ``[vocab, hidden]``
initializer, read by the embedding ``Gather`` and the head.

Three cases run always: GPT-2 shift, Llama pruned then BitStack, Qwen2 low-rank (every
method and architecture appears: 25 s in all on an idle 2-core machine); the ten
single-method cases left are ``slow`` (4-7 s each idle, up to 20 s on shared cores: mostly
torch.export of a transformers decoder; the whole file 81 s idle).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgestack.core.decoding import DecoderContract, greedy_generate
from edgestack.errors import ExportError, FormatError
from edgestack.exporter.export import META_TIED
from edgestack.exporter.parity import ort_session
from edgestack.exporter.passes import RetiePass

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from decoder_models import (  # noqa: E402
    HIDDEN,
    NEW_TOKENS,
    VOCAB,
    tiny_decoder,
    torch_greedy,
)

METHOD_OPTIONS = {
    "shift": {"bits": 4, "scale": "maxabs"},
    "bitstack": {"n_blocks": 2, "k": 2},
    "lowrank": {"ratio": 0.5},
    "prune": {"ratio": 0.25},
}
ARCHS = ("gpt2", "llama", "qwen2")
# every architecture with each kind of layer: shift and BitStack ops (BitStack on pruned
# layers: "prune+bitstack" checks the pruned shapes and the op), low rank (standard ops)
ALWAYS = [("gpt2", "shift"), ("llama", "prune+bitstack"), ("qwen2", "lowrank")]
CASES = [pytest.param(a, m, id=f"{a}-{m}") for a, m in ALWAYS] + [
    pytest.param(a, m, marks=pytest.mark.slow, id=f"{a}-{m}")
    for a in ARCHS for m in ("shift", "lowrank", "prune+bitstack") if (a, m) not in ALWAYS]


def _compress(model, methods):
    """Compress with each of ``methods`` (``"prune+bitstack"``: prune, then BitStack on the
    pruned layers); the reports, by method."""
    from edgestack.compress import compress

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {m: compress(model, m, **METHOD_OPTIONS[m]) for m in methods.split("+")}


def _copies(path, table):
    """Names of the initializers of ``path`` holding ``table`` or its transpose."""
    from onnx import numpy_helper

    found = []
    for t in onnx.load(str(path)).graph.initializer:
        if tuple(t.dims) in (table.shape, table.shape[::-1]):
            a = numpy_helper.to_array(t)
            if np.array_equal(a, table) or np.array_equal(a, table.T):
                found.append(t.name)
    return found


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_greedy_with_kv_cache_matches_torch(tmp_path, arch, method):
    from edgestack.exporter import export_decoder

    model = tiny_decoder(arch)
    reports = _compress(model, method)
    for m, report in reports.items():
        assert report.layers, f"{m} compressed no layer of {arch}"
    result = export_decoder(model, tmp_path / "decoder.onnx", log=lambda _: None)
    assert result.parity is not None and result.parity.passed, result.parity.table()

    # the contract, read back from the file through ONNX Runtime alone
    sess = ort_session(result.path)
    contract = DecoderContract.from_session(sess)
    assert contract == result.decoder
    assert [i.name for i in sess.get_inputs()] == contract.input_names()
    assert [o.name for o in sess.get_outputs()] == contract.output_names()
    assert contract.input_names()[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert contract.output_names()[1:3] == ["present.0.key", "present.0.value"]
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes["input_ids"] == ["batch", "sequence"]
    assert shapes["attention_mask"] == ["batch", "total_sequence"]
    assert shapes["past_key_values.1.value"] == ["batch", contract.kv_heads[1],
                                                 "past_sequence", contract.head_dim]
    heads = {"gpt2": 4, "llama": 2, "qwen2": 2}[arch]  # Llama/Qwen2: GQA, 2 kv heads
    if arch == "gpt2" and "prune" in reports:  # heads pruned: the contract follows the model
        heads = int(model.transformer.h[0].attn.num_heads)
        assert heads < 4
    assert contract.kv_heads[0] == heads and contract.head_dim == 16
    assert contract.vocab_size == VOCAB and contract.eos_token_ids == (2,)

    # compressed layers are edgestack ops (shift, bitstack) or their standard forms
    report = reports[method.split("+")[-1]]
    if report.method in ("shift", "bitstack"):
        assert sum(result.custom_nodes.values()) == len(report.layers)
    elif report.method == "lowrank":
        assert len(result.lowrank_layers) == len(report.layers)
    if "prune" in reports and arch != "gpt2":  # Llama/Qwen2: gated MLP channels
        sizes = {r.name: (r.details["out"], r.details["in"]) for r in reports["prune"].layers}
        mlp = "model.layers.0.mlp"
        assert sizes[f"{mlp}.gate_proj"] == sizes[f"{mlp}.up_proj"] == ([128, 96], [64, 64])
        assert sizes[f"{mlp}.down_proj"] == ([64, 64], [128, 96])

    # tied LM heads (GPT-2, Qwen2) are stored once; Llama's untied head is compressed
    tied = arch != "llama"
    assert bool(result.tied_weights) == tied
    if tied:  # one initializer, read by the embedding Gather and (transposed) by the head
        names = {"gpt2": ["transformer.wte.weight", "lm_head.weight"],
                 "qwen2": ["model.embed_tokens.weight", "lm_head.weight"]}[arch]
        assert result.tied_weights == [{"parameters": names, "initializers": ["lm_head.weight"],
                                        "copies": 1, "bytes": VOCAB * HIDDEN * 4}]
        assert contract.tied_weights == (tuple(names),)
        proto = onnx.load(str(result.path))
        assert json.loads({p.key: p.value for p in proto.metadata_props}[META_TIED]) == \
            result.tied_weights
        table = model.get_input_embeddings().weight.detach().numpy()
        assert table.shape == (VOCAB, HIDDEN)
        assert _copies(result.path, table) == ["lm_head.weight"]
        readers = {n.op_type for n in proto.graph.node if "lm_head.weight" in n.input}
        assert readers == {"Gather", "Gemm"}, readers  # the head reads W with transB=1
        # and ONNX Runtime keeps one copy in memory too (a Transpose(W) it would fold)
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(result.path), opts, providers=["CPUExecutionProvider"])
        assert _copies(tmp_path / "optimized.onnx", table) == ["lm_head.weight"]
        assert "lm_head" in {s.name for s in report.skipped}
    elif report.method in ("shift", "bitstack"):
        assert any(layer == "lm_head" for layer in result.layers.values())

    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = torch_greedy(model, prompt)
    got = greedy_generate(sess, prompt.numpy(), NEW_TOKENS, eos_token_ids=())
    assert got.shape == (2, NEW_TOKENS)
    assert len(set(expected[0].tolist())) > 4, "degenerate reference: pick another seed"
    np.testing.assert_array_equal(got, expected)

    if arch == "gpt2":  # left padding: positions from the mask, as generate computes them
        mask = torch.ones(2, 5, dtype=torch.int64)
        mask[1, :2] = 0
        padded = prompt.clone()
        padded[1, :2] = 0
        np.testing.assert_array_equal(
            greedy_generate(sess, padded.numpy(), NEW_TOKENS, attention_mask=mask.numpy(),
                            eos_token_ids=()),
            torch_greedy(model, padded, mask))


def test_retie_pass_drops_copies_and_keeps_values():
    """A graph reading W, a copy of W and a folded W^T: after the pass, one initializer
    (the head MatMul reads it through Gemm transB=1), same outputs."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    idx = ir.Value(name="idx", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2]))
    wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    wt = ir.Value(name="w_t", const_value=ir.tensor(np.ascontiguousarray(w.T), name="w_t"))
    same = ir.Value(name="w_copy", const_value=ir.tensor(w.copy(), name="w_copy"))
    gather = ir.node("Gather", [wv, idx])
    matmul = ir.node("MatMul", [x, wt])
    gather2 = ir.node("Gather", [same, idx])
    for node, name in ((gather, "g"), (matmul, "m"), (gather2, "g2")):
        node.outputs[0].name = name
    graph = ir.Graph([x, idx], [gather.outputs[0], matmul.outputs[0], gather2.outputs[0]],
                     nodes=[gather, matmul, gather2], initializers=[wv, wt, same],
                     opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    feeds = {"x": np.ones((2, 4), np.float32), "idx": np.array([2, 0], np.int64)}
    before = ort_session(model).run(None, feeds)
    retie = RetiePass([["w", "w_other_name"]])
    assert retie(model).modified
    assert list(model.graph.initializers) == ["w"]
    removed = {r["name"]: r["as"] for r in retie.report["groups"][0]["removed"]}
    assert removed == {"w_t": "transposed", "w_copy": "same"}
    ops = [n.op_type for n in model.graph]
    assert "Gemm" in ops and "MatMul" not in ops and "Transpose" not in ops
    assert [v.name for v in model.graph.outputs] == ["g", "m", "g2"]
    for a, b in zip(ort_session(model).run(None, feeds), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_retie_pass_reads_w_where_a_transpose_node_did():
    """An unfolded ``MatMul(x, Transpose(W))`` (what the optimizer leaves for larger tables,
    and ONNX Runtime would fold into a second copy at load) reads ``W`` through Gemm."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, 4]))
    wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    t = ir.node("Transpose", [wv], attributes={"perm": [1, 0]})
    mm = ir.node("MatMul", [x, t.outputs[0]])
    mm.outputs[0].name = "logits"
    graph = ir.Graph([x], mm.outputs, nodes=[t, mm], initializers=[wv], opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)}
    before = ort_session(model).run(None, feeds)[0]
    assert RetiePass([["w"]])(model).modified
    assert sorted(n.op_type for n in model.graph if n.op_type != "Constant") == \
        ["Concat", "Gemm", "Reshape", "Reshape", "Shape"]
    after = ort_session(model).run(None, feeds)[0]
    assert after.shape == (2, 5, 3)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-5)
    assert [v.name for v in model.graph.outputs] == ["logits"]


def test_contract_round_trip_and_errors():
    c = DecoderContract(num_layers=2, kv_heads=(2, 1), head_dim=8, vocab_size=50,
                        eos_token_ids=(3,), tied_weights=(("a.weight", "b.weight"),))
    assert DecoderContract.from_json(c.to_json()) == c
    assert c.past_names() == ["past_key_values.0.key", "past_key_values.0.value",
                              "past_key_values.1.key", "past_key_values.1.value"]
    assert {k: v.shape for k, v in c.empty_cache(3).items()}["past_key_values.1.value"] == \
        (3, 1, 0, 8)
    data = json.loads(c.to_json())
    with pytest.raises(FormatError, match="version 99: this edgestack reads version 1"):
        DecoderContract.from_json(json.dumps({**data, "version": 99}))
    with pytest.raises(FormatError, match="malformed"):
        DecoderContract.from_json(json.dumps({k: v for k, v in data.items()
                                              if k != "head_dim"}))
    with pytest.raises(FormatError, match="kv_heads lists 1 layers, expected num_layers = 2"):
        DecoderContract(num_layers=2, kv_heads=(2,), head_dim=8, vocab_size=50)
    with pytest.raises(FormatError, match="not JSON"):
        DecoderContract.from_json("{")


def test_session_without_contract_is_refused():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
    node = ir.node("Identity", [x])
    node.outputs[0].name = "y"
    sess = ort_session(ir.Model(ir.Graph([x], node.outputs, nodes=[node],
                                         opset_imports={"": 20}), ir_version=10))
    with pytest.raises(FormatError, match="--task text-generation"):
        DecoderContract.from_session(sess)
    with pytest.raises(FormatError, match="--task text-generation"):
        greedy_generate(sess, np.zeros((1, 2), np.int64), 3)


def test_not_a_causal_lm_is_refused(tmp_path):
    from edgestack.exporter import export_decoder

    model = transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=4)).eval()
    with pytest.raises(ExportError, match="no language-model head"):
        export_decoder(model, tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="input_names is fixed by the decoder contract"):
        export_decoder(tiny_decoder("gpt2"), tmp_path / "x.onnx", input_names=["a"])
