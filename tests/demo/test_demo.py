"""The demo end to end on a small configuration (MiniLM at seq 16, two methods, ort-cpu)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgestack.demo import run_demo


@pytest.mark.slow
def test_demo_writes_report_plots_packages(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_demo(out, methods={"none": {}, "bitstack": {"n_blocks": 2, "act_aware": False,
                                                            "signs": "plain"}},
                      seq=16, threads=2, iterations=3, targets=("ort-cpu", "tensorrt-gpu"),
                      n_budgets=2, log=lambda m: None)
    assert result.ok, result.to_dict()
    md = (out / "report.md").read_text()
    for heading in ("## 1. Compression", "## 2. Targets", "## 3. Runtime manager",
                    "## 4. Bench", "## Skipped"):
        assert heading in md
    assert "tensorrt-gpu" in result.skipped               # not installable here: listed
    doc = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in doc["methods"]] == ["none", "bitstack"]
    assert {(t["method"], t["target"], t["status"]) for t in doc["targets"]} >= {
        ("none", "ort-cpu", "pass"), ("bitstack", "ort-cpu", "pass")}
    # two budgets: the smallest and the largest tier, each fitted and measured in its budget
    rt = doc["runtime"]
    assert len(rt) == 2 and rt[0]["tier"] == 0 and rt[1]["tier"] == rt[1]["n_tiers"] - 1
    for row in rt:
        assert row["rss_increase_mb"] <= row["budget_mb"] and row["ok"]
    assert rt[0]["bits_per_weight"] < rt[1]["bits_per_weight"]
    assert rt[0]["cosine_vs_fp32"] < rt[1]["cosine_vs_fp32"] <= 1.0
    labels = [r["label"] for r in doc["bench"]["rows"]]
    assert labels[0] == "ORT fp32" and any(lb.startswith("bitstack package") for lb in labels)
    for key in ("latency_plot", "quality_plot", "quality_vs_bits_plot"):
        data = Path(doc["plots"][key]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "packages" / "minilm-bitstack" / "manifest.json").is_file()
    assert (out / "packages" / "minilm-bitstack.tar").is_file()
