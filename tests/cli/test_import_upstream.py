"""`edgestack export --from KIND` (and `pack`) on checkpoints laid out as upstream writes them:
DeepShift's training checkpoint (pickled scheduler, DataParallel around `features`),
DeepShift-Q at its default 5-bit weights, WeLore with a config-only `--base` folder, and a
BitStack folder with its importance files, packed in BitStack's own order."""

from __future__ import annotations

import json

import onnx
import torch
import transformers

import upstream_layouts as up
from edgestack import zoo
from edgestack.cli import main


def _export(capsys, *args: str) -> dict:
    code = main(["export", *args, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    assert doc["ok"] and doc["parity"]["passed"], doc["parity"]
    return doc


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node if n.domain == "edgestack"]


def test_deepshift_training_checkpoint(tmp_path, capsys):
    g = torch.Generator().manual_seed(50)
    trained = up.convert_to_shift(zoo.small_cnn()[0], g)
    trained.features = torch.nn.DataParallel(trained.features)  # imagenet.py, alexnet/vgg
    up.train_step_and_save(trained, tmp_path / "checkpoint.pth.tar", g)
    out = tmp_path / "ds.onnx"
    doc = _export(capsys, str(tmp_path / "checkpoint.pth.tar"), "--from", "deepshift",
                  "--base", "small-cnn", "--out", str(out))
    report = doc["import"]
    assert len(report["converted"]) == 6 and report["unwrapped"] == ["features.module."]
    assert "MultiStepLR object: not constructed" in report["skipped"]["lr_scheduler"]
    assert _ops(out) == ["ShiftWeight"] * 6


def test_deepshift_q_default_weight_bits(tmp_path, capsys):
    state = up.deepshift_q_weights(zoo.small_cnn()[0], torch.Generator().manual_seed(51))
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "weights.pth")
    out = tmp_path / "dsq.onnx"
    doc = _export(capsys, str(tmp_path / "weights.pth"), "--from", "deepshift", "--base",
                  "small-cnn", "--out", str(out))
    assert all("bits=5 (zero-free), widest exponent span 16" in v
               for v in doc["import"]["converted"].values())
    assert _ops(out) == ["ShiftWeight"] * 6


def test_welore_with_config_only_base(tmp_path, capsys):
    """model_checkpoint.pt of a rank-reduced LlamaForCausalLM (bf16), the base folder holding
    only its config.json."""
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=64,
        architectures=["LlamaForCausalLM"])
    torch.manual_seed(52)
    state = {k: v.to(torch.bfloat16)
             for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(52)
    for name, k in (("model.layers.0.self_attn.q_proj", 8), ("model.layers.1.mlp.up_proj", 6)):
        out_f, in_f = state.pop(name + ".weight").shape
        state[name + ".U.weight"] = (torch.randn(out_f, k, generator=g) * 0.2).bfloat16()
        state[name + ".V.weight"] = (torch.randn(k, in_f, generator=g) * 0.2).bfloat16()
    torch.save(state, tmp_path / "model_checkpoint.pt")
    cfg.save_pretrained(tmp_path / "base")
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["config.json"]
    doc = _export(capsys, str(tmp_path / "model_checkpoint.pt"), "--from", "welore", "--base",
                  str(tmp_path / "base"), "--seq", "8", "--out", str(tmp_path / "w.onnx"))
    report = doc["import"]
    assert sorted(report["converted"]) == ["model.layers.0.self_attn.q_proj",
                                           "model.layers.1.mlp.up_proj"]
    assert report["unused_keys"] == []  # the lm_head is part of the CausalLM base
    assert [o["name"] for o in doc["parity"]["outputs"]] == ["logits"]


def test_bitstack_folder_packs_in_upstream_order(tmp_path, capsys):
    _, _, expected = up.bitstack_llama_folder(tmp_path / "bitstack")
    out = tmp_path / "bs.onnx"
    doc = _export(capsys, str(tmp_path / "bitstack"), "--from", "bitstack", "--seq", "8",
                  "--out", str(out))
    assert doc["import"]["details"]["importance_order"]["blocks"] == len(expected)
    assert not doc["import"]["warnings"] and not doc["warnings"]
    code = main(["pack", str(out), "--out", str(tmp_path / "pkg"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0, result
    assert result["warnings"] == [] and result["order_source"] == "model"
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    torch_name = {n: info["graph"]["torch_layer"] for n, info in manifest["layers"].items()}
    seen: dict[str, int] = {}
    stored = []
    for name in manifest["order"]:  # the i-th time a layer is named is its block i
        stored.append((torch_name[name], seen.get(name, 0)))
        seen[name] = seen.get(name, 0) + 1
    assert stored == expected


def test_deepshift_q_with_a_zero_needs_clamp_on_the_cli(tmp_path, capsys):
    """16 exponents and an exact zero: no 5-bit code holds the layer; the refusal names
    `--clamp`, and `--clamp` imports it, reporting what changed."""
    state = up.deepshift_q_weights(zoo.small_cnn()[0], torch.Generator().manual_seed(52))
    state["head.2.weight"][0, 0] = 0.0
    torch.save(state, tmp_path / "weights.pth")
    args = [str(tmp_path / "weights.pth"), "--from", "deepshift", "--base", "small-cnn"]
    code = main(["export", *args, "--out", str(tmp_path / "no.onnx")])
    err = capsys.readouterr().err
    assert code != 0 and "--clamp" in err and "head.2" in err
    assert not (tmp_path / "no.onnx").exists()
    doc = _export(capsys, *args, "--clamp", "--out", str(tmp_path / "yes.onnx"))
    assert any("head.2" in w and "1 zero weight(s) become" in w
               for w in doc["import"]["warnings"]), doc["import"]["warnings"]
    assert _ops(tmp_path / "yes.onnx") == ["ShiftWeight"] * 6


def test_importer_flags_belong_to_their_importer(tmp_path, capsys):
    for flag in (["--clamp"], ["--importance", str(tmp_path)], ["--weight-bits", "5"]):
        code = main(["export", "small-cnn", *flag, "--out", str(tmp_path / "x.onnx")])
        err = capsys.readouterr().err
        assert code == 2 and flag[0] in err and "--from" in err, err
