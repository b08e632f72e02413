"""Importers of upstream checkpoints: synthetic checkpoints written in each upstream layout.

Each test writes tensors exactly as the upstream code saves them (key names, shapes, dtypes,
packing), imports them, and compares with a reference built directly from those tensors
the way the upstream forward pass uses them.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

import upstream_layouts as up
from edgestack import zoo
from edgestack.compress.importers import IMPORTERS, load_checkpoint
from edgestack.compress.layers import CompressedLayer, LowRankLinear
from edgestack.compress.walk import get_module
from edgestack.errors import CheckpointError

# --- shared helpers ----------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _llama_config(**kw):
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=64, **kw,
    )
    cfg._attn_implementation = "eager"
    return cfg


def _llama(cfg=None, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaModel(cfg or _llama_config()).eval()


def _bert(seed: int = 0):
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _tokens(vocab: int = 100, seq: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (1, seq), generator=_gen(7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _out(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        res = model(**inputs)
    return res if isinstance(res, torch.Tensor) else res.last_hidden_state


def _hf_folder(tmp_path, cfg, state: dict[str, torch.Tensor], name="ckpt"):
    folder = tmp_path / name
    cfg.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# --- DeepShift ---------------------------------------------------------------------------


def _deepshift_ps(model: nn.Module, seed: int = 1, prefix: str = "module."):
    """A DeepShift-PS state dict (unrounded, as training saves it) and the upstream weights."""
    g = _gen(seed)
    state, weights = {}, {}
    for i, (name, mod) in enumerate(_layers(model)):
        lo, hi = (-2.4, -0.6) if i == 0 else (-10.0, -1.0)  # LinearShift.reset_parameters
        shift = torch.empty(mod.weight.shape).uniform_(lo, hi, generator=g)
        sign = torch.empty(mod.weight.shape).uniform_(-1.2, 1.2, generator=g)
        state[f"{prefix}{name}.shift"] = shift
        state[f"{prefix}{name}.sign"] = sign
        state[f"{prefix}{name}.bias"] = torch.randn(mod.weight.shape[0], generator=g) * 0.1
        # modules.py: weight_ps = 2**round(shift) * sign(round(sign))
        weights[name] = 2 ** shift.round() * sign.round().sign()
    return state, weights


def _with_weights(model: nn.Module, state: dict, weights: dict, prefix: str = "") -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in weights.items():
            mod = ref.get_submodule(name)
            mod.weight.copy_(w)
            if f"{prefix}{name}.bias" in state:
                mod.bias.copy_(state[f"{prefix}{name}.bias"])
    return ref


@pytest.mark.parametrize("form", ["training", "rounded"])
def test_deepshift_ps_decodes_exactly(tmp_path, form):
    model, inputs = zoo.small_cnn()
    state, weights = _deepshift_ps(model)
    if form == "training":  # checkpoint.pth.tar from DataParallel training
        path = tmp_path / "checkpoint.pth.tar"
        torch.save({"epoch": 3, "arch": "small_cnn", "state_dict": state,
                    "best_acc1": torch.tensor(51.0),
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}},
                   path)
    else:  # weights.pth after round_shift_weights
        state = {k: (v.round() if k.endswith(".shift") else
                     v.round().sign() if k.endswith(".sign") else v) for k, v in state.items()}
        path = tmp_path / "weights.pth"
        torch.save(state, path)
    ref = _with_weights(model, state, weights, "module.")
    imported, report = load_checkpoint("deepshift", path, base=zoo.small_cnn()[0])

    assert report.stripped_prefix == "module."
    assert sorted(report.converted) == sorted(weights)
    for name, w in weights.items():
        layer = get_module(imported, name)
        assert isinstance(layer, CompressedLayer)
        assert layer.weight_module.zero
        assert torch.equal(layer.weight_module(), w), name  # bit-exact decode
    assert get_module(imported, "features.0").weight_module.bits == 3  # 2 exponents
    assert get_module(imported, "head.2").weight_module.bits == 5  # up to 10 exponents
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs))
    json.dumps(report.to_dict())


def test_deepshift_weight_bits_reproduces_the_forward_clamp():
    model, _ = zoo.small_cnn()
    state, _ = _deepshift_ps(model, prefix="")
    state["head.2.shift"][0, :4] = torch.tensor([0.7, 1.6, -20.2, -0.2])
    imported, report = load_checkpoint("deepshift", state, base=model, weight_bits=5)
    shift = state["head.2.shift"].clamp(-14, 0)  # LinearShift.shift_range for weight_bits=5
    expected = 2 ** shift.round() * state["head.2.sign"].round().sign()
    assert torch.equal(imported.head[2].weight_module(), expected)
    _, report = load_checkpoint("deepshift", state, base=zoo.small_cnn()[0], clamp=True)
    assert any("above 0" in w for w in report.warnings)


def test_deepshift_q_and_dense_layers(tmp_path):
    model, inputs = zoo.small_cnn()
    g = _gen(3)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    weights = {}
    for name in ("features.0", "head.2"):  # utils.round_power_of_2, zeros kept
        w = state[f"{name}.weight"]
        w[..., 0] = 0
        weights[name] = torch.sign(w) * 2.0 ** torch.round(torch.log2(w.abs()))
        state[f"{name}.weight"] = weights[name]
    save_file(state, str(tmp_path / "weights.safetensors"))
    imported, report = load_checkpoint("deepshift", tmp_path / "weights.safetensors",
                                       base=zoo.small_cnn()[0])
    assert sorted(report.converted) == ["features.0", "head.2"]
    assert "DeepShift-Q" in report.converted["head.2"]
    assert "features.2" in report.dense and "powers of two" in report.dense["features.2"]
    for name, w in weights.items():
        assert torch.equal(get_module(imported, name).weight_module(), w)
    ref = copy.deepcopy(model)
    ref.load_state_dict(state)
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs))


def test_deepshift_exponent_range_too_wide():
    model, _ = zoo.small_cnn()
    state, _ = _deepshift_ps(model, prefix="")
    state["head.0.shift"][5, 0], state["head.0.shift"][5, 1] = 0.0, -20.0
    state["head.0.sign"][5, :2] = 1.0
    with pytest.raises(CheckpointError, match=r"layer 'head.0'.*span 21 powers of two.*"
                                              r"channel 5.*clamp=True"):
        load_checkpoint("deepshift", state, base=model)
    imported, report = load_checkpoint("deepshift", state, base=zoo.small_cnn()[0], clamp=True)
    w = imported.head[0].weight_module()
    assert w[5, 1] == 2.0**-14 and w[5, 0] == 1.0
    change = f"largest change {2.0**-14 - 2.0**-20:.3g}"  # 2^-20 rose to 2^-14
    assert any("clamped (clamp=True): 1 weight(s)" in x and change in x
               for x in report.warnings), report.warnings


def _ps_reference(trained: nn.Module, base: nn.Module) -> nn.Module:
    """``base`` holding the weights DeepShift-PS computes with (modules.py forward)."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, mod in trained.named_modules():
            if isinstance(mod, up.LinearShift):
                name = name.replace("module.", "")  # the DataParallel wrapper
                layer = ref.get_submodule(name)
                layer.weight.copy_(2 ** mod.shift.round() * mod.sign.round().sign())
                layer.bias.copy_(mod.bias)
    return ref


