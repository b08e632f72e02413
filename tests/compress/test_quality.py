"""Issue #3: calibration, GPTQ/fine-tuned shift codes, BitStack importance order and tiers,
Monarch export, FLAP pruning, pruned-model folders, and the quality CLI (small models)."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from edgestack.compress import compress
from edgestack.compress.bitstack import check_order, importance_order, set_tier
from edgestack.compress.calib import calib_sentences, check_calib_tokens, text_calib
from edgestack.compress.layers import BitStackWeight, MonarchLinear, ShiftWeight
from edgestack.errors import CompressError
from edgestack.formats import ShiftCodes

from mlp_cases import MLP, mlp_calib, out_err

# --------------------------------------------------------------------------- calibration


def test_shipped_corpus_is_disjoint_from_the_held_set():
    from edgestack.core.quality import held_sentences

    corpus = calib_sentences()
    assert len(corpus) >= 200
    assert not set(corpus) & set(held_sentences())


def test_calibration_data_empty_or_too_short_is_refused():
    with pytest.raises(CompressError, match="calibration data is empty"):
        check_calib_tokens([])
    short = [{"input_ids": torch.ones(1, 5, dtype=torch.int64),
              "attention_mask": torch.ones(1, 5, dtype=torch.int64)}]
    with pytest.raises(CompressError, match=r"too short: 5 token\(s\), at least 64"):
        check_calib_tokens(short)
    assert check_calib_tokens(short, min_tokens=5) == 5
    with pytest.raises(CompressError, match="calib: the list of calibration inputs is empty"):
        compress(MLP(), "shift", calib=[])
    model, _ = __import__("edgestack.zoo", fromlist=["gpt2_tiny"]).gpt2_tiny(seq=8)
    eight = [{"input_ids": torch.ones(1, 8, dtype=torch.int64),
              "attention_mask": torch.ones(1, 8, dtype=torch.int64)}]
    for method, opts in (("shift", {"rounding": "gptq"}), ("bitstack", {"signs": "gptq"}),
                         ("bitstack", {"signs": "plain", "finetune_steps": 2})):
        with pytest.raises(CompressError, match=r"too short: 8 token\(s\)"):
            compress(model, method, calib=eight, **opts)
    # plain signs without a fine-tune only scale by the activations: short data is fine
    assert compress(model, "bitstack", signs="plain", n_blocks=1, calib=eight).layers
    with pytest.raises(CompressError, match="need.*calibration data"):
        compress(MLP(), "shift", rounding="gptq")


def test_text_calib_from_the_shipped_corpus():
    from edgestack import zoo

    folder = zoo.minilm_path()
    batches = text_calib(folder, n=16, seq=32, batch=8)
    assert len(batches) == 2 and batches[0]["input_ids"].shape[0] == 8
    assert batches[0]["input_ids"].shape[1] <= 32 and batches[0]["input_ids"].shape[1] % 8 == 0
    with pytest.raises(CompressError, match="texts are empty"):
        text_calib(folder, texts=["  ", ""])
    with pytest.raises(CompressError, match="too short"):
        text_calib(folder, texts=["Hi."])


# --------------------------------------------------------------------------- shift


def test_gptq_rounding_beats_nearest_on_output_error():
    data = mlp_calib()
    ref = MLP()
    near, gptq = copy.deepcopy(ref), copy.deepcopy(ref)
    compress(near, "shift", calib=data, rounding="nearest")
    rep = compress(gptq, "shift", calib=data, rounding="gptq")
    for layer in rep.layers:
        d = layer.details
        assert d["rounding"] == "gptq"
        assert d["output_error"] < d["output_error_nearest"], d
    assert out_err(gptq, ref, data) < 0.8 * out_err(near, ref, data)
    seq = copy.deepcopy(ref)
    compress(seq, "shift", calib=data, rounding="gptq", sequential=True)
    assert out_err(seq, ref, data) < 0.8 * out_err(near, ref, data)
    # still exact shift codes
    for mod in (gptq.fc1, gptq.fc2):
        assert isinstance(mod.weight_module, ShiftWeight)
    # the default, rounding="auto", is GPTQ when there is enough calibration data
    auto = copy.deepcopy(ref)
    rep = compress(auto, "shift", calib=data)
    assert rep.options["rounding"] == "auto"
    assert all(layer.details["rounding"] == "gptq" for layer in rep.layers)
    assert out_err(auto, ref, data) == pytest.approx(out_err(gptq, ref, data))
    rep = compress(copy.deepcopy(ref), "shift")               # no data: nearest
    assert all(layer.details["rounding"] == "nearest" for layer in rep.layers)


def gptq3(model: nn.Module, data: list[dict], **options):
    """3-bit GPTQ shift codes (the fine-tune tests' rounding), with more ``options``."""
    return compress(model, "shift", calib=data, rounding="gptq", bits=3, **options)


def test_shift_finetune_improves_and_keeps_exact_codes():
    data = mlp_calib(n=4)
    ref = MLP()
    plain, tuned = copy.deepcopy(ref), copy.deepcopy(ref)
    gptq3(plain, data)
    rep = gptq3(tuned, data, finetune_steps=30, finetune_lr=2e-3, seed=0)
    info = rep.details["finetune"]
    assert info["steps"] == 30 and info["loss_last"] < info["loss_first"]
    assert out_err(tuned, ref, data) < 0.97 * out_err(plain, ref, data)
    for mod in (tuned.fc1, tuned.fc2):
        sw = mod.weight_module
        assert isinstance(sw, ShiftWeight)
        fmt = sw.to_format()
        w = fmt.decode()
        np.testing.assert_array_equal(w, sw().numpy())
        again = ShiftCodes.encode(w, fmt.bits, fmt.zero, scale=fmt.scale)
        np.testing.assert_array_equal(again.codes, fmt.codes)  # values are exact codes
    # scales only: the codes stay those of the rounding, the scales change
    scales = copy.deepcopy(ref)
    gptq3(scales, data, finetune_steps=10, finetune_params="scales", seed=0)
    assert torch.equal(scales.fc1.weight_module.codes, plain.fc1.weight_module.codes)
    assert not torch.equal(scales.fc1.weight_module.scale, plain.fc1.weight_module.scale)
    # reproducible with the seed
    again = copy.deepcopy(ref)
    gptq3(again, data, finetune_steps=30, finetune_lr=2e-3, seed=0)
    assert torch.equal(again.fc1.weight_module.codes, tuned.fc1.weight_module.codes)


def test_shift_unit_matches_the_reference_rounding():
    from edgestack.compress.finetune import shift_unit
    from edgestack.compress.shift import shift_values
    from edgestack.formats.shift import levels

    g = torch.Generator().manual_seed(0)
    r = torch.randn(64, 97, generator=g) * 0.6
    r[0, :9] = torch.tensor([0.75, 0.375, 1.5, 3.0, 0.0, -0.75, 1e-9, 0.0046875, -2.0])
    for bits in (2, 3, 4, 5):
        for zero in (False, True):
            ref = shift_values(r, torch.ones(64), bits, zero)
            assert torch.equal(shift_unit(r, levels(bits, zero), zero), ref), (bits, zero)


def test_finetune_schedule_and_split():
    from edgestack.compress.finetune import lr_factor, split_batches

    lrs = [lr_factor(k, 100) for k in range(100)]
    assert lrs[0] < lrs[4] == pytest.approx(1.0)  # 5 warm-up steps
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False)) and lrs[-1] < 0.01
    tr, val = split_batches(20, 0.1, seed=3)
    assert len(val) == 2 and sorted(tr + val) == list(range(20))
    assert split_batches(20, 0.1, seed=3) == (tr, val)
    assert split_batches(20, 0.0, seed=3) == (list(range(20)), [])


