"""Channel pruning of traced conv nets: residual streams pruned consistently, depthwise and
grouped convolutions handled, the requested fraction removed, ONNX parity kept."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from edgestack import zoo
from edgestack.compress import compress
from edgestack.compress.prune import find_structures
from edgestack.exporter import export

FACTORIES = {"resnet_tiny": zoo.resnet_tiny, "mobilenet_tiny": zoo.mobilenet_tiny}


def calib(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(2, 3, 32, 32, generator=g)} for _ in range(n)]


def zeroed_reference(model: nn.Module, removed: dict[str, list[int]], x: dict) -> torch.Tensor:
    """The model's output with the listed input channels of each consumer zeroed."""

    def hook_for(cols):
        def hook(_mod, args):
            y = args[0].clone()
            y[:, cols] = 0
            return (y,)
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(c))
               for n, c in removed.items()]
    try:
        with torch.no_grad():
            return model(**x)
    finally:
        for h in handles:
            h.remove()


def test_resnet_residual_streams_are_one_structure():
    structures, refused = find_structures(zoo.resnet_tiny()[0])
    by_producers = {tuple(p.name for p, _ in st.producers): st for st in structures}
    stream = by_producers[("stem.0.0", "layer1.0.conv2.0", "layer1.1.conv2.0")]
    assert {c.name for c in stream.consumers} == {
        "layer1.0.conv1.0", "layer1.1.conv1.0", "layer2.0.conv1.0", "layer2.0.shortcut.0"}
    assert {n for n, _ in stream.between} == {"stem.0.1", "layer1.0.conv2.1",
                                              "layer1.1.conv2.1"}
    assert "reach the model output" in refused["fc"]
    assert len(structures) == 6  # 2 streams + 4 block-internal channel sets


def test_mobilenet_depthwise_grouped_and_gate():
    structures, _ = find_structures(zoo.mobilenet_tiny()[0])
    by_consumer = {st.consumer.name: st for st in structures}
    inner = by_consumer["project.0"]  # expand -> depthwise -> project
    assert [d.name for d in inner.depthwise] == ["dw.0"] and inner.groups == 1
    gated = by_consumer["se_reduce"]  # grouped conv -> depthwise -> SE gate -> grouped 1x1
    assert {p.name for p, _ in gated.producers} == {"grouped.0", "se_expand"}
    assert {c.name for c in gated.consumers} == {"se_reduce", "head_conv.0"}
    assert gated.groups == 4  # lcm(groups 4 of grouped.0, 2 of head_conv.0)
    assert by_consumer["expand.0"].groups == 4  # read by grouped.0 (groups=4)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_requested_fraction_removed_and_pruning_is_zeroing(name, ratio):
    """Each channel set loses ``floor(ratio * n / groups) * groups`` channels; without
    compensation the result equals the original with those channels zeroed at every
    consumer input (BatchNorm, depthwise filters and residual adds included)."""
    model, x = FACTORIES[name]()
    original = copy.deepcopy(model)
    structures, _ = find_structures(model)
    report = compress(model, "prune", ratio=ratio, bias_compensation=False)
    removed: dict[str, list[int]] = {}
    for st in structures:
        info = report.layer(st.consumer.name).details["structures"][st.name]
        per = st.n_units // st.groups
        assert len(info["removed"]) == math.floor(ratio * per) * st.groups, st.name
        for c in st.consumers:
            removed[c.name] = info["removed"]
        kept = st.n_units - len(info["removed"])
        for p, _ in st.producers:
            assert model.get_submodule(p.name).weight.shape[0] == kept
        for d in st.depthwise:
            dw = model.get_submodule(d.name)
            assert dw.groups == dw.in_channels == dw.out_channels == kept
        for bn, _ in st.between:
            assert model.get_submodule(bn).num_features == kept
    with torch.no_grad():
        out = model(**x)
    torch.testing.assert_close(out, zeroed_reference(original, removed, x), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_bias_compensation_lowers_error(name):
    model, _ = FACTORIES[name]()
    data = calib()
    with torch.no_grad():
        refs = [model(**x) for x in data]
    with_comp, without = copy.deepcopy(model), copy.deepcopy(model)
    compress(with_comp, "prune", ratio=0.5, calib=data)
    compress(without, "prune", ratio=0.5, calib=data, bias_compensation=False)

    def err(m):
        with torch.no_grad():
            return sum(float((m(**x) - r).pow(2).sum()) for x, r in zip(data, refs, strict=True))

    # measured: resnet_tiny 0.005, mobilenet_tiny 0.014 of the uncompensated error
    assert err(with_comp) < 0.5 * err(without), (err(with_comp), err(without))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_pruned_convnet_exports_with_parity(name, tmp_path):
    model, x = FACTORIES[name]()
    before = sum(p.numel() for p in model.parameters())
    compress(model, "prune", ratio=0.5, calib=calib(2))
    assert sum(p.numel() for p in model.parameters()) < 0.6 * before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, x, tmp_path / f"{name}.onnx")
    assert result.parity.passed and result.parity.max_rel <= 1e-4, result.parity.table()


class _Concat(nn.Module):
    """A channel concatenation (left whole) next to a prunable chain."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.c, self.d = nn.Conv2d(16, 12, 1), nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.cat([self.a(x), self.b(x)], 1))))


def test_unknown_ops_pin_their_channels_with_a_reason():
    model = _Concat().eval()
    report = compress(model, "prune", ratio=0.5)
    assert (model.a.out_channels, model.c.in_channels) == (8, 16)  # cat: left whole
    assert (model.c.out_channels, model.d.in_channels) == (6, 6)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "cat" in reasons["a"] and "cat" in reasons["b"]
    assert report.layer("d").details["out"] == [4, 4]  # its outputs are the model output


def test_untraceable_model_falls_back_to_sequential_chains():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            self.other = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = self.other(x)
            return self.net(x)

    model = Branchy().eval()
    report = compress(model, "prune", ratio=0.5)
    assert model.net[0].out_features == 4
    reasons = {s.name: s.reason for s in report.skipped}
    assert "torch.fx cannot trace" in reasons["other"]


def hf_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
        num_labels=10)).eval()


def hf_mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    return MobileNetV2ForImageClassification(MobileNetV2Config(
        depth_multiplier=0.35, image_size=32, num_labels=10)).eval()


@pytest.mark.parametrize("build", [hf_resnet, hf_mobilenet_v2], ids=["resnet", "mobilenet_v2"])
def test_hugging_face_cnns_prune_through_torch_export(build, tmp_path):
    """transformers' CNNs check shapes in Python, so torch.fx cannot trace them; with a
    calibration input the torch.export graph gives their channel spaces."""
    from edgestack.compress.pruned import load_pruned, save_pruned

    model = build()
    x = {"pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untraced = compress(copy.deepcopy(model), "prune", ratio=0.5)  # no example input
    assert not untraced.layers and "torch.fx cannot trace" in untraced.skipped[0].reason
    before = sum(p.numel() for p in model.parameters())
    report = compress(model, "prune", ratio=0.5, calib=[x])
    assert report.layers and sum(p.numel() for p in model.parameters()) < 0.35 * before
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, model(**x).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, x, tmp_path / "pruned.onnx")
    assert result.parity.passed and result.parity.max_rel <= 1e-4, result.parity.table()