@pytest.mark.parametrize("legacy", [False, True])
def test_deepshift_training_checkpoint_with_scheduler(tmp_path, legacy):
    """checkpoint.pth.tar as cifar10.py writes it, features in DataParallel (imagenet.py
    for alexnet/vgg); legacy: the pre-1.6 non-zip torch.save format."""
    g = _gen(40)
    trained = up.convert_to_shift(zoo.small_cnn()[0], g)
    trained.features = nn.DataParallel(trained.features)
    path = tmp_path / "checkpoint.pth.tar"
    if legacy:
        save = torch.save
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "save", lambda obj, f: save(
                obj, f, _use_new_zipfile_serialization=False))
            up.train_step_and_save(trained, path, g)
    else:
        up.train_step_and_save(trained, path, g)
    assert "features.module.0.shift" in torch.load(path, weights_only=False)["state_dict"]

    base, inputs = zoo.small_cnn()
    ref = _ps_reference(trained, base)
    imported, report = load_checkpoint("deepshift", path, base=zoo.small_cnn()[0])
    assert report.unwrapped == ["features.module."] and report.stripped_prefix == ""
    assert len(report.converted) == 6
    assert "MultiStepLR object: not constructed" in report.skipped["lr_scheduler"]
    assert "numpy array" in report.skipped["best_acc1"]
    assert report.skipped["optimizer"].startswith("optimizer state_dict")
    assert report.skipped["epoch"] == "int 1: training metadata"
    assert any("without running pickled code" in w for w in report.warnings)
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs))