def test_shift_finetune_respects_max_seconds_and_keeps_the_rounding_at_step_0():
    data = mlp_calib(n=4)
    plain, timed = MLP(), MLP()
    gptq3(plain, data)
    rep = gptq3(timed, data, finetune_steps=500, max_seconds=1e-9)
    assert rep.details["finetune"]["steps"] == 0
    for a, b in ((plain.fc1, timed.fc1), (plain.fc2, timed.fc2)):
        assert torch.equal(a.weight_module.codes, b.weight_module.codes)
        assert torch.allclose(a.weight_module.scale, b.weight_module.scale)


def held_out_loss(model: nn.Module, ref: nn.Module, data: list[dict], seed: int,
                  n_val: int = 2) -> float:
    """The fine-tune's held-out loss of ``model`` (distilling ``ref``) on the ``n_val``
    batches that the shift pass holds out with ``seed`` (as ``finetune_shift`` measures it)."""
    from edgestack.compress.finetune import batch_loss, split_batches, target_norms
    from edgestack.compress.shift import model_outputs

    targets = model_outputs(ref, data)
    norms = target_norms(targets)
    _, val_idx = split_batches(len(data), n_val / len(data), seed)
    assert len(val_idx) == n_val
    with torch.no_grad():
        return sum(float(batch_loss(model, data, targets, norms, i, targets[0].device))
                   for i in val_idx) / len(val_idx)


