"""Structured pruning: smaller layers, head counts kept in step, bias compensation helps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgestack import zoo
from edgestack.compress import compress
from edgestack.compress.prune import IMPORTANCE, find_structures, select_units
from edgestack.errors import CompressError


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def image_calib(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(2, 3, 32, 32, generator=g)} for _ in range(n)]


def token_calib(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 1000, (2, 32), generator=g),
             "attention_mask": torch.ones(2, 32, dtype=torch.int64)} for _ in range(n)]


def test_small_cnn_chains_and_grouped_conv(run_model):
    model, inputs = zoo.small_cnn()
    ref = run_model(model, inputs)
    before = n_params(model)
    report = compress(model, "prune", ratio=0.25)
    f = model.features
    assert (f[0].out_channels, f[2].in_channels) == (18, 18)  # 24 - 6
    # grouped consumer (groups=4, 10 inputs per group): 2 removed from every group
    assert (f[2].out_channels, f[4].in_channels) == (32, 32)
    # grouped producer (groups=4, 10 per group): 2 removed from every group
    assert (f[4].out_channels, f[4].groups, f[6].in_channels) == (32, 4, 32)
    assert (model.head[0].out_features, model.head[2].in_features) == (54, 54)
    assert n_params(model) < before
    out = run_model(model, inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert {r.name for r in report.layers} == {"features.0", "features.2", "features.4",
                                               "features.6", "head.0", "head.2"}
    rep = report.layer("features.4")
    assert rep.compressed_bytes == 4 * f[4].weight.numel()
    assert rep.details["out"] == [40, 32]
    for r in report.layers:
        assert r.compressed_bytes < r.dense_bytes


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_ratio_is_the_fraction_of_parameters_removed(ratio):
    """``ratio`` means what it means for lowrank: the fraction removed. Each MLP loses
    ``floor(ratio * channels)`` of its channels, so about ``ratio`` of its two layers'
    weights."""
    model, _ = zoo.gpt2_tiny()
    dense = {n: m.weight.numel() for n, m in model.named_modules()
             if n.endswith(("mlp.c_fc", "mlp.c_proj"))}
    report = compress(model, "prune", ratio=ratio)
    for block in model.h:
        channels = block.mlp.c_fc.weight.shape[1]
        assert channels == 512 - int(ratio * 512)
    for name, before in dense.items():
        after = report.layer(name).compressed_bytes // 4
        assert after == pytest.approx((1 - ratio) * before, rel=1e-6)
        info = report.layer(name).details["structures"][name.rsplit(".", 1)[0]]
        assert len(info["removed"]) / info["units"] == pytest.approx(ratio, abs=1 / 512)


def test_grouped_consumer_loses_the_same_count_per_group():
    model, _ = zoo.small_cnn()
    structures, _ = find_structures(model)
    groups = {s.name: s.groups for s in structures}
    assert groups["features.2->features.4"] == 4 and groups["features.4->features.6"] == 4
    compress(model, "prune", ratio=0.25, layers=("features.2", "features.4"))
    conv = model.features[4]
    assert (conv.in_channels, conv.out_channels, conv.groups) == (32, 40, 4)
    assert conv.weight.shape == (40, 8, 3, 3)


def test_gpt2_heads_and_mlp(run_model):
    model, inputs = zoo.gpt2_tiny()
    ref = run_model(model, inputs)
    report = compress(model, "prune", ratio=0.25)
    for block in model.h:
        attn = block.attn
        assert attn.num_heads == 3 and attn.split_size == 96
        assert attn.c_attn.weight.shape == (128, 288) and attn.c_proj.weight.shape == (96, 128)
        assert block.mlp.c_fc.weight.shape == (128, 384)
        assert block.mlp.c_proj.weight.shape == (384, 128)
    assert report.layer("h.0.attn.c_attn").details["heads"] == 3
    removed = report.layer("h.0.attn.c_attn").details["structures"]["h.0.attn"]["removed"]
    assert len(removed) == 1
    out = run_model(model, inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_gpt2_removes_q_k_v_of_the_same_head():
    model, _ = zoo.gpt2_tiny()
    w = model.h[0].attn.c_attn.weight.detach().clone()  # [in, 3E]
    report = compress(model, "prune", ratio=0.25, skip=("h.1",))
    (removed,) = report.layer("h.0.attn.c_attn").details["structures"]["h.0.attn"]["removed"]
    keep = [h for h in range(4) if h != removed]
    cols = [sec * 128 + h * 32 + j for sec in range(3) for h in keep for j in range(32)]
    assert torch.equal(model.h[0].attn.c_attn.weight, w[:, cols])
    assert model.h[1].attn.num_heads == 4  # skipped block untouched


def test_never_prunes_everything(run_model):
    model, inputs = zoo.gpt2_tiny()
    compress(model, "prune", ratio=0.9)
    assert all(b.attn.num_heads == 1 for b in model.h)  # floor(0.9 * 4) = 3 removed
    assert all(b.mlp.c_fc.weight.shape[1] == 52 for b in model.h)  # 512 - 460
    assert torch.isfinite(run_model(model, inputs)).all()
    keep = select_units(torch.tensor([3.0, 1.0]), 0.9)
    assert keep.tolist() == [0]
    assert select_units(torch.ones(1), 0.9).tolist() == [0]


def test_select_units_drops_lowest_per_group():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.0, 9.0, 8.0, 7.0, 6.0])
    assert select_units(scores, 0.5).tolist() == [4, 5, 6, 7]
    assert select_units(scores, 0.5, groups=2).tolist() == [0, 2, 4, 5]
    assert select_units(scores, 0.25, groups=2).tolist() == [0, 1, 2, 4, 5, 6]
    assert select_units(scores, 0.0).tolist() == list(range(8))


@pytest.mark.parametrize("factory,calib", [(zoo.small_cnn, image_calib),
                                           (zoo.gpt2_tiny, token_calib)])
def test_bias_compensation_lowers_output_error(factory, calib, run_model):
    model, _ = factory()
    data = calib(4)
    refs = [run_model(model, x) for x in data]
    with_comp, without = copy.deepcopy(model), copy.deepcopy(model)
    r1 = compress(with_comp, "prune", ratio=0.5, calib=data)
    r2 = compress(without, "prune", ratio=0.5, calib=data, bias_compensation=False)
    # same importance metric and data: the same units go
    for a, b in zip(r1.layers, r2.layers, strict=True):
        assert a.details["out"] == b.details["out"] and a.details["in"] == b.details["in"]
    assert any(r.details["bias_compensated"] for r in r1.layers)
    assert not any(r.details["bias_compensated"] for r in r2.layers)

    def err(m):
        return sum(float((run_model(m, x) - ref).pow(2).sum())
                   for x, ref in zip(data, refs, strict=True))

    # measured: small_cnn 0.43, gpt2_tiny 0.90 of the uncompensated error
    assert err(with_comp) < 0.95 * err(without), (err(with_comp), err(without))


def test_compensation_creates_a_missing_bias(run_model):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3, bias=False))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    model = Wrap().eval()
    data = [{"x": torch.randn(32, 6, generator=torch.Generator().manual_seed(i))}
            for i in range(3)]
    compress(model, "prune", ratio=0.5, calib=data)
    assert model.net[2].bias is not None and model.net[2].in_features == 8
    assert model.net[0].out_features == 8


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.Dropout(0.1), nn.Conv2d(16, 8, 3, padding=1))

    def forward(self, x):
        return self.body(x)


def _masked_reference(model, consumer, removed, x, run_model, channel_dim=1):
    """The original model's output with ``removed`` consumer inputs zeroed."""

    def hook(_mod, args):
        y = args[0].clone().movedim(channel_dim, 0)
        y[removed] = 0
        return (y.movedim(0, channel_dim),)

    handle = model.get_submodule(consumer).register_forward_pre_hook(hook)
    try:
        return run_model(model, x)
    finally:
        handle.remove()