def test_deepshift_pickled_model_file(tmp_path):
    """model.pth: ``torch.save(model_rounded)`` of the whole DataParallel-wrapped model."""
    g = _gen(41)
    trained = up.convert_to_shift(up.SmallCNN(zoo.small_cnn()[0]), g)
    trained.features = nn.DataParallel(trained.features)
    with torch.no_grad():  # convert.py round_shift_weights
        for mod in trained.modules():
            if isinstance(mod, up.LinearShift):
                mod.shift.copy_(mod.shift.round())
                mod.sign.copy_(mod.sign.round().sign())
                mod.bias.copy_(up.round_to_fixed(mod.bias))
    torch.save(trained, tmp_path / "model.pth")
    base, inputs = zoo.small_cnn()
    ref = _ps_reference(trained, base)
    imported, report = load_checkpoint("deepshift", tmp_path / "model.pth",
                                       base=zoo.small_cnn()[0])
    assert "SmallCNN module: its 18 parameters" in report.skipped["<model>"]
    assert report.unwrapped == ["features.module."]
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs))


def test_deepshift_q_default_weight_bits_is_exact(tmp_path):
    """DeepShift-Q at weight_bits=5: 16 exponents (2^0 .. 2^-15) per channel, no zero."""
    base, inputs = zoo.small_cnn()
    state = up.deepshift_q_weights(base, _gen(42))
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "weights.pth")
    ref = copy.deepcopy(base)
    ref.load_state_dict(state)
    imported, report = load_checkpoint("deepshift", tmp_path / "weights.pth",
                                       base=zoo.small_cnn()[0])
    assert len(report.converted) == 6
    head = report.converted["head.0"]
    assert "DeepShift-Q" in head and "bits=5 (zero-free), widest exponent span 16" in head
    for name in report.converted:
        codes = get_module(imported, name).weight_module
        assert codes.bits == 5 and not codes.zero
        assert torch.equal(codes(), state[name + ".weight"]), name  # bit-exact
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs))

    # an exact zero in a layer that spans 16 exponents: 5-bit codes with zero hold 15
    state["head.0.weight"][3, 7] = 0.0
    with pytest.raises(CheckpointError, match=r"layer 'head.0'.*span 16 powers of two.*holds "
                                              r"1 zero weight.*hold 15 magnitudes.*16 without "
                                              r"a zero.*clamp=True.*with 1 weight\(s\) changed: 1 "
                                              r"zero weight\(s\) become \+2\^\(largest-15\)"):
        load_checkpoint("deepshift", state, base=zoo.small_cnn()[0])
    imported, report = load_checkpoint("deepshift", state, base=zoo.small_cnn()[0], clamp=True)
    w, q = state["head.0.weight"], imported.head[0].weight_module()
    assert not imported.head[0].weight_module.zero
    assert q[3, 7] == w[3].abs().max() * 2.0**-15  # the zero became the smallest level
    changed = q != w
    assert int(changed.sum()) == 1 and changed[3, 7]
    assert any("clamped (clamp=True): 1 zero weight(s)" in x and "largest change" in x
               for x in report.warnings), report.warnings
    # many zeros: raising the 2^(largest-15) weights instead changes fewer weights
    state["head.0.weight"][:, :40] = 0.0
    imported, report = load_checkpoint("deepshift", state, base=zoo.small_cnn()[0], clamp=True)
    q = imported.head[0].weight_module()
    low = (w != 0) & (w.abs() < w.abs().amax(dim=1, keepdim=True) * 2.0**-14)
    assert imported.head[0].weight_module.zero
    assert torch.equal(q[~low], w[~low]) and torch.equal(q[low], 2 * w[low])
    assert any(f"clamped (clamp=True): {int(low.sum())} weight(s) more than 14" in x
               for x in report.warnings), report.warnings


def test_deepshift_sign_without_shift():
    model, _ = zoo.small_cnn()
    state, _ = _deepshift_ps(model, prefix="")
    del state["features.2.shift"]
    with pytest.raises(CheckpointError, match=r"has features\.2\.sign but no features\.2\.shift"):
        load_checkpoint("deepshift", state, base=model)


def test_deepshift_shape_mismatch_names_the_layer():
    model, _ = zoo.small_cnn()
    state, _ = _deepshift_ps(model, prefix="")
    state["head.2.shift"] = state["head.2.shift"][:, :50]
    with pytest.raises(CheckpointError, match=r"layer 'head.2'.*\[10, 50\], expected \[10, 72\]"):
        load_checkpoint("deepshift", state, base=model)


# --- WeLore ------------------------------------------------------------------------------


def _factor(state, key_prefix, out, n, k, g, dtype):
    u = (torch.randn(out, k, generator=g) * 0.2).to(dtype)
    v = (torch.randn(k, n, generator=g) * 0.2).to(dtype)
    state[f"{key_prefix}.U.weight"], state[f"{key_prefix}.V.weight"] = u, v
    return u.float() @ v.float()  # LowRankLayer.forward: U(V(x))