def test_shift_finetune_early_stop_on_held_out_batches():
    data = mlp_calib(n=10)
    ref = MLP()
    plain, tuned = copy.deepcopy(ref), copy.deepcopy(ref)
    gptq3(plain, data)
    rep = gptq3(tuned, data, finetune_steps=40, finetune_lr=2e-3, finetune_val=0.2, seed=1)
    info = rep.details["finetune"]
    assert info["val_batches"] == 2 and info["train_batches"] == 8
    assert info["val_loss_best"] <= info["val_loss_first"]
    assert 0 <= info["best_step"] <= 40
    assert out_err(tuned, ref, data) < out_err(plain, ref, data)
    # the best latents were restored and re-rounded to the very shift values they were
    # evaluated with: the returned model's held-out loss is the reported best one
    assert info["val_loss_first"] > info["val_loss_best"]  # (40 steps do improve it)
    assert held_out_loss(tuned, ref, data, seed=1) == pytest.approx(info["val_loss_best"],
                                                                    rel=1e-5)
    # a learning rate so high that every evaluation is worse than step 0: the step-0
    # latents (the GPTQ rounding) are restored, not the last ones
    wild = copy.deepcopy(ref)
    info = gptq3(wild, data, finetune_steps=40, finetune_lr=5e-2, finetune_val=0.2,
                 seed=1).details["finetune"]
    assert info["best_step"] == 0 and info["val_loss_best"] == info["val_loss_first"]
    assert held_out_loss(wild, ref, data, seed=1) == pytest.approx(info["val_loss_best"],
                                                                   rel=1e-5)
    for a, b in ((plain.fc1, wild.fc1), (plain.fc2, wild.fc2)):
        assert torch.equal(a.weight_module.codes, b.weight_module.codes)
    # all+norms also trains the (fp32) biases
    nb = copy.deepcopy(ref)
    gptq3(nb, data, finetune_steps=20, finetune_lr=2e-3, finetune_params="all+norms",
          finetune_val=0.0)
    assert not torch.equal(nb.fc1.bias, plain.fc1.bias)
    with pytest.raises(CompressError, match="finetune_params"):
        compress(MLP(), "shift", calib=data, finetune_steps=1, finetune_params="norms")