def test_pruned_chain_equals_original_with_channels_zeroed(run_model):
    """Without compensation, pruning is exactly zeroing the removed channels (BN sliced)."""
    torch.manual_seed(0)
    model = _BNNet().eval()
    with torch.no_grad():
        model.body[1].running_mean.uniform_(-0.1, 0.1)
        model.body[1].running_var.uniform_(0.5, 1.5)
        model.body[1].weight.uniform_(-1, 1)
    original = copy.deepcopy(model)
    x = {"x": torch.randn(2, 3, 8, 8)}
    bn_w = model.body[1].weight.detach().clone()
    report = compress(model, "prune", ratio=0.25)
    assert model.body[1].num_features == 12 and model.body[0].out_channels == 12
    removed = report.layer("body.0").details["structures"]["body.0->body.4"]["removed"]
    keep = [c for c in range(16) if c not in removed]
    assert torch.equal(model.body[1].weight, bn_w[keep])
    # the weight metric includes the BN gain: the 4 smallest |gamma| * ... channels go
    expected = _masked_reference(original, "body.4", removed, x, run_model)
    assert torch.allclose(run_model(model, x), expected, atol=1e-5)


def test_pruned_gpt2_equals_original_with_heads_zeroed(run_model):
    model, inputs = zoo.gpt2_tiny()
    original = copy.deepcopy(model)
    report = compress(model, "prune", ratio=0.25, skip=("h.0.mlp", "h.1"))
    (head,) = report.layer("h.0.attn.c_proj").details["structures"]["h.0.attn"]["removed"]
    removed = list(range(head * 32, head * 32 + 32))
    expected = _masked_reference(original, "h.0.attn.c_proj", removed, inputs, run_model, -1)
    assert torch.allclose(run_model(model, inputs), expected, atol=1e-5)


def test_activation_metric_needs_calibration():
    model, _ = zoo.conv1d_net()
    with pytest.raises(CompressError, match="needs calibration data"):
        compress(model, "prune", metric="activation")
    assert model.net[0].out_channels == 19  # nothing changed


def test_metrics_are_pluggable_and_differ():
    assert set(IMPORTANCE) >= {"weight", "activation"}
    model, inputs = zoo.conv1d_net()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = compress(a, "prune", ratio=0.5, metric="weight")
    rb = compress(b, "prune", ratio=0.5, calib=[inputs])
    sa = ra.layer("net.0").details["structures"]["net.0->net.2"]
    sb = rb.layer("net.0").details["structures"]["net.0->net.2"]
    assert sa["metric"] == "weight" and sb["metric"] == "activation"
    assert len(sa["removed"]) == len(sb["removed"]) == 9


def test_model_without_structures_warns_and_lists_reasons():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="no structure was pruned"):
        report = compress(model, "prune")
    assert report.layers == []
    assert report.skipped[0].reason == ("output channels left whole: its channels reach the "
                                        "model output")


def test_skip_keeps_whole_structure():
    model, _ = zoo.gpt2_tiny()
    report = compress(model, "prune", skip=("h.0.mlp.c_proj",))
    assert model.h[0].mlp.c_fc.weight.shape == (128, 512)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "left dense" in reasons["h.0.mlp.c_fc"]
    assert model.h[1].mlp.c_fc.weight.shape == (128, 384)