def test_welore_llama_checkpoint(tmp_path):
    dense = _llama()
    g = _gen(11)
    # do_rank_reduction on a bf16 LlamaForCausalLM, then torch.save(model.state_dict())
    state = {"model." + k: v.to(torch.bfloat16) for k, v in dense.state_dict().items()}
    state["lm_head.weight"] = torch.randn(100, 64, generator=g).to(torch.bfloat16)
    factored = {
        "layers.0.self_attn.q_proj": 8, "layers.0.self_attn.o_proj": 12,
        "layers.0.mlp.down_proj": 16, "layers.1.mlp.gate_proj": 5, "layers.1.self_attn.v_proj": 3,
    }
    weights = {}
    for name, k in factored.items():
        out, n = dense.get_submodule(name).weight.shape
        del state[f"model.{name}.weight"]
        weights[name] = _factor(state, f"model.{name}", out, n, k, g, torch.bfloat16)
    torch.save(state, tmp_path / "model_checkpoint.pt")

    ref = _llama(seed=5)
    ref.load_state_dict({k[6:]: v.float() for k, v in state.items()
                         if k.startswith("model.") and ".U." not in k and ".V." not in k},
                        strict=False)
    with torch.no_grad():
        for name, w in weights.items():
            ref.get_submodule(name).weight.copy_(w)
    imported, report = load_checkpoint("welore", tmp_path / "model_checkpoint.pt",
                                       base=_llama(seed=9))
    assert report.stripped_prefix == "model."
    assert report.unused_keys == ["lm_head.weight"]
    assert sorted(report.converted) == sorted(factored)
    assert "layers.0.self_attn.k_proj" in report.dense
    for name, k in factored.items():
        layer = get_module(imported, name)
        assert isinstance(layer, LowRankLinear) and layer.v.out_features == k
    inputs = _tokens()
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs), rtol=1e-4, atol=1e-5)


def test_welore_bert_keeps_biases():
    dense = _bert()
    g = _gen(12)
    state = {"bert." + k: v.clone() for k, v in dense.state_dict().items()}
    state["cls.predictions.bias"] = torch.zeros(100)
    weights = {}
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.1.intermediate.dense"):
        out, n = dense.get_submodule(name).weight.shape
        del state[f"bert.{name}.weight"]
        weights[name] = _factor(state, f"bert.{name}", out, n, 6, g, torch.float32)
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name, w in weights.items():
            ref.get_submodule(name).weight.copy_(w)
    imported, report = load_checkpoint("welore", state, base=_bert(seed=3))
    assert report.stripped_prefix == "bert."
    layer = get_module(imported, "encoder.layer.1.intermediate.dense")
    assert isinstance(layer, LowRankLinear) and layer.u.bias is not None
    inputs = _tokens()
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs), rtol=1e-4, atol=1e-5)


def test_welore_u_without_v_and_bad_shape():
    dense = _llama()
    state = dict(dense.state_dict())
    w = state.pop("layers.0.mlp.up_proj.weight")
    state["layers.0.mlp.up_proj.U.weight"] = torch.randn(128, 4)
    with pytest.raises(CheckpointError, match=r"has layers\.0\.mlp\.up_proj\.U\.weight but no "
                                              r"layers\.0\.mlp\.up_proj\.V\.weight"):
        load_checkpoint("welore", state, base=dense)
    state["layers.0.mlp.up_proj.U.weight"] = torch.randn(120, 4)
    state["layers.0.mlp.up_proj.V.weight"] = torch.randn(4, w.shape[1])
    with pytest.raises(CheckpointError, match=r"layer 'layers.0.mlp.up_proj'.*\[120, 4\], "
                                              r"expected \[128, 4\]"):
        load_checkpoint("welore", state, base=dense)


# --- FLAP --------------------------------------------------------------------------------


def _rows(heads: list[int], hd: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])


