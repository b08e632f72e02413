"""A Hugging Face Hub id (org/name) resolves from the local Hugging Face cache; an id that is
not cached, offline, is refused with what to do."""

from __future__ import annotations

import json

from edgestack.cli import main


def _cache(tmp_path, repo_id: str):
    """A Hugging Face cache holding ``repo_id`` (the layout huggingface_hub reads)."""
    import transformers

    root = tmp_path / "hub"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / ("0" * 40)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=37,
                                  max_position_embeddings=32, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return root


def test_hub_id_from_the_local_cache_and_offline_refusal(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hf_constants

    root = _cache(tmp_path, "acme/tiny-bert")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "m.onnx"
    assert main(["export", "acme/tiny-bert", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["parity"]["outputs"][0]["name"] == "logits" and out.is_file()
    assert main(["export", "acme/not-cached", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and "acme/not-cached" in err
