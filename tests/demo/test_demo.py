"""The demo: budget choice and checks on synthetic results (fast), the output folder's
replacement and scratch cleanup (fast: the steps stubbed), then the demo end to end on a small
configuration (MiniLM at seq 16, two methods, ort-cpu, three baselines) and through the CLI with
``--keep-work`` (one method, no bench)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgestack import demo as demo_module
from edgestack.cli import main
from edgestack.demo import WORK, DemoResult, output_files, run_demo, runtime_budgets, write_report
from edgestack.errors import EdgestackError

MiB = 2**20


# ---- budgets --------------------------------------------------------------------------------
def test_runtime_budgets_one_per_baseline_point_at_or_above_the_smallest_plan() -> None:
    plan = 30 * MiB
    smallest = plan + MiB
    budgets, per = runtime_budgets({"fp32": 90 * MiB, "int8": 20 * MiB, "int4": 25 * MiB,
                                    "ov f32": 90 * MiB, "edge": plan}, plan, smallest)
    assert budgets == [plan, smallest, 90 * MiB]         # distinct points, ascending
    assert per == {"fp32": 90 * MiB, "int8": None, "int4": None, "ov f32": 90 * MiB,
                   "edge": plan}                         # at exactly the plan: served


def test_runtime_budgets_without_baselines_is_the_smallest_budget() -> None:
    assert runtime_budgets({}, 10, 11) == ([11], {})
    assert runtime_budgets({"a": 11}, 10, 11) == ([11], {"a": 11})


# ---- checks and ok ------------------------------------------------------------------------
def _runtime_row(budget: int, increase: int | None, **kw: object) -> dict:
    row = {"budget": budget, "budget_mb": round(budget / 1e6, 2), "for": "x", "tier": 0,
           "n_tiers": 3, "forms": {"int8": 2, "fp32": 0, "on-the-fly": 1},
           "bits_per_weight": 1.5, "plan_mb": budget / 1e6 - 1, "rss_increase": increase,
           "rss_increase_mb": None if increase is None else increase / 1e6,
           "cosine_vs_fp32": 0.9, "p50_ms": 1.0, "self_test": None, "error": None,
           "label": f"pkg {budget}", "ok": increase is not None and increase <= budget}
    row.update(kw)
    return row


def _result(tmp_path: Path, runtime: list[dict], baselines: list[dict] | None = None
            ) -> DemoResult:
    result = DemoResult(tmp_path)
    result.rows = [{"method": "none", "options": {}, "parity_passed": True,
                    "parity_max_rel": 1e-6, "bits_per_weight": 32.0, "compressed_bytes": 0,
                    "onnx_file_bytes": 1, "cosine_vs_fp32": 1.0, "spearman_vs_fp32": 1.0,
                    "compress_s": 0.0}]
    result.targets = [{"method": "none", "target": "ort-cpu", "status": "pass", "reason": "",
                       "precision": "fp32", "cosine": 1.0, "max_rel": 0.0, "seconds": 0.1},
                      {"method": "none", "target": "tensorrt-gpu", "status": "skipped",
                       "reason": "no GPU", "precision": "", "cosine": None, "max_rel": None,
                       "seconds": 0.0}]
    result.skipped = {"tensorrt-gpu": "no GPU"}
    result.runtime = runtime
    result.baselines = baselines or []
    result.package = {"smallest_plan_mb": 30.0}
    return result


def test_baseline_below_the_smallest_plan_is_reported_not_failed(tmp_path: Path) -> None:
    rows = [_runtime_row(31_000_000, 29_000_000), _runtime_row(90_000_000, 60_000_000)]
    baselines = [{"label": "ORT int8", "precision": "int8", "rss_increase": 20_000_000,
                  "rss_increase_mb": 20.0, "budget_mb": None, "runtime_label": None,
                  "does_not_fit": "does not fit: smallest plan 30.00 MB"},
                 {"label": "ORT fp32", "precision": "fp32", "rss_increase": 90_000_000,
                  "rss_increase_mb": 90.0, "budget_mb": 90.0, "quality": 1.0, "p50_ms": 2.0,
                  "runtime_label": "pkg 90000000", "latency_ratio": 0.5,
                  "does_not_fit": None}]
    result = _result(tmp_path, rows, baselines)
    assert result.ok
    names = [c["check"] for c in result.checks]
    assert not any("int8" in n or "tensorrt" in n for n in names)   # not checks
    assert sum("peak RSS increase <= budget" in n for n in names) == 2
    write_report(result, seq=16, threads=2)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# edgestack demo report\n\n## What passed / what failed\n")
    assert "**PASS**: all 4 checks held." in md
    assert "- ORT int8 (+20.00 MB): does not fit: smallest plan 30.00 MB" in md
    assert "| ORT fp32 | 90.00 | 1.00000 | 2.00 | 90.00 MB budget | 0 | 2 int8, 1 on-the-fly" \
        in md
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True


def test_runtime_row_over_its_budget_fails_the_demo(tmp_path: Path) -> None:
    result = _result(tmp_path, [_runtime_row(31_000_000, 29_000_000),
                                _runtime_row(40_000_000, 40_004_096)])
    assert not result.ok
    failed = [c for c in result.checks if not c["passed"]]
    assert [c["check"] for c in failed] == ["runtime at 40.00 MB (x): peak RSS increase <= "
                                            "budget"]
    write_report(result, seq=16, threads=2)
    md = (tmp_path / "report.md").read_text()
    assert "**FAIL**: 1 of 4 checks failed" in md
    assert "| runtime at 40.00 MB (x): peak RSS increase <= budget | FAIL |" in md
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is False


def test_refused_budget_and_failed_self_test_fail_the_demo(tmp_path: Path) -> None:
    refused = _runtime_row(31_000_000, None, error="BudgetError: below", tier=None,
                           forms=None, ok=False)
    assert not _result(tmp_path, [refused]).ok
    bad_test = _runtime_row(31_000_000, 29_000_000, self_test=False)
    result = _result(tmp_path, [bad_test])
    assert not result.ok
    assert [c["check"] for c in result.checks if not c["passed"]] == [
        "runtime at 31.00 MB (x): self-test"]
    parity = _result(tmp_path, [])
    parity.rows[0]["parity_passed"] = False
    assert not parity.ok


# ---- the output folder: replaced, scratch removed -------------------------------------------
def _tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_report_files_section_lists_every_file_with_its_measured_size(tmp_path: Path) -> None:
    result = _result(tmp_path, [_runtime_row(31_000_000, 29_000_000)])
    (tmp_path / "packages" / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "packages" / "pkg" / "sub" / "blocks.bin").write_bytes(b"x" * 150_000)
    (tmp_path / "packages" / "pkg.tar").write_bytes(b"y" * 1000)
    result.files = output_files(tmp_path)
    write_report(result, seq=16, threads=2)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["files"] == output_files(tmp_path)          # its own size included, exact
    by_path = {f["path"]: f["bytes"] for f in doc["files"]}
    assert by_path["packages/pkg/"] == 150_000 and by_path["packages/pkg.tar"] == 1000
    assert by_path["report.json"] == (tmp_path / "report.json").stat().st_size
    assert doc["output_bytes"] == _tree_bytes(tmp_path) == sum(by_path.values())
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# edgestack demo report\n\n## What passed / what failed\n")
    files = md[md.index("## Files"):]
    assert "| `packages/pkg/` | 150.0 kB |  |" in files
    assert "| `packages/pkg.tar` | 1.0 kB |  |" in files
    assert f"| `report.md` | {(tmp_path / 'report.md').stat().st_size / 1e3:.1f} kB | this " \
        "report |" in files


def test_output_folder_that_is_not_a_demo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(EdgestackError, match="is not a demo's output .* found thesis.tex"):
        run_demo(tmp_path, log=lambda m: None)
    assert (tmp_path / "thesis.tex").read_text() == "mine"   # untouched
    with pytest.raises(EdgestackError, match="is a file"):
        run_demo(tmp_path / "thesis.tex", log=lambda m: None)


@pytest.mark.parametrize("keep_work", [False, True])
def test_scratch_removed_when_a_step_raises_unless_kept(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        keep_work: bool) -> None:
    out = tmp_path / "demo"
    (out / WORK / "targets").mkdir(parents=True)           # a killed run's leftovers
    (out / WORK / "targets" / "stale.onnx").write_bytes(b"0" * 100)

    def methods_step(result: DemoResult, *args: object) -> None:
        assert not (result.work_dir / "targets").exists()  # the leftovers went first
        (result.work_dir / "models" / "minilm-none.onnx").write_bytes(b"1" * 100)
        raise RuntimeError("export broke")

    monkeypatch.setattr(demo_module, "_methods_step", methods_step)
    with pytest.raises(RuntimeError, match="export broke"):
        run_demo(out, keep_work=keep_work, log=lambda m: None)
    assert (out / WORK / "models" / "minilm-none.onnx").is_file() == keep_work
    assert (out / WORK).exists() == keep_work


# ---- the demo, reduced ----------------------------------------------------------------------
BASELINES = ("ORT fp32", "ORT dynamic int8 per-tensor", "OpenVINO f32")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    out = tmp_path_factory.mktemp("demo") / "demo"
    return run_demo(out, methods={"none": {}, "bitstack": {"n_blocks": 2, "act_aware": False,
                                                          "signs": "plain"}},
                    seq=16, threads=2, iterations=3, targets=("ort-cpu", "tensorrt-gpu"),
                    baselines=BASELINES, log=lambda m: None)


@pytest.mark.slow
def test_demo_writes_report_plots_packages(demo: DemoResult) -> None:
    out = demo.out_dir
    md = (out / "report.md").read_text()
    assert md.startswith("# edgestack demo report\n\n## What passed / what failed\n")
    for heading in ("## 1. Compression", "## 2. Targets", "## 3. Runtime manager",
                    "## 4. At each baseline's memory", "## 5. Bench", "## Skipped"):
        assert heading in md
    assert "tensorrt-gpu" in demo.skipped               # not installable here: listed
    doc = json.loads((out / "report.json").read_text())
    assert doc["ok"] == demo.ok == all(c["passed"] for c in doc["checks"])
    for c in doc["checks"]:                              # every check in the summary
        assert f"| {c['check']} | {'PASS' if c['passed'] else 'FAIL'} |" in md
    assert [r["method"] for r in doc["methods"]] == ["none", "bitstack"]
    assert {(t["method"], t["target"], t["status"]) for t in doc["targets"]} >= {
        ("none", "ort-cpu", "pass"), ("bitstack", "ort-cpu", "pass")}
    labels = [r["label"] for r in doc["bench"]["rows"]]
    assert labels[:len(BASELINES)] == list(BASELINES)
    assert any(lb.startswith("bitstack package") for lb in labels)
    for key in ("latency_plot", "quality_plot", "quality_vs_bits_plot"):
        data = Path(doc["plots"][key]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "packages" / "minilm-bitstack" / "manifest.json").is_file()
    assert (out / "packages" / "minilm-bitstack.tar").is_file()


@pytest.mark.slow
def test_demo_keeps_the_report_package_and_model_not_the_scratch(demo: DemoResult) -> None:
    out = demo.out_dir
    assert not (out / WORK).exists() and not demo.keep_work
    assert sorted(p.name for p in out.iterdir()) == [
        "bench", "models", "packages", "quality_vs_bits.png", "report.json", "report.md"]
    assert [p.name for p in (out / "models").iterdir()] == ["minilm-bitstack.onnx"]
    assert not list((out / "bench").glob("*/"))             # the bench's work went with WORK
    doc = json.loads((out / "report.json").read_text())
    assert doc["files"] == output_files(out) and doc["keep_work"] is False
    listed = {f["path"]: f["bytes"] for f in doc["files"]}
    assert listed["packages/minilm-bitstack/"] == _tree_bytes(out / "packages/minilm-bitstack")
    assert listed["models/minilm-bitstack.onnx"] == (
        out / "models" / "minilm-bitstack.onnx").stat().st_size
    assert all(f["what"] for f in doc["files"])             # each kept file is described
    md = (out / "report.md").read_text()
    files = md[md.index("## Files"):]
    for f in doc["files"]:
        assert f"| `{f['path']}` | " in files
    # the folder: the package (folder and archive) and the kept model, plus reports and plots
    kept = sum(listed[p] for p in ("packages/minilm-bitstack/", "packages/minilm-bitstack.tar",
                                   "models/minilm-bitstack.onnx"))
    total = _tree_bytes(out)
    assert total == doc["output_bytes"] == sum(listed.values())
    assert total < kept + 2_000_000, (total, kept)


@pytest.mark.slow
def test_cli_keep_work_keeps_the_scratch_and_lists_it(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--methods", "none", "--targets", "ort-cpu",
            "--no-bench", "--seq", "16"]
    assert main([*args, "--keep-work"]) == 0
    printed = capsys.readouterr().out
    assert (out / WORK / "models" / "minilm-none.onnx").is_file()
    assert (out / WORK / "targets" / "0_none" / "ort-cpu" / "artifact.json").is_file()
    doc = json.loads((out / "report.json").read_text())
    listed = {f["path"]: f["bytes"] for f in doc["files"]}
    assert listed[f"{WORK}/"] == _tree_bytes(out / WORK) > 0 and doc["keep_work"] is True
    assert doc["output_bytes"] == _tree_bytes(out)
    assert printed.rstrip().endswith(f"output folder {out.resolve()}: "
                                     f"{doc['output_bytes'] / 1e6:.1f} MB (scratch work/ "
                                     "kept: --keep-work)")
    md = (out / "report.md").read_text()
    assert f"| `{WORK}/` | {listed[f'{WORK}/'] / 1e6:.1f} MB | scratch kept" in md
    # the same folder again (an earlier demo's: --overwrite), without --keep-work: the
    # scratch goes, the report stays
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [   # no bench, no package, no model
        "quality_vs_bits.png", "report.json", "report.md"]
    assert "(scratch work removed; --keep-work keeps it)" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_budgets_are_the_baselines_memory(demo: DemoResult) -> None:
    doc = json.loads((demo.out_dir / "report.json").read_text())
    smallest_plan = doc["package"]["smallest_plan_mb"]
    ort = [r for r in doc["runtime"] if r["engine"] == "onnxruntime"]
    rt = {r["budget"]: r for r in ort if r["form"] == "auto"}
    fast = {r["budget"]: r for r in ort if r["form"] == "int8"}
    ov = {r["budget"]: r for r in doc["runtime"] if r["engine"] == "openvino"}
    assert set(fast) <= set(rt) and set(ov) <= set(rt)
    assert len(doc["runtime"]) == len(rt) + len(fast) + len(ov)
    assert [b["label"] for b in doc["baselines"]] == list(BASELINES)
    # the smallest budget (tier 0's smallest plan + 1 MiB) is always run, and serves the
    # largest tier the planner fits in it (int8 plans of every tier are about the same size)
    from edgestack.package import Package
    from edgestack.runtime import calibrate, plan_memory

    # (a baseline may land between the smallest plan and it: the row is found by its label)
    low = next(b for b, r in rt.items() if r["for"].startswith("smallest plan + 1 MiB"))
    with Package.open(doc["package"]["path"]) as pkg:
        expected = plan_memory(pkg, int(low), costs=calibrate(pkg, threads=2)).tier
    assert rt[low]["tier"] == expected and all(b >= smallest_plan * 1e6 for b in rt)
    assert low / 1e6 == pytest.approx(smallest_plan + 2**20 / 1e6, abs=0.01)
    for b in doc["baselines"]:
        assert b["quality"] is not None and b["p50_ms"] > 0
        if b["rss_increase_mb"] < smallest_plan:
            assert b["does_not_fit"] == f"does not fit: smallest plan {smallest_plan:.2f} MB"
            assert b["runtime_label"] is None and b["rss_increase"] not in rt
            continue
        row = rt[b["rss_increase"]]                      # run at exactly its memory
        assert b["label"] in row["for"] and b["runtime_label"] == row["label"]
        assert b["latency_ratio"] == pytest.approx(row["p50_ms"] / b["p50_ms"], rel=0.01)
        # where the planner chose a more exact dense form, the int8 plan runs beside it
        second = fast.get(b["rss_increase"])
        used = {form for form, n in row["forms"].items() if n}
        assert (second is not None) == bool(used & {"nbits8", "fp32"})
        if second is not None:
            assert b["runtime_int8_label"] == second["label"] and second["forms"]["int8"] == 36
            assert b["latency_ratio_int8"] == pytest.approx(second["p50_ms"] / b["p50_ms"],
                                                            rel=0.01)
        # OpenVINO's baseline: the package served by OpenVINO in its precision, beside
        if b["label"].startswith("OpenVINO"):
            third = ov[b["rss_increase"]]
            assert b["runtime_ov_label"] == third["label"] and third["precision"] == "f32"
            assert third["forms"]["on-the-fly"] == 0 and third["ok"]
            assert b["latency_ratio_ov"] == pytest.approx(third["p50_ms"] / b["p50_ms"],
                                                          rel=0.01)
        else:
            assert b["runtime_ov_label"] is None
        assert b["target"] == "met" or b["target"].startswith("missed")
    assert len(rt) == len({b["rss_increase"] for b in doc["baselines"]
                           if b["does_not_fit"] is None} | {low})
    for row in doc["runtime"]:
        assert row["error"] is None
        assert sum(row["forms"].values()) == 36          # MiniLM's BitStack layers
        assert row["plan_mb"] <= row["budget_mb"]
        assert row["ok"] == (row["rss_increase"] <= row["budget"]
                             and row["self_test"] is not False)
        assert 0 < row["cosine_vs_fp32"] <= 1 and row["p50_ms"] > 0
    by_tier = sorted(rt.values(), key=lambda r: r["budget"])
    assert [r["tier"] for r in by_tier] == sorted(r["tier"] for r in by_tier)


@pytest.mark.slow
def test_demo_memory_promise_holds(demo: DemoResult) -> None:
    over = [(r["budget_mb"], r["rss_increase_mb"]) for r in demo.runtime if not r["ok"]]
    assert not over, f"package rows over their budget (budget MB, measured MB): {over}"
    assert demo.ok, [c for c in demo.checks if not c["passed"]]