def test_flap_llama_folder(tmp_path):
    cfg = _llama_config()
    dense = _llama(cfg)
    g = _gen(21)
    full = {k: v.half() for k, v in dense.state_dict().items()}  # FLAP loads fp16
    keep_heads = {0: [0, 2], 1: [1, 2, 3]}
    keep_mlp = {0: torch.randperm(128, generator=g)[:80].sort().values,
                1: torch.randperm(128, generator=g)[:100].sort().values}
    state = {"model." + k: v.clone() for k, v in full.items()}
    state["lm_head.weight"] = torch.randn(100, 64, generator=g).half()
    bias = {}
    for i in (0, 1):
        p, rows = f"model.layers.{i}.", _rows(keep_heads[i], 16)
        for proj in ("q_proj", "k_proj", "v_proj"):
            w = full[f"layers.{i}.self_attn.{proj}.weight"]
            state[p + f"self_attn.{proj}.weight"] = w[rows]
        state[p + "self_attn.o_proj.weight"] = full[f"layers.{i}.self_attn.o_proj.weight"][:, rows]
        for proj in ("gate_proj", "up_proj"):
            state[p + f"mlp.{proj}.weight"] = full[f"layers.{i}.mlp.{proj}.weight"][keep_mlp[i]]
        state[p + "mlp.down_proj.weight"] = full[f"layers.{i}.mlp.down_proj.weight"][:, keep_mlp[i]]
        for proj in ("self_attn.o_proj", "mlp.down_proj"):  # bias compensation
            bias[f"layers.{i}.{proj}"] = (torch.randn(64, generator=g) * 0.1).half()
            state[p + proj + ".bias"] = bias[f"layers.{i}.{proj}"]
    folder = _hf_folder(tmp_path, cfg, state)  # config.json is the unpruned one

    # Reference: the unpruned model with pruned heads/neurons zeroed and the biases added.
    ref = _llama(_llama_config(attention_bias=True, mlp_bias=True), seed=4)
    sd = {k: v.float() for k, v in full.items()}
    for k, v in ref.state_dict().items():
        if k.endswith(".bias"):
            sd[k] = torch.zeros_like(v)
    for i in (0, 1):
        drop = torch.ones(64, dtype=torch.bool)
        drop[_rows(keep_heads[i], 16)] = False
        for proj in ("q_proj", "k_proj", "v_proj"):
            sd[f"layers.{i}.self_attn.{proj}.weight"][drop] = 0
        drop = torch.ones(128, dtype=torch.bool)
        drop[keep_mlp[i]] = False
        sd[f"layers.{i}.mlp.gate_proj.weight"][drop] = 0
        for name, b in bias.items():
            sd[name + ".bias"] = b.float()
    ref.load_state_dict(sd)

    imported, report = load_checkpoint("flap", folder)
    attn = imported.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.o_proj.weight.shape == (64, 32)
    assert attn.o_proj.bias is not None and attn.q_proj.bias is None
    assert imported.layers[1].mlp.down_proj.weight.shape == (64, 100)
    assert imported.layers[1].self_attn.k_proj.weight.shape == (48, 64)
    assert "bias added" in report.converted["layers.0.mlp.down_proj"]
    assert report.converted["layers.1.self_attn"] == "attention heads 4 -> 3"
    assert report.unused_keys == ["lm_head.weight"]
    inputs = _tokens()
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs), rtol=1e-4, atol=1e-5)


def test_flap_gpt2_shaped(tmp_path):
    model, inputs = zoo.gpt2_tiny(seq=10)
    g = _gen(22)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"transformer." + k: v.clone() for k, v in full.items()}  # GPT2LMHeadModel keys
    keep = _rows([1, 3], 32)
    qkv = torch.cat([keep, keep + 128, keep + 256])
    p = "transformer.h.0."
    state[p + "attn.c_attn.weight"] = full["h.0.attn.c_attn.weight"][:, qkv]  # Conv1D [in, out]
    state[p + "attn.c_attn.bias"] = full["h.0.attn.c_attn.bias"][qkv]
    state[p + "attn.c_proj.weight"] = full["h.0.attn.c_proj.weight"][keep]
    state[p + "attn.c_proj.bias"] = torch.randn(128, generator=g) * 0.1
    neurons = torch.randperm(512, generator=g)[:300].sort().values
    state[p + "mlp.c_fc.weight"] = full["h.0.mlp.c_fc.weight"][:, neurons]
    state[p + "mlp.c_fc.bias"] = full["h.0.mlp.c_fc.bias"][neurons]
    state[p + "mlp.c_proj.weight"] = full["h.0.mlp.c_proj.weight"][neurons]
    state[p + "mlp.c_proj.bias"] = torch.randn(128, generator=g) * 0.1
    save_file(state, str(tmp_path / "model.safetensors"))

    ref = copy.deepcopy(model)
    with torch.no_grad():
        drop = torch.ones(384, dtype=torch.bool)
        drop[qkv] = False
        ref.h[0].attn.c_attn.weight[:, drop] = 0
        ref.h[0].attn.c_attn.bias[drop] = 0
        ref.h[0].attn.c_proj.bias.copy_(state[p + "attn.c_proj.bias"])
        drop = torch.ones(512, dtype=torch.bool)
        drop[neurons] = False
        ref.h[0].mlp.c_fc.weight[:, drop] = 0
        ref.h[0].mlp.c_fc.bias[drop] = 0
        ref.h[0].mlp.c_proj.bias.copy_(state[p + "mlp.c_proj.bias"])
    imported, report = load_checkpoint("flap", tmp_path / "model.safetensors",
                                       base=zoo.gpt2_tiny()[0])
    assert report.stripped_prefix == "transformer."
    assert imported.h[0].attn.num_heads == 2 and imported.h[0].attn.split_size == 64
    assert imported.h[1].attn.num_heads == 4
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs), rtol=1e-4, atol=1e-5)


