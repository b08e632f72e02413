"""Pruning to a latency target (``export --method prune --target-latency MS``, the ZipLM idea):
candidates measured on the target's backend, step by step, until one meets the target."""

from __future__ import annotations

import json

import onnx
import pytest

from edgestack import zoo
from edgestack.cli import main
from edgestack.pipeline import prune_to_latency


def test_search_stops_at_the_first_ratio_that_meets_the_target():
    model, x = zoo.resnet_tiny()
    dense = sum(p.numel() for p in model.parameters())
    pruned, report, search = prune_to_latency(model, x, 1e6, step=0.3, iterations=3, warmup=1)
    assert [s.ratio for s in search.steps] == [0.0] and search.met and search.ratio == 0.0
    assert search.steps[0].p50_ms > 0 and search.steps[0].params == dense
    assert sum(p.numel() for p in model.parameters()) == dense  # the input is not changed


def test_unreachable_target_measures_every_step_and_returns_the_most_pruned():
    model, x = zoo.mobilenet_tiny()
    pruned, report, search = prune_to_latency(model, x, 1e-6, step=0.45, iterations=3,
                                              warmup=1, calib=[x])
    assert [s.ratio for s in search.steps] == [0.0, 0.45, 0.9]
    assert not search.met and not any(s.met for s in search.steps)
    params = [s.params for s in search.steps]
    assert params[0] > params[1] > params[2]
    assert sum(p.numel() for p in pruned.parameters()) == params[-1]
    assert report.options["ratio"] == 0.9 and all(s.p50_ms > 0 for s in search.steps)
    assert "target NOT met" in search.table()


def test_cli_reports_the_steps_and_fails_when_the_target_is_not_met(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = main(["export", "resnet-tiny", "--method", "prune", "--target-latency", "1e-6",
               "--latency-step", "0.9", "--out", str(out), "--json"])
    assert rc == 1
    doc = json.loads(capsys.readouterr().out)
    lat = doc["latency"]
    assert lat["target"] == "ort-cpu" and not lat["met"] and lat["ratio"] == 0.9
    assert [s["ratio"] for s in lat["steps"]] == [0.0, 0.9]
    assert doc["parity"]["passed"] and doc["compression"]["options"]["ratio"] == 0.9
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    (key,) = [k for k in meta if k.endswith("latency_search")]
    assert json.loads(meta[key])["steps"] == lat["steps"]


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "prune", "--ratio", "0.5"], "not both"),
    (["--method", "lowrank"], "needs --method prune"),
    (["--method", "prune", "--latency-step", "0.95"], "--latency-step"),
])
def test_bad_latency_options_fail_before_loading(args, message, tmp_path, capsys):
    rc = main(["export", "small-cnn", "--target-latency", "1", *args, "--out",
               str(tmp_path / "m.onnx")])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
