"""Compression passes on the small zoo models: every method runs, shrinks, stays close, and
each compressed weight decodes to what its format's numpy reference says."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from edgestack import zoo
from edgestack.compress import METHODS, CompressReport, compress
from edgestack.compress.layers import (
    BitStackWeight,
    CompressedLayer,
    LowRankConv,
    LowRankLinear,
    ShiftWeight,
)
from edgestack.compress.walk import dense_weight, iter_layers
from edgestack.formats import BitStackStack, ShiftCodes

FACTORIES = {"small_cnn": zoo.small_cnn, "gpt2_tiny": zoo.gpt2_tiny,
             "conv1d_net": zoo.conv1d_net}

# Loose cosine bounds (model output vs the original), measured without calibration:
# small_cnn / conv1d_net / gpt2_tiny gave shift-4 .999/.983/.972, bitstack-4 .9996/.996/.973,
# lowrank-0.5 .93/.64/.73, prune-0.25 .993/.944/.907.
COSINE_BOUND = {"shift": 0.95, "bitstack": 0.95, "lowrank": 0.5, "prune": 0.85}


@pytest.fixture(scope="module")
def originals():
    """name -> (model, inputs, reference output, dense weights by layer name)."""
    out = {}
    for name, factory in FACTORIES.items():
        model, inputs = factory()
        with torch.no_grad():
            ref = model(**inputs)
        ref = ref.last_hidden_state if hasattr(ref, "last_hidden_state") else ref
        weights = {layer.name: dense_weight(layer) for layer in iter_layers(model)}
        out[name] = (model, inputs, ref, weights)
    return out


def fresh(originals, name):
    model, inputs, ref, weights = originals[name]
    return copy.deepcopy(model), inputs, ref, weights


def test_methods_tuple():
    assert METHODS == ("none", "prune", "shift", "lowrank", "bitstack")


@pytest.mark.parametrize("method", ["shift", "bitstack", "lowrank", "prune"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_method_runs_shrinks_and_stays_close(originals, name, method, run_model, cosine):
    model, inputs, ref, _ = fresh(originals, name)
    report = compress(model, method)
    out = run_model(model, inputs)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert report.layers, report.summary()
    assert report.compressed_bytes < report.dense_bytes
    for layer in report.layers:
        assert layer.compressed_bytes < layer.dense_bytes, layer
    assert cosine(ref, out) > COSINE_BOUND[method], (name, method, cosine(ref, out))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["method"] == method and len(data["layers"]) == len(report.layers)
    assert method in report.summary()


@pytest.mark.parametrize("method", ["shift", "bitstack", "lowrank", "prune"])
def test_calibrated_passes_run_and_help_or_match(originals, method, run_model, cosine):
    """With calibration data every pass still runs; on gpt2_tiny it is not worse (much)."""
    plain, inputs, ref, _ = fresh(originals, "gpt2_tiny")
    calibrated = copy.deepcopy(plain)
    compress(plain, method)
    report = compress(calibrated, method, calib=[inputs])
    c_plain = cosine(ref, run_model(plain, inputs))
    c_cal = cosine(ref, run_model(calibrated, inputs))
    assert c_cal > COSINE_BOUND[method]
    assert c_cal > c_plain - 0.01, (c_plain, c_cal)
    if method in ("lowrank", "prune"):  # both use activations a lot: clearly better here
        assert c_cal > c_plain + 0.01, (c_plain, c_cal)
    assert report.layers


def test_none_changes_nothing(originals, run_model):
    model, inputs, ref, _ = fresh(originals, "small_cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = compress(model, "none")
    assert isinstance(report, CompressReport)
    assert report.layers == [] and report.skipped == [] and report.method == "none"
    assert report.bits_per_weight == 32.0
    assert torch.equal(run_model(model, inputs), ref)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- shift


@pytest.mark.parametrize("bits,zero", [(4, False), (5, False), (3, True), (2, False)])
def test_shift_layers_decode_exactly_to_the_reference(originals, bits, zero):
    model, _, _, weights = fresh(originals, "gpt2_tiny")
    report = compress(model, "shift", bits=bits, zero=zero)
    assert len(report.layers) == len(weights)
    for name, w in weights.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, CompressedLayer) and isinstance(layer.weight_module, ShiftWeight)
        wm = layer.weight_module
        ref = ShiftCodes.encode(w.numpy(), bits, zero, scale=wm.scale.numpy())
        assert np.array_equal(wm.codes.numpy(), ref.codes)
        assert np.array_equal(wm().numpy(), ref.decode())
        assert report.layer(name).compressed_bytes == ref.nbytes


def test_shift_maxabs_scale_is_plain_encode(originals):
    model, _, _, weights = fresh(originals, "small_cnn")
    compress(model, "shift", scale="maxabs")
    for name, w in weights.items():
        ref = ShiftCodes.encode(w.numpy(), 4, False)
        wm = model.get_submodule(name).weight_module
        assert np.array_equal(wm.codes.numpy(), ref.codes)
        assert np.array_equal(wm.scale.numpy(), ref.scale)


def test_shift_mse_scale_lowers_weight_error(originals):
    m1, _, _, weights = fresh(originals, "gpt2_tiny")
    m2 = copy.deepcopy(m1)
    r_mse = compress(m1, "shift", scale="mse")
    r_max = compress(m2, "shift", scale="maxabs")
    for name, w in weights.items():
        e_mse = float((m1.get_submodule(name).weight_module() - w).norm())
        e_max = float((m2.get_submodule(name).weight_module() - w).norm())
        assert e_mse <= e_max + 1e-7, name
        assert r_mse.layer(name).details["rel_error"] == pytest.approx(
            e_mse / float(w.norm()), rel=1e-3)
    total = sum(r.details["rel_error"] for r in r_mse.layers)
    assert total < 0.95 * sum(r.details["rel_error"] for r in r_max.layers)


def test_shift_4bit_size_is_an_eighth_plus_scales(originals):
    model, _, _, weights = fresh(originals, "gpt2_tiny")
    report = compress(model, "shift", bits=4)
    for rep in report.layers:
        numel, out = rep.numel, rep.shape[0]
        assert rep.compressed_bytes == math.ceil(numel * 4 / 8) + 4 * out
        assert rep.bits_per_weight == pytest.approx(4 + 32 * out / numel)
    assert report.compressed_bytes < report.dense_bytes / 7


# --------------------------------------------------------------------------- bitstack


def test_bitstack_blocks_reduce_error_and_decode_like_the_op(originals):
    model, _, _, weights = fresh(originals, "gpt2_tiny")
    report = compress(model, "bitstack", n_blocks=5, svd="exact")
    for name, w in weights.items():
        wm = model.get_submodule(name).weight_module
        assert isinstance(wm, BitStackWeight)
        stack = wm.to_format()
        errs = report.layer(name).details["rel_error"]
        assert len(errs) == 5 and all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
        # the stored stack decodes to exactly what was subtracted: errors match the decode
        for b in range(1, 6):
            approx = torch.from_numpy(stack.decode(b))
            err = float((approx - w).norm() / w.norm())
            assert err == pytest.approx(errs[b - 1], rel=1e-4, abs=1e-6)
        # numpy reference == torch op, for the full stack and for a prefix
        assert torch.allclose(wm(), torch.from_numpy(stack.decode()), atol=1e-6, rtol=1e-5)
        wm.active_blocks = 2
        assert torch.allclose(wm(), torch.from_numpy(stack.decode(2)), atol=1e-6, rtol=1e-5)


def test_decoded_weights_decode_once_and_follow_every_change(originals, run_model):
    from edgestack.compress import decoded_weights

    model, inputs, _, _ = fresh(originals, "gpt2_tiny")
    compress(model, "bitstack", n_blocks=3, k=2)
    shifted, cnn_inputs, _, _ = fresh(originals, "small_cnn")
    name = compress(shifted, "shift", bits=4).layers[0].name
    out = run_model(model, inputs)
    wm = next(m for m in model.modules() if isinstance(m, BitStackWeight))
    sm = shifted.get_submodule(name).weight_module
    assert wm() is not wm()                             # outside: decoded on every call
    with decoded_weights(model), decoded_weights(shifted):
        assert wm() is wm() and sm() is sm()            # inside: once
        assert torch.equal(run_model(model, inputs), out)
        wm.active_blocks = 2                            # a tier change decodes again
        assert torch.equal(wm(), torch.from_numpy(wm.to_format().decode(2)))
        before = sm().clone()
        with torch.no_grad():
            sm.scale.mul_(2)                            # so does a buffer changed in place
        assert torch.equal(sm(), 2 * before)
        # torch.export traces the decode, not the kept tensor
        graph = torch.export.export(shifted, (), kwargs=cnn_inputs).graph
        assert any("edgestack.shift_weight" in str(n.target) for n in graph.nodes)
    assert wm._decoded is None and sm._decoded is None and wm() is not wm()


def test_bitstack_size_matches_theory(originals):
    model, _, _, _ = fresh(originals, "small_cnn")
    report = compress(model, "bitstack", n_blocks=3)
    for rep in report.layers:
        m, n = rep.shape[0], rep.numel // rep.shape[0]
        k = rep.details["k"]
        assert k == max(1, min(m, n, math.floor(0.25 * m * n / (16 * (m + n)))))
        theory = BitStackStack.theoretical_bits_per_weight(m, n, k, 3)
        # sign rows are padded to whole bytes: at most 7 bits per block
        assert theory - 1e-9 <= rep.bits_per_weight <= theory + 3 * 7 / (m * n) + 1e-9


def test_bitstack_explicit_k_and_factor_bits(originals):
    model, _, _, weights = fresh(originals, "gpt2_tiny")
    report = compress(model, "bitstack", n_blocks=2, k=7)
    assert {r.details["k"] for r in report.layers} == {7}
    assert {int(model.get_submodule(n).weight_module.u.shape[2]) for n in weights} == {7}
    model2 = copy.deepcopy(fresh(originals, "gpt2_tiny")[0])
    report2 = compress(model2, "bitstack", n_blocks=2, factor_bits=1.0)
    for rep in report2.layers:
        m, n = rep.shape[0], rep.numel // rep.shape[0]
        assert rep.details["k"] == math.floor(1.0 * m * n / (16 * (m + n)))


def test_bitstack_is_deterministic(originals):
    a, _, _, weights = fresh(originals, "conv1d_net")
    b = copy.deepcopy(a)
    compress(a, "bitstack", n_blocks=3)
    compress(b, "bitstack", n_blocks=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def test_bitstack_randomized_svd_close_to_exact(originals):
    a, _, _, _ = fresh(originals, "gpt2_tiny")
    b = copy.deepcopy(a)
    ra = compress(a, "bitstack", n_blocks=4, svd="randomized")
    rb = compress(b, "bitstack", n_blocks=4, svd="exact")
    for la, lb in zip(ra.layers, rb.layers, strict=True):
        assert la.details["rel_error"][-1] == pytest.approx(lb.details["rel_error"][-1],
                                                            rel=0.02)


# --------------------------------------------------------------------------- lowrank


def test_lowrank_ratio_sets_rank_and_skips_no_gain(originals):
    model, _, _, weights = fresh(originals, "small_cnn")
    report = compress(model, "lowrank", ratio=0.7)      # 70% of the parameters removed
    skipped = {s.name: s.reason for s in report.skipped}
    assert "grouped convolution" in skipped["features.4"]
    for rep in report.layers:
        m, n = rep.shape[0], rep.numel // rep.shape[0]
        k = math.floor(0.3 * m * n / (m + n))
        assert rep.details["rank"] == k and k * (m + n) < m * n
        assert rep.compressed_bytes == 4 * k * (m + n)
        mod = model.get_submodule(rep.name)
        assert isinstance(mod, LowRankLinear if rep.kind == "linear" else LowRankConv)
        assert mod.v.weight.shape[0] == k
    assert {r.name for r in report.layers} | set(skipped) == set(weights)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_lowrank_ratio_is_the_fraction_of_parameters_removed(originals, ratio):
    """``ratio`` means what it means for prune: the fraction of each layer's parameters
    removed. The factors hold at most ``(1 - ratio)`` of the dense weight's parameters, and
    no more than one rank's worth less (the rank is rounded down)."""
    model, _, _, _ = fresh(originals, "gpt2_tiny")
    report = compress(model, "lowrank", ratio=ratio)
    assert report.layers
    for rep in report.layers:
        mod = model.get_submodule(rep.name)
        factors = mod.u.weight.numel() + mod.v.weight.numel()
        m, n = rep.shape[0], rep.numel // rep.shape[0]
        assert factors <= (1 - ratio) * m * n
        assert factors > (1 - ratio) * m * n - (m + n)          # one rank below
        assert rep.details["params_kept"] == pytest.approx(factors / (m * n), abs=1e-4)


