"""``--calib FILE``: calibrate on the user's own data (text lines, JSONL, .npz)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgestack.cli import main
from edgestack.compress.calib import read_calib_file
from edgestack.errors import CompressError


def test_read_calib_file_forms_and_errors(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first sentence\n\n  second one  \n")
    assert read_calib_file(txt) == ("texts", ["first sentence", "second one"])
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "a"}\n{"sentence": "b"}\n')
    assert read_calib_file(jl) == ("texts", ["a", "b"])
    jl.write_text('{"text": "a"}\n{"label": 1}\n')
    with pytest.raises(CompressError, match=r"c.jsonl:2: expected an object with a text"):
        read_calib_file(jl)
    npz = tmp_path / "c.npz"
    np.savez(npz, x=np.zeros((3, 4)), y=np.zeros((2, 4)))
    with pytest.raises(CompressError, match="same number of examples"):
        read_calib_file(npz)
    with pytest.raises(CompressError, match="does not exist"):
        read_calib_file(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(CompressError, match="holds no text"):
        read_calib_file(tmp_path / "blank.txt")


def test_export_calibrates_on_an_npz_of_inputs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "calib.npz"
    np.savez(npz, pixel_values=rng.standard_normal((12, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "cnn.onnx"
    assert main(["export", "small-cnn", "--method", "lowrank", "--calib", str(npz), "--out",
                 str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["calibration"] == f"12 examples from {npz}" and doc["parity"]["passed"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=np.zeros((2, 8), np.int64))
    assert main(["export", "small-cnn", "--method", "lowrank", "--calib", str(bad), "--out",
                 str(tmp_path / "x.onnx")]) == 2
    assert "missing ['pixel_values']" in capsys.readouterr().err
    # text for a model without a tokenizer is refused with what to give instead
    txt = tmp_path / "t.txt"
    txt.write_text("a sentence\n")
    assert main(["export", "small-cnn", "--method", "lowrank", "--calib", str(txt), "--out",
                 str(tmp_path / "y.onnx")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_export_calibrates_a_text_model_on_a_user_file(tmp_path, capsys):
    texts = [f"Sentence number {i} about edge devices and small memory budgets." for i in
             range(40)]
    jl = tmp_path / "mine.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    assert main(["export", "minilm", "--method", "prune", "--ratio", "0.1", "--calib",
                 str(jl), "--seq", "16", "--out", str(tmp_path / "m.onnx"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["calibration"] == f"40 texts from {jl}" and doc["parity"]["passed"]
    # a missing file fails before the model is loaded
    assert main(["export", "minilm", "--method", "prune", "--calib", str(tmp_path / "no.txt"),
                 "--out", str(tmp_path / "n.onnx")]) == 2


def test_text_calibration_feeds_only_the_model_inputs(tmp_path):
    """A GPT-2 adds token_type_ids to its embeddings: the tokenizer's token_type_ids must not
    reach it in calibration (its example inputs have none)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from edgestack.sources import load_source

    folder = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(50)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    txt = tmp_path / "t.txt"
    txt.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 50}" for j in range(10))
                             for i in range(12)))
    src = load_source(str(folder))
    assert set(src.inputs) == {"input_ids", "attention_mask"}
    for batches, _ in (src.calibration(file=str(txt)), src.calibration()):
        assert batches and all(set(b) == set(src.inputs) for b in batches)
        assert all(b["input_ids"].dtype == torch.int64 for b in batches)