def test_flap_bert_shaped():
    dense = _bert()
    g = _gen(23)
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    p = "encoder.layer.1."
    rows = _rows([0, 3], 16)
    for proj in ("query", "key", "value"):
        for leaf in ("weight", "bias"):
            key = p + f"attention.self.{proj}.{leaf}"
            state[key] = state[key][rows]
    state[p + "attention.output.dense.weight"] = state[p + "attention.output.dense.weight"][:, rows]
    state[p + "attention.output.dense.bias"] = torch.randn(64, generator=g) * 0.1
    ref = copy.deepcopy(dense)
    attn = ref.encoder.layer[1].attention
    with torch.no_grad():
        drop = torch.ones(64, dtype=torch.bool)
        drop[rows] = False
        for proj in (attn.self.query, attn.self.key, attn.self.value):
            proj.weight[drop] = 0
            proj.bias[drop] = 0
        attn.output.dense.bias.copy_(state[p + "attention.output.dense.bias"])
    imported, report = load_checkpoint("flap", state, base=_bert(seed=2))
    assert imported.encoder.layer[1].attention.self.num_attention_heads == 2
    assert imported.encoder.layer[1].attention.self.all_head_size == 32
    inputs = _tokens()
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs), rtol=1e-4, atol=1e-5)


def test_flap_inconsistent_heads(tmp_path):
    cfg = _llama_config()
    state = dict(_llama(cfg).state_dict())
    state["layers.0.self_attn.q_proj.weight"] = state["layers.0.self_attn.q_proj.weight"][:30]
    with pytest.raises(CheckpointError, match=r"attention 'layers.0.self_attn'.*q=30.*head_dim=16"):
        load_checkpoint("flap", _hf_folder(tmp_path, cfg, state))


# --- BitStack ----------------------------------------------------------------------------


def test_bitstack_llama_folder(tmp_path):
    cfg = _llama_config()
    dense = _llama(cfg)
    g = _gen(31)
    state = {"model." + k: v.half() for k, v in dense.state_dict().items()}
    state["lm_head.weight"] = torch.randn(100, 64, generator=g).half()
    weights = {}
    for name, mod in dense.named_modules():
        if isinstance(mod, nn.Linear):
            del state[f"model.{name}.weight"]
            n = 3 if name.startswith("layers.0") else 2  # compression_config: bits per layer
            weights[name] = up.bitstack_layer(state, f"model.{name}", tuple(mod.weight.shape),
                                            n, 4, g)
    folder = _hf_folder(tmp_path, cfg, state)
    ref = _llama(cfg, seed=6)
    ref.load_state_dict({k[6:]: v.float() for k, v in state.items()
                         if k.startswith("model.") and k[6:] in ref.state_dict()}, strict=False)
    with torch.no_grad():
        for name, w in weights.items():
            ref.get_submodule(name).weight.copy_(w)

    imported, report = load_checkpoint("bitstack", folder)
    assert sorted(report.converted) == sorted(weights)
    q = get_module(imported, "layers.0.self_attn.q_proj")
    assert isinstance(q, CompressedLayer) and q.weight_module.n_blocks == 3
    assert get_module(imported, "layers.1.mlp.up_proj").weight_module.n_blocks == 2
    for name, w in weights.items():
        torch.testing.assert_close(get_module(imported, name).weight_module(), w,
                                   rtol=1e-5, atol=1e-6)
    inputs = _tokens()
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs), rtol=1e-4, atol=1e-4)


def test_bitstack_odd_sizes_bias_and_no_avd():
    model, inputs = zoo.conv1d_net()  # conv [19, 5, 3]: 285 sign bits, padded
    g = _gen(32)
    state = dict(model.state_dict())
    del state["net.0.weight"]
    w = up.bitstack_layer(state, "net.0", (19, 15), 2, 3, g).reshape(19, 5, 3)
    state["net.0.bias_0"] = torch.zeros(19, dtype=torch.float16)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.net[0].weight.copy_(w)
    imported, report = load_checkpoint("bitstack", state, base=zoo.conv1d_net()[0])
    assert imported.net[0].bias is not None  # <layer>.bias is kept
    assert any("bias_i" in x for x in report.warnings)
    torch.testing.assert_close(_out(imported, inputs), _out(ref, inputs), rtol=1e-4, atol=1e-5)

    dense = _llama()
    state = dict(dense.state_dict())
    del state["layers.0.mlp.up_proj.weight"]
    u = [(torch.randn(128, 2, generator=g) * 0.2).half() for _ in range(2)]
    vt = [(torch.randn(2, 64, generator=g) * 0.2).half() for _ in range(2)]
    for i in range(2):
        state[f"layers.0.mlp.up_proj.u_{i}"], state[f"layers.0.mlp.up_proj.vt_{i}"] = u[i], vt[i]
    imported, report = load_checkpoint("bitstack", state, base=_llama(seed=1))
    layer = imported.layers[0].mlp.up_proj
    assert isinstance(layer, LowRankLinear) and layer.v.out_features == 4
    expected = sum(a.float() @ b.float() for a, b in zip(u, vt, strict=True))
    torch.testing.assert_close(layer.u.weight @ layer.v.weight, expected)