def test_lowrank_default_ratio_is_the_old_default_model(originals):
    """The default (ratio 0.5, removed) gives the rank the old default (0.5, kept) gave."""
    from edgestack.compress.options import DEFAULT_RATIO

    model, _, _, weights = fresh(originals, "gpt2_tiny")
    report = compress(model, "lowrank")
    assert report.options["ratio"] == DEFAULT_RATIO == 0.5
    for rep in report.layers:
        m, n = rep.shape[0], rep.numel // rep.shape[0]
        assert rep.details["rank"] == min(m, n, math.floor(0.5 * m * n / (m + n)))


def test_lowrank_leaves_layers_without_gain_dense(originals):
    model, _, _, _ = fresh(originals, "small_cnn")
    report = compress(model, "lowrank", rank=20)
    skipped = {s.name: s.reason for s in report.skipped}
    # features.0 is 24 x 27: rank 20 factors hold 20 * 51 = 1020 > 648 parameters
    assert "no gain" in skipped["features.0"] and "1020" in skipped["features.0"]
    assert type(model.features[0]).__name__ == "Conv2d"
    assert {r.name for r in report.layers} == {"features.6", "features.2", "head.0"}
    assert report.layer("head.0").details["rank"] == 20


def test_lowrank_explicit_rank_is_the_factor_width(originals, run_model):
    model, inputs, ref, weights = fresh(originals, "gpt2_tiny")
    report = compress(model, "lowrank", rank=5)
    assert len(report.layers) == len(weights)
    for name, w in weights.items():
        mod = model.get_submodule(name)
        assert isinstance(mod, LowRankLinear)
        assert mod.v.weight.shape == (5, w.shape[1]) and mod.u.weight.shape == (w.shape[0], 5)
        # plain SVD: the product is the best rank-5 approximation
        s = torch.linalg.svdvals(w.double())
        best = float(s[5:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        got = mod.u.weight @ mod.v.weight
        assert float((got - w).norm() / w.norm()) == pytest.approx(best, rel=1e-3)
    assert run_model(model, inputs).shape == ref.shape


def test_lowrank_activation_aware_lowers_output_error(originals, run_model):
    model, inputs, ref, _ = fresh(originals, "gpt2_tiny")
    calib = [zoo.gpt2_tiny(seq=32)[1]] + [
        {"input_ids": torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(i)),
         "attention_mask": torch.ones(2, 32, dtype=torch.int64)} for i in range(1, 3)]
    plain = copy.deepcopy(model)
    compress(plain, "lowrank", ratio=0.5)
    report = compress(model, "lowrank", ratio=0.5, calib=calib)
    assert all(r.details["act_aware"] for r in report.layers)
    e_plain = float((run_model(plain, inputs) - ref).norm())
    e_aware = float((run_model(model, inputs) - ref).norm())
    assert e_aware < 0.8 * e_plain, (e_plain, e_aware)


# --------------------------------------------------------------------------- options


def test_skip_leaves_layers_dense(originals, run_model):
    model, inputs, ref, weights = fresh(originals, "gpt2_tiny")
    report = compress(model, "shift", skip=("h.1", "h.0.mlp.c_fc"))
    names = {r.name for r in report.layers}
    assert names == {n for n in weights if not n.startswith("h.1")} - {"h.0.mlp.c_fc"}
    reasons = {s.name: s.reason for s in report.skipped}
    assert "skip" in reasons["h.1.attn.c_attn"] and "skip" in reasons["h.0.mlp.c_fc"]
    assert type(model.h[1].attn.c_attn).__name__ == "Conv1D"
    assert report.options["skip"] == ("h.1", "h.0.mlp.c_fc")


def test_progress_bars_run(originals, capsys):
    model, _, _, _ = fresh(originals, "conv1d_net")
    report = compress(model, "bitstack", n_blocks=1, progress=True)
    assert len(report.layers) == 2


def test_report_totals_and_summary(originals):
    model, _, _, weights = fresh(originals, "small_cnn")
    report = compress(model, "shift", bits=4)
    assert report.dense_bytes == sum(4 * w.numel() for w in weights.values())
    assert report.compressed_bytes == sum(r.compressed_bytes for r in report.layers)
    numel = sum(w.numel() for w in weights.values())
    assert report.bits_per_weight == pytest.approx(8 * report.compressed_bytes / numel)
    text = report.summary()
    assert "6 layer(s) compressed" in text and "bits/weight" in text
    d = report.to_dict()
    assert d["layers"][0]["shape"] == list(report.layers[0].shape)
    assert d["options"] == {"bits": 4, "zero": False, "scale": "mse", "rounding": "auto",
                            "bits_per_layer": None, "finetune_steps": 0, "finetune_lr": 1e-3,
                            "max_seconds": None, "seed": 0, "sequential": False,
                            "finetune_params": "all", "finetune_val": 0.1,
                            "finetune_act_quant": False, "extra_texts": 0,
                            "skip": [], "layers": None}


def test_compressed_layers_have_expected_kinds(originals):
    model, _, _, _ = fresh(originals, "small_cnn")
    report = compress(model, "bitstack", n_blocks=1)
    kinds = {r.name: r.kind for r in report.layers}
    assert kinds["features.0"] == "conv2d" and kinds["head.2"] == "linear"
    layer = model.get_submodule("features.4")
    assert layer.conv["groups"] == 4  # grouped conv compressed with its settings kept
