"""Task heads: a Hugging Face folder exports with its head (issue 13's tasks), detected from
the class it was saved as, and example inputs follow the model's positions."""

from __future__ import annotations

import json

import onnx
import pytest

from edgestack.cli import main


def _save(tmp_path, cls_name: str, config_name: str, **cfg):
    import transformers

    config = getattr(transformers, config_name)(**cfg)
    model = getattr(transformers, cls_name)(config)
    folder = tmp_path / cls_name
    model.save_pretrained(folder)
    return folder


BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=37, max_position_embeddings=64)


@pytest.mark.parametrize("cls_name,config_name,cfg,logits", [
    ("BertForSequenceClassification", "BertConfig", {**BERT, "num_labels": 3}, [1, 3]),
    ("BertForTokenClassification", "BertConfig", {**BERT, "num_labels": 5}, [1, 64, 5]),
    ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=2,
                                           n_positions=64), [1, 64, 99]),
])
def test_head_is_exported_and_matches_torch(tmp_path, capsys, cls_name, config_name, cfg,
                                            logits):
    folder = _save(tmp_path, cls_name, config_name, **cfg)
    out = tmp_path / "m.onnx"
    # no --seq: the example inputs take the model's 64 positions (the default 128 would fail)
    assert main(["export", str(folder), "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    names = [o["name"] for o in doc["parity"]["outputs"]]
    assert names[0] == "logits", names
    assert doc["parity"]["passed"] and all(o["max_rel"] <= 1e-4
                                           for o in doc["parity"]["outputs"])
    graph = onnx.load(str(out)).graph
    shape = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert graph.output[0].name == "logits" and shape == logits


def test_task_option_and_detection(tmp_path, capsys):
    from edgestack.compress.hf import detect_task

    folder = _save(tmp_path, "BertForSequenceClassification", "BertConfig",
                   **{**BERT, "num_labels": 2})
    import transformers

    assert detect_task(transformers.AutoConfig.from_pretrained(folder)) == "text-classification"
    # --task feature-extraction: the bare body, on purpose
    out = tmp_path / "body.onnx"
    assert main(["export", str(folder), "--task", "feature-extraction", "--out", str(out),
                 "--json"]) == 0
    names = [o["name"] for o in json.loads(capsys.readouterr().out)["parity"]["outputs"]]
    assert "logits" not in names and names[0] == "last_hidden_state"
    # a --seq longer than the positions is refused with the limit
    assert main(["export", str(folder), "--seq", "65", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "64 positions" in capsys.readouterr().err


def test_bert_with_64_positions_exports_packs_and_runs_with_no_seq(tmp_path, capsys):
    folder = _save(tmp_path, "BertModel", "BertConfig", **BERT)
    assert main(["export", str(folder), "--method", "bitstack", "--blocks", "2", "--out",
                 str(tmp_path / "b.onnx")]) == 0
    pkg = tmp_path / "bert.pkg"
    assert main(["pack", str(folder), "--blocks", "2", "--out", str(pkg), "--json"]) == 0
    capsys.readouterr()
    assert main(["run", str(pkg), "--json", "--no-calibrate"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["outputs"]["last_hidden_state"]["shape"] == [1, 64, 32]
    assert main(["verify", str(pkg), "--json"]) == 0


def test_text_generation_exports_a_kv_cache_decoder(tmp_path, capsys):
    """`--task text-generation` on a Llama folder (grouped-query attention): logits and the
    KV cache in and out, the I/O contract in the JSON report and the file; the file alone
    drives greedy decoding (numpy + ONNX Runtime)."""
    import numpy as np

    from edgestack.core.decoding import DecoderContract, greedy_generate
    from edgestack.exporter.parity import ort_session

    folder = _save(tmp_path, "LlamaForCausalLM", "LlamaConfig", vocab_size=99, hidden_size=32,
                   intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)
    out = tmp_path / "decoder.onnx"
    assert main(["export", str(folder), "--task", "text-generation", "--method", "shift",
                 "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    dec = doc["decoder"]
    assert dec == doc["export"]["decoder"]
    assert (dec["num_layers"], dec["kv_heads"], dec["head_dim"], dec["vocab_size"]) == \
        (2, [2, 2], 8, 99)
    assert doc["export"]["input_names"] == [
        "input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
        "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert doc["export"]["output_names"] == [
        "logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert doc["export"]["custom_nodes"] == {"ShiftWeight": 15}  # 7 per layer + lm_head
    assert doc["parity"]["passed"]
    sess = ort_session(out)
    assert DecoderContract.from_session(sess) == DecoderContract.from_json(json.dumps(dec))
    tokens = greedy_generate(sess, np.array([[5, 6, 7]]), 4, eos_token_ids=())
    assert tokens.shape == (1, 4) and tokens.dtype == np.int64