def test_bitstack_missing_companion_and_scales():
    dense = _llama()
    g = _gen(33)
    state = dict(dense.state_dict())
    del state["layers.1.self_attn.o_proj.weight"]
    up.bitstack_layer(state, "layers.1.self_attn.o_proj", (64, 64), 2, 2, g)
    broken = dict(state)
    del broken["layers.1.self_attn.o_proj.u_1"]
    with pytest.raises(CheckpointError, match=r"has layers\.1\.self_attn\.o_proj\.qweight_1 but "
                                              r"no layers\.1\.self_attn\.o_proj\.u_1"):
        load_checkpoint("bitstack", broken, base=dense)
    scaled = dict(state)
    scaled["layers.0.input_layernorm.scales"] = torch.ones(64)
    with pytest.raises(CheckpointError, match=r"activation-aware scales.*--no_fuse_scale"):
        load_checkpoint("bitstack", scaled, base=dense)


# --- common errors -----------------------------------------------------------------------


class _Opaque:  # a pickled Python object that weights_only loading refuses
    pass


class _Runs:
    """Unpickling it would run a command (``subprocess.call`` or ``os.system``) that creates
    ``marker``."""

    def __init__(self, how: str, marker):
        self.how, self.marker = how, marker

    def __reduce__(self):
        import os
        import subprocess

        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        return subprocess.call, (["touch", str(self.marker)],)


def test_pickled_objects_are_skipped_without_running(tmp_path):
    """A training checkpoint with pickled objects is read; none of their code runs."""
    model, _ = zoo.small_cnn()
    state, weights = _deepshift_ps(model, prefix="")
    marker = tmp_path / "ran"
    torch.save({"state_dict": state, "hook": _Runs("call", marker), "note": _Opaque()},
               tmp_path / "ckpt.pt")
    imported, report = load_checkpoint("deepshift", tmp_path / "ckpt.pt", base=model)
    assert not marker.exists()
    # (pickle protocol 2 names subprocess.call by its Python 2 module, commands)
    assert ".call object: not constructed" in report.skipped["hook"]
    assert "_Opaque object: not constructed" in report.skipped["note"]
    assert any("without running pickled code" in w and "'hook', 'note'" in w
               for w in report.warnings), report.warnings
    assert torch.equal(imported.head[2].weight_module(), weights["head.2"])


def test_checkpoint_path_errors(tmp_path):
    base = zoo.small_cnn()[0]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint("deepshift", tmp_path / "missing.pt", base=base)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x01")
    with pytest.raises(CheckpointError, match="unsupported checkpoint file type '.onnx'"):
        load_checkpoint("deepshift", tmp_path / "model.onnx", base=base)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read .* as safetensors"):
        load_checkpoint("deepshift", tmp_path / "bad.safetensors", base=base)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read .* as a torch checkpoint"):
        load_checkpoint("deepshift", tmp_path / "bad.pt", base=base)
    torch.save(_Opaque(), tmp_path / "obj.pt")  # nothing but a pickled object
    with pytest.raises(CheckpointError, match=r"obj.pt.*expected a state dict.*found a "
                                              r"pickled .*_Opaque object"):
        load_checkpoint("deepshift", tmp_path / "obj.pt", base=base)
    torch.save({"state_dict": {}, "x": _Runs("system", tmp_path / "pwned")}, tmp_path / "os.pt")
    with pytest.raises(CheckpointError, match=r"cannot read .*os.pt.*GLOBAL posix.system whose "
                                              r"module posix is blocked"):
        load_checkpoint("deepshift", tmp_path / "os.pt", base=base)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no weight file"):
        load_checkpoint("flap", tmp_path / "empty")


