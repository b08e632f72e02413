"""compress() refuses bad input with messages that say what, expected vs found, and the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from edgestack import zoo
from edgestack.compress import compress, method_options
from edgestack.errors import CompressError, EdgestackError


class Net(nn.Module):
    def __init__(self, *mods: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*mods)

    def forward(self, x):
        return self.body(x)


def small() -> Net:
    torch.manual_seed(0)
    return Net(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_unknown_method_lists_valid_ones():
    with pytest.raises(CompressError) as exc:
        compress(small(), "quantize")
    msg = str(exc.value)
    assert "'quantize'" in msg
    assert "none, prune, shift, lowrank, bitstack" in msg
    assert issubclass(CompressError, EdgestackError)


def test_near_miss_method_gets_a_hint():
    with pytest.raises(CompressError, match="did you mean 'shift'"):
        compress(small(), "shfit")


@pytest.mark.parametrize("method,option,listed", [
    ("shift", "n_blocks", "bits, bits_per_layer, extra_texts, finetune_act_quant, finetune_lr, "
     "finetune_params, finetune_steps, finetune_val, layers, max_seconds, rounding, scale, "
     "seed, sequential, skip, zero"),
    ("bitstack", "bits", "act_aware, device, extra_texts, factor_bits, finetune_lr, "
     "finetune_steps, k, layers, max_seconds, n_blocks, refit, seed, signs, skip, svd"),
    ("lowrank", "blocks", "act_aware, energy, extra_texts, layers, max_keep, monarch_blocks, "
     "rank, ratio, skip, structure"),
    ("prune", "rank", "adaptive, bias_compensation, extra_texts, layers, metric, ratio, skip"),
    ("none", "bits", "layers, skip"),
])
def test_unknown_option_lists_the_methods_options(method, option, listed):
    model = small()
    with pytest.raises(CompressError) as exc:
        compress(model, method, **{option: 1})
    msg = str(exc.value)
    assert f"method {method!r} has no option {option!r}" in msg
    assert f"its options are {listed}" in msg
    assert isinstance(model.body[0], nn.Linear)


def test_option_of_another_method_is_named():
    with pytest.raises(CompressError, match="'n_blocks' is an option of bitstack"):
        compress(small(), "shift", n_blocks=4)


@pytest.mark.parametrize("method,options,expected", [
    ("shift", {"bits": 1}, "expected an integer 2..5, found 1"),
    ("shift", {"bits": 6}, "expected an integer 2..5, found 6"),
    ("shift", {"bits": 4.0}, "expected an integer 2..5, found 4.0"),
    ("shift", {"zero": "yes"}, "option zero: expected one of False, True"),
    ("shift", {"scale": "l2"}, "option scale: expected one of 'mse', 'maxabs'"),
    ("bitstack", {"n_blocks": 0}, "option n_blocks: expected an integer 1..64, found 0"),
    ("bitstack", {"n_blocks": 65}, "option n_blocks: expected an integer 1..64, found 65"),
    ("bitstack", {"k": 0}, "option k: expected an integer >= 1, found 0"),
    ("bitstack", {"factor_bits": 0}, "option factor_bits: expected a number in (0, 16]"),
    ("bitstack", {"device": "tpu"}, "option device: expected one of 'cpu', 'cuda'"),
    ("lowrank", {"rank": 0}, "option rank: expected an integer >= 1, found 0"),
    ("lowrank", {"ratio": 1.0}, "option ratio: expected a number in [0, 1), found 1.0; "
     "the fraction of each layer's parameters removed"),
    ("lowrank", {"ratio": -0.5}, "option ratio: expected a number in [0, 1), found -0.5"),
    ("lowrank", {"rank": 4, "ratio": 0.5}, "give rank or ratio, not both"),
    ("prune", {"ratio": -0.1}, "option ratio: expected a number in [0, 0.9], found -0.1"),
    ("prune", {"ratio": 0.95}, "option ratio: expected a number in [0, 0.9], found 0.95"),
    ("prune", {"metric": "fluct"}, "option metric: expected one of 'auto', 'weight'"),
    ("shift", {"skip": 3}, "option skip: expected a tuple of module-name prefixes"),
])
def test_out_of_range_options(method, options, expected):
    model = small()
    with pytest.raises(CompressError) as exc:
        compress(model, method, **options)
    assert expected in str(exc.value)
    assert isinstance(model.body[0], nn.Linear)  # nothing changed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bitstack_cuda_refused_without_cuda():
    with pytest.raises(CompressError, match="'cuda' was requested but torch sees no CUDA"):
        compress(small(), "bitstack", device="cuda")


@pytest.mark.parametrize("method", ["prune", "shift", "lowrank", "bitstack"])
def test_no_supported_layers(method):
    model = Net(nn.Conv3d(2, 4, 3), nn.ReLU())
    with pytest.raises(CompressError) as exc:
        compress(model, method)
    msg = str(exc.value)
    assert "no supported layer" in msg and "body.0 (Conv3d)" in msg and "method 'none'" in msg


def test_none_accepts_any_model():
    model = Net(nn.Conv3d(2, 4, 3))
    assert compress(model, "none").layers == []


@pytest.mark.parametrize("method", ["prune", "shift", "lowrank", "bitstack"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_naming_the_layer(method, bad):
    model = small()
    with torch.no_grad():
        model.body[2].weight[1, 3] = bad
    with pytest.raises(CompressError) as exc:
        compress(model, method)
    assert "'body.2'" in str(exc.value) and "NaN/Inf" in str(exc.value)
    assert isinstance(model.body[0], nn.Linear)  # refused before anything changed


def test_unsupported_layers_warn_once_and_are_listed():
    model = Net(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    model.extra = nn.Conv3d(2, 2, 1)
    model.extra2 = nn.ConvTranspose2d(2, 2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compress(model, "shift")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1, msgs
    assert "extra (Conv3d)" in msgs[0] and "extra2 (ConvTranspose2d)" in msgs[0]
    assert report.warnings == msgs
    reasons = {s.name: s.reason for s in report.skipped}
    assert "unsupported layer type Conv3d" in reasons["extra"]
    assert isinstance(model.extra, nn.Conv3d)
    assert len(report.layers) == 2


def test_layers_inside_unsupported_modules_are_left_alone():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.mha(x, x, x)[0])

    model = Attn().eval()
    x = torch.randn(1, 5, 8)
    with pytest.warns(UserWarning, match="mha"):
        report = compress(model, "shift")
    reasons = {s.name: s.reason for s in report.skipped}
    assert "inside unsupported module 'mha'" in reasons["mha.out_proj"]
    assert [r.name for r in report.layers] == ["proj"]
    with torch.no_grad():
        model(x)  # MultiheadAttention still reads its own out_proj.weight


def test_everything_skipped_is_an_error():
    with pytest.raises(CompressError, match="all 2 supported layer"):
        compress(small(), "shift", skip=("body",))


@pytest.mark.parametrize("calib,expected", [
    ({"x": 1}, "wrap it in a list"),
    ([1, 2], "expected a list of input dicts"),
    ([], "is empty"),
])
def test_bad_calib(calib, expected):
    with pytest.raises(CompressError, match=expected):
        compress(small(), "shift", calib=calib)


def test_calib_that_breaks_the_model_is_reported():
    with pytest.raises(CompressError, match=r"calibration input #0 .*keys y"):
        compress(small(), "prune", calib=[{"y": torch.randn(2, 8)}])


def test_not_a_module():
    with pytest.raises(CompressError, match="expected a torch.nn.Module"):
        compress("model", "shift")


def test_method_options_defaults():
    assert method_options("shift") == {
        "bits": 4, "zero": False, "scale": "mse", "rounding": "auto", "bits_per_layer": None,
        "finetune_steps": 0, "finetune_lr": 1e-3, "max_seconds": None, "seed": 0,
        "sequential": False, "finetune_params": "all", "finetune_val": 0.1,
        "finetune_act_quant": False, "extra_texts": 0, "skip": (), "layers": None}
    assert method_options("prune")["ratio"] == 0.25
    assert method_options("bitstack")["n_blocks"] == 4
    assert method_options("lowrank")["rank"] is None


def test_padding_mode_other_than_zeros_is_left_dense():
    model = Net(nn.Conv2d(2, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                nn.Conv2d(8, 4, 1))
    report = compress(model, "bitstack", n_blocks=1)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "padding_mode 'reflect'" in reasons["body.0"]
    assert [r.name for r in report.layers] == ["body.2"]
    zoo_model, _ = zoo.conv1d_net()  # and a normal one goes through
    assert len(compress(zoo_model, "shift").layers) == 2
