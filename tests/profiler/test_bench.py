"""``edgestack bench`` / :mod:`edgestack.profiler.bench` on small layer models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "targets"))
from targets_cases import linear_case, random_shift  # noqa: E402

from edgestack.cli import main  # noqa: E402
from edgestack.errors import EdgestackError  # noqa: E402
from edgestack.profiler import bench as B  # noqa: E402
from edgestack.profiler.latency import latency_stats  # noqa: E402


@pytest.fixture(scope="module")
def shift_model(tmp_path_factory) -> Path:
    """A 4-bit shift linear layer (96 -> 64) on ``[1, 16, 96]`` inputs."""
    rng = np.random.default_rng(3)
    model, _, _ = linear_case(random_shift(rng, (64, 96), 4, False), 1, 16, rng=rng)
    path = tmp_path_factory.mktemp("bench") / "shift.onnx"
    onnx.save(model, str(path))
    return path


def test_latency_stats_of_known_times() -> None:
    stats = latency_stats([float(i) for i in range(1, 101)], batch=2)
    assert stats["iterations"] == 100
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["min_ms"] == 1.0
    assert stats["spread_ms"] == pytest.approx((90.1 - 10.9) / 2)
    assert stats["throughput"] == pytest.approx(1e3 * 2 / 50.5)


def test_bench_feeds_follow_the_signature(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])]
    out = helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Add", ["input_ids", "attention_mask"], ["y"])],
                              "g", inputs, [out])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    feeds = B.bench_feeds(path, batch=2, seq=7)
    assert feeds["input_ids"].shape == (2, 7) and feeds["input_ids"].dtype == np.int64
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()
    assert feeds["x"].shape == (2, 3) and feeds["x"].dtype == np.float32
    again = B.bench_feeds(path, batch=2, seq=7)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


def test_bench_with_baselines_writes_report_and_plots(shift_model: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = B.run_bench(shift_model, out, targets=["ort-cpu", "openvino-cpu"], baseline=True,
                         iterations=6, warmup=1, log=lambda m: None)
    labels = [r.label for r in report.rows]
    assert labels[:7] == list(B.BASELINES)
    assert "edgestack ort-cpu fp32" in labels and "edgestack openvino-cpu fp32" in labels
    by = {r.label: r for r in report.rows}
    assert by["ORT fp32"].ratio == 1.0
    # not a text encoder: the output cosine, and the rows say so
    assert {r.metric for r in report.rows} == {B.METRIC_OUTPUT}
    # The dense baseline is the decoded source: same outputs; quantized ones are close.
    assert by["ORT fp32"].cosine > 0.99999
    assert by["edgestack ort-cpu fp32"].cosine > 0.99999
    for label in B.BASELINES[1:5]:          # every ORT quantizer rewrote the one MatMul
        assert 0.95 < by[label].cosine < 1.0, label
        assert by[label].note.startswith("quantizer added 1 "), by[label].note
    assert by["ORT int4 weight-only MatMulNBits g32"].cosine < by[
        "ORT int8 weight-only MatMulNBits g32"].cosine
    for r in report.rows:
        assert r.iterations >= 6 and r.p50_ms > 0 and r.p90_ms >= r.p50_ms >= r.min_ms
        assert r.peak_rss_increase is not None and r.peak_rss_increase > 0
        assert r.load_s is not None and r.load_s > 0
    # int8 weights are smaller on disk than the fp32 ones
    assert by["ORT dynamic int8 per-tensor"].disk_bytes < by["ORT fp32"].disk_bytes
    doc = json.loads((out / "bench.json").read_text())
    assert [r["label"] for r in doc["rows"]] == labels
    assert {r["label"] for r in doc["pareto"]["rows"]} == set(labels)
    assert [r["baseline"] for r in doc["at_baseline"]["rows"]] == list(B.BASELINES)
    for name in ("latency_vs_memory.png", "quality_vs_memory.png", "pareto.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (out / "bench.md").read_text()
    assert "| ORT fp32 |" in md and "p50 ms" in md and B.METRIC_OUTPUT in md
    assert "### By memory" in md and "### At each baseline's memory" in md


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """A 4-bit shift 1024 -> 1024 layer on ``[1, 128, 1024]``: milliseconds per call, so
    timer resolution and cache effects do not dominate the spread."""
    rng = np.random.default_rng(4)
    model, _, _ = linear_case(random_shift(rng, (1024, 1024), 4, False), 1, 128, rng=rng)
    path = tmp_path_factory.mktemp("wide") / "wide.onnx"
    onnx.save(model, str(path))
    return path


def test_spread_is_half_the_p10_p90_band_of_the_timed_calls(wide_model: Path,
                                                             tmp_path: Path) -> None:
    # Whether two runs agree within their spreads depends on the machine's load, so it is
    # not a unit test (it failed under CI-like load); what the bench guarantees is how
    # spread_ms is made from the timed calls.
    run = B.run_bench(wide_model, tmp_path / "r", iterations=40, warmup=5, memory=False,
                      plots=False, log=lambda m: None)
    a = run.rows[0]
    assert a.label == "edgestack ort-cpu fp32" and a.iterations >= 40
    assert a.spread_ms > 0 and a.p10_ms <= a.p50_ms <= a.p90_ms
    assert a.spread_ms == pytest.approx((a.p90_ms - a.p10_ms) / 2)


def test_cli_json_and_skips(shift_model: Path, tmp_path: Path, capsys) -> None:
    rc = main(["bench", str(shift_model), "--out", str(tmp_path / "a"), "--iterations", "3",
               "--no-memory", "--no-plots", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["ok"] and doc["rows"][0]["target"] == "ort-cpu"
    rc = main(["bench", str(shift_model), "--out", str(tmp_path / "b"), "--targets",
               "tensorrt-gpu", "--no-memory", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 4 and not doc["ok"] and "tensorrt-gpu" in doc["skipped"]


@pytest.mark.parametrize("argv, needle", [
    (["--targets", "nope"], "expected one of ort-cpu"),
    (["--profile", "no-such-device"], "built-in profiles"),
    (["--input", "missing.npz"], "does not exist"),
    (["--iterations", "0"], "--iterations"),
])
def test_cli_bad_input(shift_model: Path, tmp_path: Path, capsys, argv, needle) -> None:
    rc = main(["bench", str(shift_model), "--out", str(tmp_path / "o"), "--no-memory",
               *argv])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_source_must_be_an_onnx_model(tmp_path: Path) -> None:
    with pytest.raises(EdgestackError, match="expected an ONNX model"):
        B.run_bench(tmp_path / "nothing.onnx", tmp_path / "o")


@pytest.fixture(scope="module")
def bitstack_package(tmp_path_factory) -> Path:
    """A package of one BitStack linear layer (48 -> 40, 6 blocks)."""
    from targets_cases import random_stack

    from edgestack.package.pack import pack

    rng = np.random.default_rng(5)
    model, _, _ = linear_case(random_stack(rng, (40, 48), 6, 2), 1, 8, rng=rng)
    root = tmp_path_factory.mktemp("pkg")
    onnx.save(model, str(root / "bs.onnx"))
    return pack(root / "bs.onnx", root / "bs.pkg", log=lambda m: None).path


def test_bench_package_measures_tiers(bitstack_package: Path, tmp_path: Path) -> None:
    from edgestack.package import Package

    n_tiers = len(Package.open(bitstack_package).manifest.tiers)
    report = B.run_bench(bitstack_package, tmp_path / "o", tiers=3, iterations=4, warmup=1,
                         log=lambda m: None)
    tiers = [r.tier for r in report.rows]
    assert tiers == B.pick_tiers(n_tiers, 3) and tiers[0] == 0 and tiers[-1] == n_tiers - 1
    # the reference is the largest tier: it matches itself; smaller tiers are close, not equal
    assert report.rows[-1].cosine == pytest.approx(1.0, abs=1e-9)
    assert 0.5 < report.rows[0].cosine < 1.0
    assert all(r.peak_rss_increase and r.iterations >= 4 for r in report.rows)
    budgets = [r.disk_bytes for r in report.rows]
    assert budgets == sorted(budgets)


def test_bench_package_of_unavailable_target_skips(bitstack_package: Path, tmp_path: Path,
                                                    capsys) -> None:
    import shutil

    pkg = tmp_path / "trt.pkg"
    shutil.copytree(bitstack_package, pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["target"] = "tensorrt-gpu"          # manifest.json is not hashed in `files`
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    rc = main(["bench", str(pkg), "--out", str(tmp_path / "o"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 4 and not doc["ok"] and "tensorrt" in doc["skipped"]["tensorrt-gpu"]


def test_pick_tiers() -> None:
    assert B.pick_tiers(10, 3) == [0, 4, 9]        # round(4.5) == 4
    assert B.pick_tiers(4, 10) == [0, 1, 2, 3]
    assert B.pick_tiers(7, "all") == list(range(7))
    assert B.pick_tiers(7, 1) == [6]


def test_example_feeds_refuse_inputs_they_cannot_make(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from edgestack.errors import TargetError
    from edgestack.targets.feeds import example_feeds

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["y"])], "g",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [1])])
    with pytest.raises(TargetError, match="'text'.*give the inputs explicitly"):
        example_feeds(helper.make_model(graph))