def test_missing_config_and_unknown_kind_or_option(tmp_path):
    state = zoo.small_cnn()[0].state_dict()
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="base is None and there is no config.json"):
        load_checkpoint("flap", tmp_path / "w.pt")
    folder = tmp_path / "noconfig"
    folder.mkdir()
    save_file(dict(state), str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint("bitstack", folder)
    with pytest.raises(CheckpointError, match="unknown checkpoint kind 'gptq'.*deepshift"):
        load_checkpoint("gptq", state, base=zoo.small_cnn()[0])
    with pytest.raises(CheckpointError, match="unknown option.*bits.*weight_bits"):
        load_checkpoint("deepshift", state, base=zoo.small_cnn()[0], bits=4)
    assert IMPORTERS == ("deepshift", "welore", "flap", "bitstack")


def test_no_matching_layer_lists_keys():
    state = _llama().state_dict()
    with pytest.raises(CheckpointError, match=r"no tensor in the checkpoint matches.*"
                                              r"'embed_tokens.weight'.*'features.0.bias'"):
        load_checkpoint("deepshift", state, base=zoo.small_cnn()[0])


def test_dense_tensor_shape_and_missing_tensors():
    model, _ = zoo.small_cnn()
    state, _ = _deepshift_ps(model, prefix="")
    del state["head.0.shift"], state["head.0.sign"]
    state["head.0.weight"] = torch.randn(72, 50)
    state["head.0.bias"] = torch.randn(72)
    with pytest.raises(CheckpointError, match=r"layer 'head.0'.*\[72, 50\], expected \[72, 56\]"):
        load_checkpoint("deepshift", state, base=model)
    del state["head.0.weight"]
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*'head.0.weight'.*strict=False"):
        load_checkpoint("deepshift", state, base=zoo.small_cnn()[0])
    _, report = load_checkpoint("deepshift", state, base=zoo.small_cnn()[0], strict=False)
    assert any("kept the model's own values" in w for w in report.warnings)


@pytest.mark.parametrize("files", [("compression_config.json", "reduced_ppl_average.json"),
                                   ("reduced_ppl_average.json",), ("compression_config.json",)])
def test_bitstack_importance_files_give_the_block_order(tmp_path, files):
    """BitStack's own importance (its perplexity ranking, its memory-ordered configs) becomes
    the imported model's block order; the LlamaForCausalLM keeps its lm_head."""
    folder = tmp_path / "bitstack"
    cfg, weights, expected = up.bitstack_llama_folder(folder, files=files)
    imported, report = load_checkpoint("bitstack", folder)
    assert isinstance(imported, transformers.LlamaForCausalLM)
    assert report.unused_keys == [] and not report.warnings, report.warnings
    assert imported.edgestack_bitstack_order == expected
    assert report.details["importance_order"]["source"].endswith(files[0])
    assert sorted(report.converted) == sorted(weights)
    # a NaN layer goes last in its level, as sort_layers_and_bits_average puts it
    level1 = [n for n, b in expected if b == 1]
    assert level1[-1] == "model.layers.0.self_attn.o_proj"  # the 4th layer had NaN
    for name, w in weights.items():
        torch.testing.assert_close(get_module(imported, name).weight_module(), w,
                                   rtol=1e-5, atol=1e-6)


def test_bitstack_importance_file_errors(tmp_path):
    folder = tmp_path / "bitstack"
    up.bitstack_llama_folder(folder, files=("compression_config.json",))
    (folder / "compression_config.json").unlink()
    _, report = load_checkpoint("bitstack", folder)  # no files: a warning says what follows
    assert not hasattr(_, "edgestack_bitstack_order")
    assert any("no compression_config.json or reduced_ppl_average.json" in w
               for w in report.warnings)
    configs = [{"memory": 10, "layers": {"layer.0.self_attn.q_proj": 1}},
               {"memory": 20, "layers": {"layer.0.self_attn.q_proj": 3}}]
    (folder / "compression_config.json").write_text(json.dumps(configs))
    with pytest.raises(CheckpointError, match=r"compression_config.json.*config #1.*one layer "
                                              r"with one block more"):
        load_checkpoint("bitstack", folder)
    configs[1]["layers"]["layer.0.self_attn.q_proj"] = 2
    (folder / "compression_config.json").write_text(json.dumps(configs))
    with pytest.raises(CheckpointError, match=r"does not cover 40 block\(s\) the checkpoint "
                                              r"holds, e.g. \[\('model.layers.0.mlp.down_proj', "
                                              r"0\)"):
        load_checkpoint("bitstack", folder)
    configs = [{"memory": 10, "layers": {"layer.7.mlp.up_proj": 1}}]
    (folder / "compression_config.json").write_text(json.dumps(configs))
    with pytest.raises(CheckpointError, match=r"'layer.7.mlp.up_proj' names no BitStack layer"):
        load_checkpoint("bitstack", folder)
    (folder / "compression_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot read BitStack importance file"):
        load_checkpoint("bitstack", folder)
