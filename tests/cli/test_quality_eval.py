"""``edgestack quality --eval FILE``: the task's metric on the user's data (accuracy for a
classifier, perplexity for a language model), next to the fp32 model's."""

from __future__ import annotations

import json
import math

import pytest
import torch

from edgestack.cli import main

WORDS = [f"w{i}" for i in range(90)]


def _folder(tmp_path, cls_name: str, config_name: str, **cfg):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(getattr(transformers, config_name)(**cfg))
    folder = tmp_path / cls_name
    model.save_pretrained(folder)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder, model.eval()


def _texts(n: int, seed: int = 1) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(j)] for j in torch.randint(0, 90, (12,), generator=g))
            for _ in range(n)]


def _rows(capsys):
    doc = json.loads(capsys.readouterr().out)
    return doc, {r["label"]: r for r in doc["rows"]}


def test_classifier_accuracy_on_a_labelled_file(tmp_path, capsys):
    folder, model = _folder(tmp_path, "BertForSequenceClassification", "BertConfig",
                            vocab_size=92, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=37,
                            max_position_embeddings=64, num_labels=3)
    texts = _texts(30)
    data = tmp_path / "labelled.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": i % 3})
                              for i, t in enumerate(texts)))
    assert main(["quality", str(folder), "--method", "prune", "--ratio", "0.25",
                 "--no-baselines", "--eval", str(data), "--json"]) == 0
    doc, rows = _rows(capsys)
    assert "accuracy" in doc["metric"]
    # the fp32 row is the uncompressed model's accuracy on the file, computed here by hand
    ids = torch.tensor([[w + 2 for w in (WORDS.index(x) for x in t.split())] for t in texts])
    with torch.no_grad():
        pred = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.argmax(-1)
    expected = float((pred == torch.tensor([i % 3 for i in range(30)])).float().mean())
    assert rows["fp32"]["accuracy"] == pytest.approx(expected, abs=1e-5)
    assert 0.0 <= next(r for k, r in rows.items() if k != "fp32")["accuracy"] <= 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "w1", "label": 7}) + "\n")
    assert main(["quality", str(folder), "--method", "prune", "--no-baselines",
                 "--eval", str(bad)]) == 2
    assert "bad.jsonl:1: label 7" in capsys.readouterr().err


def test_language_model_perplexity_on_a_text_file(tmp_path, capsys):
    folder, model = _folder(tmp_path, "GPT2LMHeadModel", "GPT2Config", vocab_size=92,
                            n_embd=32, n_layer=2, n_head=2, n_positions=64)
    texts = _texts(10, seed=2)
    data = tmp_path / "text.txt"
    data.write_text("\n".join(texts))
    assert main(["quality", str(folder), "--method", "shift", "--bits", "5",
                 "--no-baselines", "--eval", str(data), "--json"]) == 0
    doc, rows = _rows(capsys)
    assert "perplexity" in doc["metric"]
    ids = torch.tensor([[w + 2 for w in (WORDS.index(x) for x in t.split())] for t in texts])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss   # mean next-token NLL, equal lengths
    assert rows["fp32"]["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-3)
    shifted = next(r for k, r in rows.items() if k != "fp32")["perplexity"]
    assert shifted > 0 and math.isfinite(shifted)


def test_max_drop_returns_the_smallest_configuration_within_it(tmp_path, capsys):
    from edgestack.compress.quality import smallest_within

    rows = [{"label": "fp32", "method": "fp32", "bits_per_weight": 32.0, "accuracy": 0.90},
            {"label": "a", "method": "shift", "bits_per_weight": 4.0, "accuracy": 0.895},
            {"label": "b", "method": "shift", "bits_per_weight": 3.0, "accuracy": 0.85},
            {"label": "c", "method": "int8", "bits_per_weight": 8.0, "accuracy": 0.90}]
    best, table = smallest_within(rows, 0.01)
    assert best["label"] == "a" and [r["label"] for r in table] == ["b", "a", "c"]
    assert [r["within"] for r in table] == [False, True, True]
    ppl = [{"label": "fp32", "method": "fp32", "bits_per_weight": 32.0, "perplexity": 10.0},
           {"label": "x", "method": "shift", "bits_per_weight": 4.0, "perplexity": 10.5}]
    assert smallest_within(ppl, 0.04)[0] is None and smallest_within(ppl, 0.06)[0]["label"] == "x"
    # end to end on a small model (cosine of the first output vs fp32)
    assert main(["quality", "small-cnn", "--max-drop", "0.05", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["max_drop"] == 0.05 and doc["searched"]
    within = [r for r in doc["searched"] if r["within"]]
    if within:
        assert doc["chosen"]["bits_per_weight"] == min(r["bits_per_weight"] for r in within)
    assert all(r["drop"] == pytest.approx(1.0 - r["cosine_mean"], abs=1e-4)
               for r in doc["searched"])
    assert main(["quality", "small-cnn", "--max-drop", "0.05", "--method", "shift"]) == 2
