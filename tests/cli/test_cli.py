"""The `edgestack` command: help, version, export end to end, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from edgestack import __version__
from edgestack.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgestack.cli", *args],
                          capture_output=True, text=True, timeout=600)


def test_version_and_help():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"edgestack {__version__}"
    r = run_cli("--help")
    assert r.returncode == 0 and "export" in r.stdout and "Exit codes" in r.stdout
    r = run_cli("export", "--help")
    assert r.returncode == 0
    for flag in ("--method", "--from", "--out", "--json", "--atol", "--rtol", "--bits"):
        assert flag in r.stdout


def test_python_m_edgestack_and_a_closed_pipe():
    r = subprocess.run([sys.executable, "-m", "edgestack", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"edgestack {__version__}"
    # the reader closes the pipe after one line: the command ends quietly, exit 0
    r = subprocess.run(f"{sys.executable} -m edgestack profiles list | head -1; "
                       "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 and "Traceback" not in r.stderr
    assert "BrokenPipe" not in r.stderr


def test_quiet_and_verbose_flags_set_the_progress_lines(tmp_path, capsys):
    out = tmp_path / "cnn.onnx"
    assert main(["export", "small-cnn", "--method", "none", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "[edgestack export] loading small-cnn" in err
    assert main(["-q", "export", "small-cnn", "--method", "none", "--out",
                 str(tmp_path / "q.onnx")]) == 0
    assert "[edgestack export]" not in capsys.readouterr().err
    assert main(["--log-level", "error", "export", "small-cnn", "--method", "none",
                 "--out", str(tmp_path / "e.onnx")]) == 0
    assert capsys.readouterr().err == ""
    import logging

    # the CLI configures only the edgestack loggers, and takes its handler off again
    from edgestack.cli import CLI_HANDLER

    assert logging.getLogger().level == logging.WARNING
    lg = logging.getLogger("edgestack")
    assert CLI_HANDLER not in [h.get_name() for h in lg.handlers] and lg.propagate


@pytest.mark.parametrize("method,extra", [
    ("shift", ["--bits", "4"]),
    ("bitstack", ["--blocks", "3"]),
    ("lowrank", ["--ratio", "0.5"]),
    ("prune", ["--ratio", "0.25"]),
    ("none", []),
])
def test_export_small_cnn_json(tmp_path, capsys, method, extra):
    out = tmp_path / f"cnn-{method}.onnx"
    code = main(["export", "small-cnn", "--method", method, *extra, "--out", str(out), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    assert doc["ok"] is True and doc["method"] == method
    assert out.is_file()
    onnx.checker.check_model(str(out), full_check=True)
    for o in doc["parity"]["outputs"]:
        assert o["max_rel"] <= 1e-4
    ops = {(n.domain, n.op_type) for n in onnx.load(str(out)).graph.node}
    if method == "shift":
        assert ("edgestack", "ShiftWeight") in ops
    if method == "bitstack":
        assert ("edgestack", "BitStackWeight") in ops
    if method != "none":
        assert doc["compression"]["layers"], "no layer was compressed"
    # no tokenizer: calibrated on the example inputs
    assert doc["calibration"] == ("none" if method == "none" else "the example inputs")


def test_ratio_is_the_fraction_removed_for_lowrank_and_prune(tmp_path, capsys):
    """``--ratio`` means one thing for both methods: the fraction of parameters removed."""
    for method, ratio in (("lowrank", 0.75), ("prune", 0.5)):
        out = tmp_path / f"{method}.onnx"
        assert main(["export", "small-cnn", "--method", method, "--ratio", str(ratio),
                     "--out", str(out), "--json"]) == 0
        layers = json.loads(capsys.readouterr().out)["compression"]["layers"]
        assert layers
        kept = sum(r["compressed_bytes"] for r in layers) / sum(r["dense_bytes"]
                                                                for r in layers)
        # lowrank: at most 1 - ratio per layer; prune: a layer between two pruned blocks
        # loses rows and columns, so the total kept is well under 1 - ratio
        assert kept <= 1 - ratio, (method, kept)
        if method == "lowrank":
            assert all(r["details"]["params_kept"] <= 1 - ratio for r in layers)
            assert kept > 0.5 * (1 - ratio)
    r = run_cli("export", "--help")
    assert "fraction of each layer's parameters removed" in " ".join(r.stdout.split())
    assert main(["export", "small-cnn", "--method", "lowrank", "--ratio", "1",
                 "--out", str(tmp_path / "x.onnx")]) == 2
    assert "[0, 1)" in capsys.readouterr().err


def test_text_models_calibrate_on_the_shipped_corpus(tmp_path):
    from edgestack.compress.calib import calib_sentences
    from edgestack.sources import load_source

    src = load_source("minilm", seq=16)
    assert src.text_folder is not None and (src.text_folder / "tokenizer.json").is_file()
    batches, what = src.calibration(24, seq=32)
    assert what == "24 sentences of the shipped corpus" and len(batches) == 3
    assert sum(b["input_ids"].shape[0] for b in batches) == 24
    assert max(b["input_ids"].shape[1] for b in batches) <= 32
    # real text, not the random example tokens: the first sentence round-trips
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src.text_folder / "tokenizer.json"))
    first = batches[0]["input_ids"][0][batches[0]["attention_mask"][0].bool()].tolist()
    assert tok.decode(first).lower().split() == tok.decode(
        tok.encode(calib_sentences()[0]).ids[:32]).lower().split()
    assert src.calibration(0) == ([src.inputs], "the example inputs")
    cnn = load_source("small-cnn")
    assert cnn.text_folder is None and cnn.calibration()[1] == "the example inputs"
    with pytest.raises(SystemExit):  # argparse: not an int
        main(["export", "minilm", "--calib-n", "x", "--out", str(tmp_path / "m.onnx")])
    assert main(["export", "small-cnn", "--method", "shift", "--calib-n", "-1",
                 "--out", str(tmp_path / "m.onnx")]) == 2
    # a negative count is refused by calibration() itself (not silently read as texts[:-n]),
    # for text models and others, and so on the quality path too
    from edgestack.errors import CompressError

    for source in (src, cnn):
        with pytest.raises(CompressError, match="found -5"):
            source.calibration(-5)
    assert main(["quality", "minilm", "--method", "shift", "--calib-n", "-5"]) == 2


def test_export_parity_failure_exits_1(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    # an impossible tolerance: any float difference at all fails
    code = main(["export", "gpt2-tiny", "--seq", "8", "--method", "shift", "--out", str(out),
                 "--atol", "0", "--rtol", "0", "--json"])
    doc = json.loads(capsys.readouterr().out)
    if doc["parity"]["passed"]:
        pytest.fail("expected a non-zero float difference between ORT and torch")
    assert code == 1 and doc["ok"] is False


def test_export_compacts_embeddings_unless_told_not_to(tmp_path, capsys):
    docs = {}
    for flag in ((), ("--no-compact-embeddings",)):
        out = tmp_path / f"m{len(flag)}.onnx"
        code = main(["export", "gpt2-tiny", "--seq", "8", "--method", "shift", *flag,
                     "--out", str(out), "--json"])
        docs[flag] = json.loads(capsys.readouterr().out)
        assert code == 0, docs[flag]["parity"]
    on, off = docs[()]["export"], docs[("--no-compact-embeddings",)]["export"]
    assert [t["name"] for t in on["compact_embeddings"]] == ["wte.weight"]
    assert off["compact_embeddings"] == []
    assert on["file_bytes"] < off["file_bytes"] - 300_000  # 512 KiB fp32 -> 132 KiB int8


def test_unknown_method_lists_valid_ones(tmp_path):
    r = run_cli("export", "small-cnn", "--method", "magic", "--out", str(tmp_path / "x.onnx"))
    assert r.returncode == 2
    assert "invalid choice: 'magic'" in r.stderr and "bitstack" in r.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_missing_model_path(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    code = main(["export", str(tmp_path / "nope"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "not found" in err and "module:factory" in err
    assert not out.exists()


def test_bits_out_of_range_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    code = main(["export", "small-cnn", "--method", "shift", "--bits", "9", "--out", str(out),
                 "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 2 and doc["ok"] is False
    assert "bits" in doc["error"] and "9" in doc["error"]
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv,what", [
    (["--method", "shift", "--bits", "9"], "bits"),
    (["--method", "bitstack", "--blocks", "0"], "n_blocks"),
    (["--method", "prune", "--ratio", "0.95"], "ratio"),
    (["--method", "none", "--atol", "-1"], "--atol"),
    (["--method", "none", "--seq", "0"], "--seq"),
])
def test_bad_arguments_fail_before_the_model_is_loaded(tmp_path, capsys, monkeypatch, argv,
                                                       what):
    import edgestack.sources

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(edgestack.sources, "load_source", boom)
    code = main(["export", "minilm", *argv, "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and what in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_export_dynamic_axes_and_opset(tmp_path, capsys):
    from edgestack.cli.export import MIN_OPSET
    from edgestack.exporter.ops import MIN_OPSET as EXPORTER_MIN_OPSET

    assert MIN_OPSET == EXPORTER_MIN_OPSET
    out = tmp_path / "d.onnx"
    assert main(["export", "small-cnn", "--method", "shift", "--dynamic", "batch,sequence",
                 "--opset", "21", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parity"]["passed"]
    model = onnx.load(str(out))
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim
            ][0] == "batch"
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    assert main(["export", "small-cnn", "--opset", str(MIN_OPSET - 1), "--out",
                 str(tmp_path / "o.onnx")]) == 2
    assert "--opset" in capsys.readouterr().err


def test_export_creates_the_output_folder_and_never_overwrites_its_input(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "cnn.onnx"
    assert main(["export", "small-cnn", "--method", "none", "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    assert main(["export", str(src), "--method", "none", "--out", str(src)]) == 2
    assert "is the input" in capsys.readouterr().err


def test_option_for_another_method_is_refused(tmp_path, capsys):
    code = main(["export", "small-cnn", "--method", "shift", "--blocks", "3",
                 "--out", str(tmp_path / "x.onnx")])
    assert code == 2
    assert "--blocks" in capsys.readouterr().err


def test_factory_spec(tmp_path, capsys):
    factory = tmp_path / "mymodel.py"
    factory.write_text(
        "import torch\n"
        "def build():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.ReLU(),"
        " torch.nn.Linear(17, 5)).eval()\n"
        "    return m, (torch.randn(3, 9),)\n"
    )
    out = tmp_path / "f.onnx"
    code = main(["export", f"{factory}:build", "--method", "shift", "--out", str(out), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    assert len(doc["compression"]["layers"]) == 2


def test_unsupported_layer_is_left_dense_with_warning(tmp_path, capsys):
    factory = tmp_path / "conv3d.py"
    factory.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.c3 = torch.nn.Conv3d(2, 4, 3)\n"
        "        self.fc = torch.nn.Linear(4, 3)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.c3(x).mean(dim=(2, 3, 4)))\n"
        "def build():\n"
        "    return M().eval(), {'x': torch.randn(1, 2, 5, 5, 5)}\n"
    )
    out = tmp_path / "w.onnx"
    code = main(["export", f"{factory}:build", "--method", "shift", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert code == 0, doc
    assert any("c3" in w for w in doc["warnings"]), doc["warnings"]
    assert "c3" in captured.err
    assert [s["name"] for s in doc["compression"]["skipped"]] == ["c3"]


def test_export_deepshift_checkpoint_with_base(tmp_path, capsys):
    import torch

    from edgestack import zoo
    from edgestack.compress.walk import iter_layers

    model, _ = zoo.small_cnn()
    g = torch.Generator().manual_seed(3)
    state = {}
    for layer in iter_layers(model):
        shape = layer.module.weight.shape
        state[f"module.{layer.name}.shift"] = torch.empty(shape).uniform_(-6, -1, generator=g)
        state[f"module.{layer.name}.sign"] = torch.empty(shape).uniform_(-1.2, 1.2, generator=g)
        state[f"module.{layer.name}.bias"] = torch.zeros(shape[0])
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": state}, ckpt)
    out = tmp_path / "ds.onnx"
    code = main(["export", str(ckpt), "--from", "deepshift", "--base", "small-cnn",
                 "--out", str(out), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    assert len(doc["import"]["converted"]) == 6
    ops = [n.op_type for n in onnx.load(str(out)).graph.node if n.domain == "edgestack"]
    assert ops == ["ShiftWeight"] * 6


def test_export_hf_folder(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=48)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    out = tmp_path / "bert.onnx"
    code = main(["export", str(tmp_path / "bert"), "--method", "bitstack", "--blocks", "2",
                 "--seq", "12", "--out", str(out), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    assert [o["name"] for o in doc["parity"]["outputs"]] == ["last_hidden_state",
                                                             "pooler_output"]
    shape = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert shape == [1, 12]


def test_cli_target_list_is_the_registry():
    from edgestack.cli.compile import TARGETS
    from edgestack.targets import TARGET_NAMES

    assert TARGETS == TARGET_NAMES
