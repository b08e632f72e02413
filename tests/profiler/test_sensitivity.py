"""Per-layer sensitivity (:mod:`edgestack.profiler.sensitivity`, ``edgestack sensitivity``): a
layer made deliberately bad for a method ranks first, one calibration run serves every layer,
the model is left as it was, and bad arguments exit 2 before the model is loaded."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from edgestack.cli import main
from edgestack.compress import compress
from edgestack.compress.quality import choose_evaluator
from edgestack.errors import CompressError
from edgestack.profiler.sensitivity import layer_sensitivity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sensitivity_models import OUTLIER_LAYER, outlier_mlp

FACTORY = f"{Path(__file__).resolve().parent / 'sensitivity_models.py'}:outlier_mlp"
ROW_KEYS = {"name", "layers", "kind", "shape", "params", "bits_per_weight", "metric", "drop",
            "scores", "seconds", "note"}


@pytest.fixture
def mlp():
    model, inputs = outlier_mlp()
    evaluator, _ = choose_evaluator(model, None, inputs, digits=7)
    return model, inputs, evaluator


def test_the_outlier_layer_ranks_first_and_the_model_is_left_as_it_was(mlp):
    model, inputs, ev = mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = layer_sensitivity(model, "shift", ev.score, calib=[inputs])
    assert [r.name for r in report.rows][0] == OUTLIER_LAYER
    assert sorted(r.name for r in report.rows) == ["body.0", "body.2", "body.4"]
    drops = [r.drop for r in report.rows]
    assert drops == sorted(drops, reverse=True) and all(d >= 0 for d in drops)
    assert report.rows[0].drop > 5 * report.rows[1].drop
    assert report.calibration_runs == 1           # one capture for every layer
    assert report.metric == "cosine_mean" and report.reference["cosine_mean"] > 0.9999
    top = report.rows[0]
    assert top.shape == (48, 48) and top.params == 48 * 48 and top.kind == "linear"
    assert 4 < top.bits_per_weight < 5           # 4-bit codes and one fp32 scale per row
    assert all(isinstance(m, nn.Linear) for m in model.body if not isinstance(m, nn.ReLU))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [k for k in vars(model) if k.startswith("edgestack_")]


@pytest.mark.parametrize("method, opts", [("shift", {"rounding": "gptq"}),
                                          ("bitstack", {"n_blocks": 2}),
                                          ("lowrank", {"ratio": 0.5})])
def test_each_row_is_the_model_with_only_that_layer_compressed(mlp, method, opts):
    """The fast path (one layer copied, statistics shared) scores exactly what compressing a
    full copy of the model with layers={name} scores."""
    model, inputs, ev = mlp
    report = layer_sensitivity(model, method, ev.score, calib=[inputs], **opts)
    for row in report.rows:
        alone = copy.deepcopy(model)
        compress(alone, method, calib=[inputs], layers=set(row.layers), **opts)
        assert ev.score(alone) == row.scores, row.name


def test_prune_scores_structures_and_patterns_restrict_the_units(mlp):
    model, inputs, ev = mlp
    report = layer_sensitivity(model, "prune", ev.score, calib=[inputs])
    assert sorted(r.name for r in report.rows) == ["body.0->body.2", "body.2->body.4"]
    assert all(r.kind == "channels" and len(r.layers) == 2 for r in report.rows)
    assert all(r.bits_per_weight < 32 for r in report.rows)   # pruning removed weights
    only = layer_sensitivity(model, "shift", ev.score, calib=[inputs], patterns=["*.4"])
    assert [r.name for r in only.rows] == ["body.4"]
    assert {n for n, _ in only.not_scored} == {"body.0", "body.2"}
    skipped = layer_sensitivity(model, "shift", ev.score, calib=[inputs], skip=("body.0",))
    assert sorted(r.name for r in skipped.rows) == ["body.2", "body.4"]
    with pytest.raises(CompressError, match="no layers to score match the patterns"):
        layer_sensitivity(model, "shift", ev.score, patterns=["encoder.*"])
    with pytest.raises(CompressError, match="restrict the units with patterns"):
        layer_sensitivity(model, "shift", ev.score, layers={"body.0"})


def test_cli_json_text_and_markdown(capsys, tmp_path):
    capsys.readouterr()
    assert main(["-q", "sensitivity", FACTORY, "--method", "shift", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["method"] == "shift" and doc["metric"] == "cosine_mean"
    assert {"model", "metric_description", "calibration", "reference", "rows", "not_scored",
            "calibration_runs", "seconds", "options"} <= set(doc)
    assert "layers" not in doc["options"]
    assert len(doc["rows"]) == 3 and doc["rows"][0]["name"] == OUTLIER_LAYER
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS and row["drop"] >= 0 and row["params"] > 0
        assert row["metric"] == row["scores"]["cosine_mean"]
    out = tmp_path / "sub" / "sens.md"
    assert main(["-q", "sensitivity", FACTORY, "--method", "shift", "--bits", "3",
                 "--top", "1", "--layers", "body.[24]", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"| 1 | {OUTLIER_LAYER} | 48x48 |" in text and "| 2 |" not in text
    assert "(1 more rows" in text
    md = out.read_text()
    assert md.startswith("# sensitivity of") and "bits=3" in md
    assert f"| 1 | {OUTLIER_LAYER} |" in md and "| 2 | body.4 |" in md and "body.0" not in md


@pytest.mark.parametrize("argv, what", [
    (["--method", "shift", "--bits", "9"], "bits"),
    (["--method", "shift", "--top", "0"], "--top"),
    (["--method", "shift", "--blocks", "2"], "--blocks"),
    (["--method", "shift", "--layers", " "], "--layers"),
    (["--method", "shift", "--eval", "/no/such.jsonl"], "--eval"),
    (["--method", "shift", "--calib", "/no/such.txt"], "--calib"),
    (["--method", "lowrank", "--rank", "2", "--ratio", "0.5"], "rank or ratio"),
])
def test_bad_arguments_exit_2_before_the_model_is_loaded(capsys, monkeypatch, argv, what):
    import edgestack.sources

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(edgestack.sources, "load_source", boom)
    capsys.readouterr()
    code = main(["sensitivity", "minilm", *argv])
    err = capsys.readouterr().err
    assert code == 2 and what in err and len(err.strip().splitlines()) == 1, err


def test_a_pattern_matching_nothing_exits_2(capsys):
    capsys.readouterr()
    assert main(["-q", "sensitivity", FACTORY, "--method", "shift", "--layers",
                 "encoder.*"]) == 2
    err = capsys.readouterr().err
    assert "no layers to score match the patterns ['encoder.*']" in err
    assert "body.0" in err and len(err.strip().splitlines()) == 1


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sensitivity", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--method", "--layers", "--top", "--json", "--out", "--eval", "--calib",
                 "--bits", "--blocks", "--ratio", "--skip"):
        assert flag in out
    assert "--tiers" not in out