def test_fake_quant_uint8_rounds_like_onnx_dynamic_quantize_linear():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgestack.compress.finetune import fake_quant_uint8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 32, generator=g) * torch.linspace(0.1, 5.0, 32) + 0.7
    x[1] = x[1].abs() + 0.5          # all positive: the range still holds 0
    x[2] = -x[2].abs()               # all negative
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 16, 32]) for n in "xy"]
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "dql", io[:1], io[1:])
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    sess = ort.InferenceSession(onnx_model.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    got = fake_quant_uint8(x)
    for i in range(3):   # one scale and zero point per batch element, as served (batch 1)
        want = sess.run(None, {"x": x[i:i + 1].numpy()})[0]
        step = float(x[i].max().clamp_min(0) - x[i].min().clamp_max(0)) / 255
        np.testing.assert_allclose(got[i:i + 1].numpy(), want, rtol=0, atol=1e-4 * step)
        assert float((got[i] - x[i]).abs().max()) <= 0.5 * step * (1 + 1e-5)
    xg = x.clone().requires_grad_(True)
    (fake_quant_uint8(xg) * 3.0).sum().backward()
    assert torch.equal(xg.grad, torch.full_like(x, 3.0))   # straight through


def test_shift_finetune_with_activation_fake_quant():
    from edgestack.compress.finetune import _fake_quant_input

    data = mlp_calib(n=10)
    ref = MLP()
    plain, tuned = copy.deepcopy(ref), copy.deepcopy(ref)
    gptq3(plain, data, zero=True)
    ft = {"finetune_steps": 40, "finetune_lr": 2e-3, "finetune_val": 0.2, "seed": 1,
          "zero": True}
    info = gptq3(tuned, data, finetune_act_quant=True, **ft).details["finetune"]
    assert info["val_loss_best"] < info["val_loss_first"]
    assert not tuned.fc1._forward_pre_hooks and not tuned.fc2._forward_pre_hooks  # removed
    assert isinstance(tuned.fc1.weight_module, ShiftWeight)

    def rounded(model: nn.Module) -> list:
        return [m.register_forward_pre_hook(_fake_quant_input) for m in (model.fc1, model.fc2)]

    # its held-out loss was measured with the inputs rounded (as served): the returned model
    # gives the reported best loss only with the rounding on
    hooks = rounded(tuned)
    assert held_out_loss(tuned, ref, data, seed=1) == pytest.approx(info["val_loss_best"],
                                                                    rel=1e-5)
    hooks += rounded(plain)
    errs = {name: out_err(m, ref, data) for name, m in (("plain", plain), ("tuned", tuned))}
    for h in hooks:
        h.remove()
    assert held_out_loss(tuned, ref, data, seed=1) != pytest.approx(info["val_loss_best"],
                                                                    rel=1e-5)
    assert errs["tuned"] < errs["plain"]
    with pytest.raises(CompressError, match="finetune_act_quant"):
        compress(MLP(), "shift", calib=data, finetune_steps=1, finetune_act_quant="yes")


def test_corpus_is_large_deterministic_and_never_holds_a_held_sentence():
    from edgestack.compress.calib import corpus_sentences, model_text_calib
    from edgestack.core.quality import held_sentences

    corpus = corpus_sentences()
    assert len(corpus) >= 1000 and len(set(corpus)) == len(corpus)
    assert not set(corpus) & set(held_sentences())
    assert corpus[:len(calib_sentences())] == calib_sentences()
    assert corpus_sentences(300) == corpus[:300]
    with pytest.raises(CompressError, match="tokenizer.json"):
        model_text_calib(MLP(), 10)
    # extra_texts is an option of every calibrated method, handled before the pass runs
    for method in ("shift", "bitstack", "lowrank", "prune"):
        with pytest.raises(CompressError, match="tokenizer.json"):
            compress(MLP(), method, calib=mlp_calib(n=2), extra_texts=10)
    with pytest.raises(CompressError, match="has no option 'extra_texts'"):
        compress(MLP(), "none", extra_texts=10)
    with pytest.raises(CompressError, match="extra_texts"):
        compress(MLP(), "bitstack", extra_texts=-1)


def test_extra_texts_tokenized_like_the_calibration_batches(minilm_s16):
    from edgestack import zoo
    from edgestack.compress.calib import model_text_calib

    model, _ = minilm_s16  # tests/conftest.py: only its tokenizer folder is read
    like = text_calib(zoo.minilm_path(), n=8, seq=32, batch=4)
    extra = model_text_calib(model, 20, like, seq=32)
    # the 8 sentences already in `like` are left out: 12 new ones, batches of 4
    assert len(extra) == 3 and set(extra[0]) == set(like[0])
    assert sum(x["input_ids"].shape[0] for x in extra) == 12
    assert extra[0]["input_ids"].shape[0] == 4 and extra[0]["input_ids"].shape[1] <= 32
    have = {tuple(r[:int(m.sum())]) for x in like
            for r, m in zip(x["input_ids"].tolist(), x["attention_mask"], strict=True)}
    assert not have & {tuple(r[:int(m.sum())]) for x in extra
                       for r, m in zip(x["input_ids"].tolist(), x["attention_mask"], strict=True)}


def test_shift_bits_per_layer_counts_bytes():
    rep = compress(MLP(), "shift", bits_per_layer={"fc2": 5})
    assert rep.layer("fc1").details["bits"] == 4 and rep.layer("fc2").details["bits"] == 5
    assert rep.layer("fc2").compressed_bytes == 64 * 32 * 5 // 8 + 4 * 32
    with pytest.raises(CompressError, match="bits_per_layer"):
        compress(MLP(), "shift", bits_per_layer={"fc2": 7})


# --------------------------------------------------------------------------- bitstack


def test_bitstack_importance_order_invariants():
    model = MLP()
    data = mlp_calib()
    rep = compress(model, "bitstack", n_blocks=3, calib=data)
    order = rep.importance_order
    assert order == importance_order(model)
    blocks = {layer.name: 3 for layer in rep.layers}
    check_order(order, blocks)
    assert len(order) == 6 and set(order) == {(n, b) for n in blocks for b in range(3)}
    # level-major: every matrix gets block b+1 before any gets block b+2
    levels = [b for _, b in order]
    assert levels == sorted(levels)
    # within a level: decreasing measured gain
    for level in range(3):
        gains = [rep.layer(n).details["gains"][b] for n, b in order if b == level]
        assert gains == sorted(gains, reverse=True)
    assert json.loads(json.dumps(rep.to_dict()))["importance_order"][0] == list(order[0])
    with pytest.raises(CompressError, match="before its block"):
        check_order([("fc1", 1), ("fc1", 0)], {"fc1": 2})
    with pytest.raises(CompressError, match="misses"):
        check_order([("fc1", 0)], {"fc1": 2})


def test_bitstack_tier_curve_is_monotone():
    ref = MLP()
    data = mlp_calib()
    model = copy.deepcopy(ref)
    rep = compress(model, "bitstack", n_blocks=4, calib=data)
    errs, bits = [], []
    for count in range(2, len(rep.importance_order) + 1):
        tier = set_tier(model, rep, count=count)
        errs.append(out_err(model, ref, data))
        bits.append(tier["bits_per_weight"])
    assert bits == sorted(bits) and len(set(bits)) == len(bits)
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    tier = set_tier(model, rep, max_bits=bits[2] + 1e-6)
    assert tier["bits_per_weight"] <= bits[2] + 1e-6
    assert isinstance(model.fc1.weight_module, BitStackWeight)


# --------------------------------------------------------------------------- low-rank


def test_monarch_layer_matches_its_dense_weight_and_exports(tmp_path):
    from edgestack.exporter import export

    ref = MLP(d=32, h=64)
    model = copy.deepcopy(ref)
    rep = compress(model, "lowrank", structure="monarch", ratio=0.5, monarch_blocks=4)
    assert isinstance(model.fc1, MonarchLinear) and isinstance(model.fc2, MonarchLinear)
    assert rep.layer("fc1").details["structure"] == "monarch"
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        dense = nn.functional.linear(x, model.fc1.dense(), model.fc1.bias)
        torch.testing.assert_close(model.fc1(x), dense, rtol=1e-5, atol=1e-5)
    # full rank per block reproduces the weight exactly
    from edgestack.compress.layers import monarch_factors

    w = ref.fc1.weight.detach()
    exact = MonarchLinear(*monarch_factors(w, 4, 4, 8), None)
    torch.testing.assert_close(exact.dense(), w, rtol=1e-4, atol=1e-5)
    result = export(model, {"x": x}, tmp_path / "monarch.onnx")
    assert result.parity.passed
    import onnx

    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "MatMul" in ops and not any(n.domain == "edgestack" for n in
                                       onnx.load(str(result.path)).graph.node)


def test_lowrank_energy_splits_low_and_full_rank_layers():
    torch.manual_seed(0)
    model = MLP(d=32, h=64)
    with torch.no_grad():  # fc1 exactly rank 2, fc2 full rank
        model.fc1.weight.copy_(torch.randn(64, 2) @ torch.randn(2, 32))
    rep = compress(model, "lowrank", energy=0.99)
    assert [layer.name for layer in rep.layers] == ["fc1"]
    assert rep.layer("fc1").details["rank"] == 2
    assert any(s.name == "fc2" and "full rank" in s.reason for s in rep.skipped)


# --------------------------------------------------------------------------- pruning


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 3))
        with torch.no_grad():
            self.net[0].weight.copy_(torch.eye(4))
            self.net[0].bias.zero_()
            self.net[2].weight.fill_(1.0)
            self.net[2].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_flap_fluctuation_removes_the_least_fluctuating_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g) * torch.tensor([1.0, 2.0, 1.0, 0.5])
    x[:, 2] = 10.0  # large but constant: activation keeps it, fluctuation drops it
    data = [{"x": x}]
    fl, act = Chain(), Chain()
    r1 = compress(fl, "prune", ratio=0.25, metric="fluctuation", calib=data)
    r2 = compress(act, "prune", ratio=0.25, metric="activation", calib=data)
    assert r1.layer("net.0").details["structures"]["net.0->net.2"]["removed"] == [2]
    assert r2.layer("net.0").details["structures"]["net.0->net.2"]["removed"] == [3]
    with torch.no_grad():  # constant channel + bias compensation: exact
        torch.testing.assert_close(fl(x), Chain()(x), rtol=1e-5, atol=1e-4)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    model = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 100, (4, 16), generator=g),
             "attention_mask": torch.ones(4, 16, dtype=torch.int64)} for _ in range(4)]
    return model, data


