"""Structured pruning of Llama-style decoders (grouped-query attention, gated MLP): whole
key/value groups and MLP channels go, FLAP bias compensation creates o_proj/down_proj
biases, save_pruned/load_pruned round-trip, ONNX export keeps parity."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from edgestack.compress import compress
from edgestack.compress.prune import find_structures
from edgestack.compress.pruned import load_pruned, save_pruned
from edgestack.exporter import export

SIZES = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(**SIZES, tie_word_embeddings=tie)
    cfg._attn_implementation, cfg.use_cache = "eager", False  # as load_hf_model loads
    return LlamaForCausalLM(cfg).eval()


def qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(**{**SIZES, "num_attention_heads": 8}, tie_word_embeddings=True)
    cfg._attn_implementation, cfg.use_cache = "eager", False  # as load_hf_model loads
    return Qwen2ForCausalLM(cfg).eval()


def calib(n: int = 4) -> list[dict]:
    return [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator()
                                        .manual_seed(i))} for i in range(n)]


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def zeroed_reference(model, removed: dict[str, list[int]], x) -> torch.Tensor:
    """The original model's logits with the listed input channels of each consumer zeroed."""

    def hook_for(cols):
        def hook(_mod, args):
            y = args[0].clone()
            y[..., cols] = 0
            return (y,)
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(cols))
               for name, cols in removed.items()]
    try:
        return logits(model, x)
    finally:
        for h in handles:
            h.remove()


def test_llama_structures_are_kv_groups_and_mlp_channels():
    structures, refused = find_structures(llama())
    by_name = {s.name: s for s in structures}
    attn = by_name["model.layers.0.self_attn"]
    assert (attn.unit, attn.n_units, attn.unit_size) == ("kv_group", 2, 32)  # 2 q heads x 16
    assert by_name["model.layers.0.mlp"].n_units == 96
    assert not refused


def test_llama_pruning_is_zeroing_whole_kv_groups_and_channels():
    """Without compensation the pruned Llama equals the original with the removed query
    heads' context columns (o_proj input) and MLP channels (down_proj input) zeroed."""
    model = llama()
    original = copy.deepcopy(model)
    wq = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    wk = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    report = compress(model, "prune", ratio=0.5, calib=calib(), bias_compensation=False)
    removed = {}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert attn.q_proj.out_features == 32 and attn.o_proj.in_features == 32
        assert attn.k_proj.out_features == attn.v_proj.out_features == 16
        assert attn.num_key_value_groups == 2 and attn.o_proj.bias is None
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == 48
        assert layer.mlp.down_proj.in_features == 48
        info = report.layer(f"model.layers.{i}.self_attn.q_proj").details["structures"]
        (group,) = info[f"model.layers.{i}.self_attn"]["removed"]
        assert info[f"model.layers.{i}.self_attn"]["query_heads"] == [4, 2]
        removed[f"model.layers.{i}.self_attn.o_proj"] = list(range(group * 32, group * 32 + 32))
        if i == 0:  # the kept rows are the other group's q heads and its k head
            kept = 1 - group
            assert torch.equal(attn.q_proj.weight, wq[kept * 32:(kept + 1) * 32])
            assert torch.equal(attn.k_proj.weight, wk[kept * 16:(kept + 1) * 16])
        mlp = report.layer(f"model.layers.{i}.mlp.up_proj").details["structures"]
        removed[f"model.layers.{i}.mlp.down_proj"] = mlp[f"model.layers.{i}.mlp"]["removed"]
    x = calib(1)[0]
    torch.testing.assert_close(logits(model, x), zeroed_reference(original, removed, x),
                               atol=1e-5, rtol=1e-5)


def test_llama_bias_compensation_creates_biases_and_lowers_error():
    data = calib()
    ref = llama()
    with_comp, without = copy.deepcopy(ref), copy.deepcopy(ref)
    compress(with_comp, "prune", ratio=0.5, calib=data, metric="fluctuation")
    compress(without, "prune", ratio=0.5, calib=data, metric="fluctuation",
             bias_compensation=False)
    for layer in with_comp.model.layers:
        assert layer.self_attn.o_proj.bias is not None
        assert layer.mlp.down_proj.bias is not None

    def err(m):
        return sum(float((logits(m, x) - logits(ref, x)).pow(2).sum()) for x in data)

    # measured: 0.89 of the uncompensated error (random weights: small means to restore)
    assert err(with_comp) < 0.95 * err(without), (err(with_comp), err(without))


@pytest.mark.parametrize("build", [llama, lambda: llama(tie=True), qwen2],
                         ids=["llama", "llama-tied", "qwen2-tied"])
def test_pruned_decoder_round_trips_and_exports_with_parity(build, tmp_path):
    model = build()
    heads = model.config.num_attention_heads
    compress(model, "prune", ratio=0.5, calib=calib(), adaptive=True)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == heads // 2 * attn.head_dim
    save_pruned(model, tmp_path / "pruned")
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg["edgestack_pruned"]["heads"]["model.layers.0.self_attn"] == heads // 2
    loaded = load_pruned(tmp_path / "pruned")
    assert type(loaded) is type(model)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = calib(1)[0]
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(model, x, tmp_path / "pruned.onnx")
    assert result.parity.passed and result.parity.max_rel <= 1e-4, result.parity.table()


def test_multi_query_attention_keeps_its_only_kv_head():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SIZES, "num_key_value_heads": 1})).eval()
    report = compress(model, "prune", ratio=0.5)
    assert model.model.layers[0].self_attn.q_proj.out_features == 64
    reasons = {s.name: s.reason for s in report.skipped}
    assert "removes no kv_group of 1" in reasons["model.layers.0.self_attn.q_proj"]
    assert model.model.layers[0].mlp.up_proj.out_features == 48


def test_cli_prunes_a_llama_folder_and_passes_parity(tmp_path, capsys):
    from edgestack.cli import main

    model = llama()
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(tmp_path / "llama")
    rc = main(["export", str(tmp_path / "llama"), "--method", "prune", "--ratio", "0.5",
               "--seq", "16", "--out", str(tmp_path / "m.onnx"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["parity"]["passed"]
    layers = {r["name"]: r for r in doc["compression"]["layers"]}
    assert layers["model.layers.0.self_attn.q_proj"]["details"]["out"] == [64, 32]
    assert layers["model.layers.1.mlp.down_proj"]["details"]["in"] == [96, 48]
    assert "no structure was pruned" not in " ".join(doc["warnings"])