def test_adaptive_prune_and_pruned_folder_round_trip(tmp_path):
    from edgestack.compress.pruned import load_pruned, save_pruned

    model, data = _tiny_bert()
    rep = compress(model, "prune", ratio=0.3, metric="fluctuation", adaptive=True, calib=data)
    inter = [model.encoder.layer[i].intermediate.dense.out_features for i in range(2)]
    assert sum(inter) == 256 - int(0.3 * 256)
    assert rep.layers
    save_pruned(model, tmp_path / "pruned")
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert "edgestack_pruned" in cfg and cfg["edgestack_pruned"]["heads"]
    loaded = load_pruned(tmp_path / "pruned")
    for a, b in zip(model.encoder.layer, loaded.encoder.layer, strict=True):
        assert a.intermediate.dense.weight.shape == b.intermediate.dense.weight.shape
        assert a.attention.self.num_attention_heads == b.attention.self.num_attention_heads
    with torch.no_grad():
        torch.testing.assert_close(loaded(**data[0]).last_hidden_state,
                                   model(**data[0]).last_hidden_state, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- CLI


def test_quality_cli_small_model(capsys, tmp_path):
    from edgestack.cli import quality

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    quality.add_parser(sub)
    args = parser.parse_args(["quality", "small-cnn", "--method", "shift", "--json",
                              "--out", str(tmp_path / "q.json")])
    assert args.run(args) == 0
    doc = json.loads(capsys.readouterr().out)
    labels = [r["label"] for r in doc["rows"]]
    assert labels[:3] == ["int8", "int4_g32", "int4_g128"] and len(labels) == 4
    int8, g32 = doc["rows"][0], doc["rows"][1]
    assert int8["cosine_mean"] > 0.999 and g32["bits_per_weight"] > 4.0
    assert doc["rows"][3]["bits_per_weight"] < 4.5
    assert json.loads((tmp_path / "q.json").read_text())["rows"] == doc["rows"]
    bad = parser.parse_args(["quality", "small-cnn", "--method", "shift", "--blocks", "2"])
    with pytest.raises(CompressError, match="do not apply"):
        bad.run(bad)


def test_quality_cli_bitstack_flags_reach_compress(capsys):
    from edgestack.cli import quality

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    quality.add_parser(sub)
    args = parser.parse_args(["quality", "small-cnn", "--method", "bitstack", "--blocks", "2",
                              "--factor-bits", "0.125", "--signs", "plain", "--tiers", "1,2",
                              "--no-baselines", "--json"])
    assert quality.method_options(args) == {"n_blocks": 2, "factor_bits": 0.125,
                                            "signs": "plain"}
    assert args.run(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["label"].rsplit(", ", 1)[1] for r in rows] == ["1 blocks", "2 blocks"]
    assert rows[0]["tier_blocks"] < rows[1]["tier_blocks"]
    assert rows[0]["bits_per_weight"] < rows[1]["bits_per_weight"]
    assert all(r["options"]["factor_bits"] == 0.125 for r in rows)
    # --extra-texts is compress()'s extra_texts (text models only: small-cnn has no tokenizer)
    ex = parser.parse_args(["quality", "small-cnn", "--method", "prune", "--extra-texts", "5",
                            "--no-baselines"])
    assert quality.method_options(ex) == {"extra_texts": 5}
    with pytest.raises(CompressError, match="tokenizer.json"):
        ex.run(ex)
