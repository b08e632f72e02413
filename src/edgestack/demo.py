"""The demo: the main job of edgestack on the embedded default model.

all-MiniLM-L6-v2 (real weights, offline, from an installed package) goes through the whole
toolchain, and everything lands in one folder:

1. **compress** with each method and **export** to ONNX with edgestack ops (parity against
   the compressed torch model), measuring stored bytes and embedding quality vs the fp32
   model on the shipped sentence set;
2. **compile** every exported model for every target this machine can run, with the same
   inputs through each backend against the x86 reference (targets it cannot run are listed
   with the reason);
3. **pack** the BitStack model into a device package and **run** it with the runtime manager
   at three memory budgets spread over its tier range (plan, measured peak RSS, quality);
4. **bench** the compiled models and the package tiers against the baselines a user would
   otherwise pick (ORT fp32, dynamic int8 per-tensor / per-channel, weight-only
   MatMulNBits int8 / int4, OpenVINO f32 / bf16), latency timed
   interleaved in one process, memory in fresh processes;
5. **report**: ``report.md`` and ``report.json`` with every table, and PNG plots.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

#: GPTQ statistics (shift rounding, BitStack signs) from the whole shipped corpus: 836
#: sentences (``extra_texts``) instead of the 128 calibration batches (docs/quality.md)
DEFAULT_METHODS: dict[str, dict[str, Any]] = {
    "none": {},
    "shift": {"bits": 4, "zero": True, "rounding": "gptq", "extra_texts": 836},
    "bitstack": {"n_blocks": 5, "factor_bits": 0.125, "signs": "gptq", "extra_texts": 836},
    "lowrank": {"energy": 0.99, "max_keep": 0.9},
    "prune": {"ratio": 0.1, "metric": "fluctuation", "adaptive": True},
}

#: Lowering options per target for the parity step: shift weights as exact int8 weights
#: (fp32 activations, so parity holds at fp32 tolerance). The fast int8-activation variant
#: (``int8=dynamic``) is measured by the bench step, with its quality (it is lossy: dynamic
#: per-tensor activation quantization, like ORT's own quantize_dynamic).
TARGET_OPTIONS: dict[str, dict[str, Any]] = {"ort-cpu": {"int8": "weights"}}
FAST_OPTIONS: dict[str, dict[str, Any]] = {"shift": {"int8": "dynamic"}}
BENCH_TARGETS = ("ort-cpu", "openvino-cpu")


@dataclass
class DemoResult:
    """What the demo measured: ``rows`` (one per method), ``targets`` (parity per method and
    target), ``runtime`` (package at each budget), ``bench`` (the bench report dict)."""

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    runtime: list[dict[str, Any]] = field(default_factory=list)
    bench: dict[str, Any] = field(default_factory=dict)
    package: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    reference_embeddings: Any = field(default=None, repr=False)
    held_batches: list[Any] = field(default_factory=list, repr=False)   # tokenized sentences
    plots: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.md"

    @property
    def ok(self) -> bool:
        return (all(r["parity_passed"] for r in self.rows)
                and all(t["status"] in ("pass", "skipped") for t in self.targets)
                and all(r.get("ok", True) for r in self.runtime))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "environment": self.environment, "seconds": round(self.seconds, 1),
                "timings": self.timings, "methods": self.rows, "targets": self.targets,
                "runtime": self.runtime, "package": self.package, "bench": self.bench, "skipped": self.skipped,
                "plots": self.plots}


def _environment() -> dict[str, Any]:
    import os
    import platform

    import onnxruntime
    import torch

    import edgestack

    env = {"edgestack": edgestack.__version__, "python": platform.python_version(),
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import openvino

        env["openvino"] = openvino.__version__
    except ImportError:
        pass
    return env


def run_demo(out_dir: str | Path = "edgestack-demo", methods: dict[str, dict] | None = None,
             seq: int = 128, threads: int = 2, iterations: int = 20,
             targets: tuple[str, ...] | str = "all", n_budgets: int = 3, bench: bool = True,
             log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo and write ``out_dir/report.md``, ``report.json`` and plots.

    Args:
        out_dir: Folder for the report, models, artifacts and packages (replaced).
        methods: Method name -> compress() options (default :data:`DEFAULT_METHODS`); the
            first is the fp32 reference and must be ``none``.
        seq: Sequence length of the exported models.
        threads: Intra-op threads for every backend.
        iterations: Timed calls per bench subject.
        targets: Target names or ``"all"`` for the compile/parity step.
        n_budgets: Memory budgets the runtime runs the BitStack package at.
        bench: Run the bench step (latency and memory vs baselines).
        log: Progress callback.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    (out / "models").mkdir(parents=True)
    methods = dict(DEFAULT_METHODS if methods is None else methods)
    if next(iter(methods), None) != "none":
        methods = {"none": {}, **methods}
    result = DemoResult(out, environment=_environment())

    def step(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        result.timings[name] = round(time.perf_counter() - t0, 1)
        return value

    models = step("compress+export", lambda: _methods_step(result, methods, seq, threads, log))
    step("targets", lambda: _targets_step(result, models, targets, log))
    package = None
    if "bitstack" in models:
        package = step("pack+runtime",
                       lambda: _runtime_step(result, models["bitstack"], threads, n_budgets,
                                             log))
    if bench:
        step("bench", lambda: _bench_step(result, models, package, threads, iterations, log))
    step("plots", lambda: _plots_step(result))
    result.seconds = time.perf_counter() - t_start
    write_report(result, seq=seq, threads=threads)
    return result


# ---- 1. compress and export ---------------------------------------------------------------
def _methods_step(result: DemoResult, methods: dict[str, dict], seq: int, threads: int,
                  log: Callable[[str], None]) -> dict[str, Path]:
    from edgestack import zoo
    from edgestack.compress import compress
    from edgestack.compress.calib import text_calib
    from edgestack.exporter import export
    from edgestack.profiler.quality import (compare_embeddings, embed, held_sentences,
                                            ort_runner, tokenize)
    from edgestack.targets.ort_cpu import cpu_session

    batches = result.held_batches = tokenize(zoo.minilm_path(), held_sentences(), seq)
    calib = text_calib(zoo.minilm_path(), n=128, seq=64, batch=8)
    ref_emb = None
    models: dict[str, Path] = {}
    for i, (method, opts) in enumerate(methods.items(), 1):
        log(f"[1/5 methods {i}/{len(methods)}] {method} {opts or ''}: compress, export, check")
        model, inputs = zoo.minilm(seq=seq)
        t0 = time.perf_counter()
        report = compress(model, method, calib=calib if method != "none" else None,
                          **({"skip": ["pooler"]} if method != "none" else {}), **opts)
        t_compress = time.perf_counter() - t0
        path = result.out_dir / "models" / f"minilm-{method}.onnx"
        t0 = time.perf_counter()
        res = export(model, inputs, path, metadata={"compression": report})
        t_export = time.perf_counter() - t0
        sess = cpu_session(path, threads)
        emb = embed(ort_runner(sess), batches)
        if ref_emb is None:
            ref_emb = result.reference_embeddings = emb  # "none": the fp32 reference
        quality = compare_embeddings(ref_emb, emb)
        files = [path, Path(str(path) + ".data")]
        row = {
            "method": method, "options": opts,
            "layers_compressed": len(report.layers),
            "dense_bytes": report.dense_bytes, "compressed_bytes": report.compressed_bytes,
            "bits_per_weight": round(report.bits_per_weight, 3) if report.layers else 32.0,
            "onnx_file_bytes": sum(f.stat().st_size for f in files if f.exists()),
            "parity_passed": bool(res.parity.passed),
            "parity_max_rel": max(o["max_rel"] for o in res.parity.to_dict()["outputs"]),
            "cosine_vs_fp32": round(quality["cosine_mean"], 5),
            "spearman_vs_fp32": round(quality["spearman_pairwise"], 5),
            "compress_s": round(t_compress, 1), "export_s": round(t_export, 1),
        }
        result.rows.append(row)
        models[method] = path
        log(f"    {row['bits_per_weight']} bits/weight, cosine {row['cosine_vs_fp32']}, "
            f"parity {'ok' if row['parity_passed'] else 'FAILED'}")
    return models


# ---- 2. compile for every target, parity ----------------------------------------------------
def _targets_step(result: DemoResult, models: dict[str, Path], targets: Any,
                  log: Callable[[str], None]) -> None:
    from edgestack.targets import TARGET_NAMES, get_target
    from edgestack.targets.parity import Case, cross_check

    names = list(TARGET_NAMES) if targets == "all" else list(targets)
    for name in names:
        ok, why = get_target(name).available()
        if not ok:
            result.skipped[name] = why
            log(f"[2/5 targets] {name}: skipped ({why})")
    log(f"[2/5 targets] compiling {len(models)} models for "
        f"{', '.join(n for n in names if n not in result.skipped) or 'no target'} ...")
    feeds = result.held_batches[0]                       # a real sentence
    cases = [Case(m, p, dict(feeds)) for m, p in models.items()]
    reports = cross_check(cases, names, options=TARGET_OPTIONS,
                          work_dir=result.out_dir / "targets")
    for rep in reports:
        for chk in rep.checks:
            worst = min((o.cosine for o in chk.outputs), default=None)
            rel = max((o.max_rel for o in chk.outputs), default=None)
            result.targets.append({"method": rep.case, "target": chk.target,
                                   "status": chk.status, "precision": chk.precision,
                                   "cosine": worst, "max_rel": rel, "reason": chk.reason,
                                   "seconds": chk.seconds})
    bad = [t for t in result.targets if t["status"] not in ("pass", "skipped")]
    log(f"[2/5 targets] {len(result.targets) - len(bad)} checks passed or skipped, "
        f"{len(bad)} failed")


def _artifact_dir(result: DemoResult, method: str, target: str) -> Path:
    index = [r["method"] for r in result.rows].index(method)
    return result.out_dir / "targets" / f"{index}_{method}" / target


# ---- 3. pack and run with the runtime manager ---------------------------------------------
def _runtime_step(result: DemoResult, model: Path, threads: int, n_budgets: int,
                  log: Callable[[str], None]) -> list[Any]:
    """Pack the BitStack model, run it at ``n_budgets`` budgets spread over its tiers (each
    tier's smallest plan); returns the package subjects for the bench, memory measured."""
    import numpy as np

    from edgestack.package.archive import write_archive
    from edgestack.package.pack import pack
    from edgestack.profiler.bench import measure_memory, package_subjects
    from edgestack.profiler.quality import compare_embeddings, embed
    from edgestack.runtime import Runtime

    pkg_dir = result.out_dir / "packages" / "minilm-bitstack"
    log(f"[3/5 runtime] packing {model.name} -> {pkg_dir} (and .tar) ...")
    packed = pack(model, pkg_dir, target="ort-cpu", name="all-MiniLM-L6-v2-bitstack")
    write_archive(pkg_dir, pkg_dir.with_suffix(".tar"))
    subjects, _, _, top = package_subjects(pkg_dir, n_budgets, log, threads)
    batches = result.held_batches
    feeds_dir = result.out_dir / "packages" / "work"
    feeds_dir.mkdir(parents=True, exist_ok=True)
    np.savez(feeds_dir / "feeds.npz", **batches[0])
    for subj in subjects:
        budget = subj.options["budget"]
        log(f"[3/5 runtime] budget {budget / 1e6:.1f} MB ...")
        rt = Runtime(pkg_dir, budget=budget, threads=threads)
        try:
            emb = embed(lambda f: next(iter(rt.infer(f).values())), batches)
            test = rt.self_test()
            row = {"budget_mb": round(budget / 1e6, 1), "tier": rt.tier,
                   "n_tiers": top + 1, "bits_per_weight": round(subj.options["bits"], 3),
                   "plan_mb": round(rt.plan.total / 1e6, 2),
                   "materialized_layers": len(rt.plan.materialized),
                   "self_test": test.get("passed"),   # judged at the golden tier only
                   "cosine_vs_fp32": round(
                       compare_embeddings(result.reference_embeddings, emb)["cosine_mean"], 5)}
        finally:
            rt.close()
        subj.label = f"bitstack package {row['budget_mb']} MB (tier {row['tier']})"
        subj.memory = measure_memory(subj, feeds_dir / "feeds.npz")
        row["rss_increase_mb"] = round(subj.memory["increase"] / 1e6, 2)
        row["load_s"] = round(subj.memory["load_s"], 2)
        row["ok"] = row["self_test"] is not False and subj.memory["increase"] <= budget
        result.runtime.append(row)
        log(f"    tier {row['tier']}/{top}: {row['bits_per_weight']} bits/weight, "
            f"plan {row['plan_mb']} MB, peak RSS +{row['rss_increase_mb']} MB, cosine "
            f"{row['cosine_vs_fp32']}")
    result.package = {"path": str(pkg_dir), "archive": str(pkg_dir.with_suffix(".tar")),
                      **packed.to_dict()}
    return subjects


# ---- 4. bench -------------------------------------------------------------------------------
def _bench_step(result: DemoResult, models: dict[str, Path], package: Any,
                threads: int, iterations: int, log: Callable[[str], None]) -> None:
    from edgestack.profiler.bench import (BenchReport, QualityProbe, Subject, _files_bytes,
                                          baseline_subjects, measure_subjects,
                                          reference_handle, write_report)
    from edgestack.profiler.quality import sentence_feeds
    from edgestack.targets import get_target
    from edgestack.targets.base import Artifact

    out = result.out_dir / "bench"
    work = out / "work"
    dense = models["none"]
    feeds = result.held_batches[0]                       # the first held sentence: timing
    ref = reference_handle(dense, threads=threads)
    try:                                                 # quality: every held sentence
        reference = ref.infer(feeds)
        probe = QualityProbe.build(feeds, reference, ref.infer,
                                   sentence_feeds(result.held_batches, feeds))
    finally:
        ref.close()
    log("[4/5 bench] building baselines ...")
    subjects, skipped = baseline_subjects(dense, work / "baselines", threads,
                                          lambda m: log(f"[4/5 bench] {m}"))
    for method in models:
        if method == "none":
            continue
        for target in BENCH_TARGETS:
            folder = _artifact_dir(result, method, target)
            if not (folder / "artifact.json").is_file():
                continue
            art = Artifact.load(folder)
            art.options["threads"] = threads
            art.save()
            subjects.append(Subject(f"{method} {target} {art.precision}", "artifact",
                                    str(folder), target, precision=art.precision,
                                    disk_bytes=_files_bytes(folder)))
    for method, opts in FAST_OPTIONS.items():
        if method in models:
            art = get_target("ort-cpu").lower(models[method], work / f"{method}-fast", None,
                                              threads=threads, **opts)
            subjects.append(Subject(f"{method} ort-cpu {art.precision} (int8 activations)",
                                    "artifact", str(art.folder), "ort-cpu",
                                    precision=art.precision,
                                    disk_bytes=_files_bytes(art.folder)))
    if package is not None:
        subjects.extend(package)
    rows = measure_subjects(subjects, feeds, reference, work, quality=probe,
                            iterations=iterations, warmup=3,
                            log=lambda m: log(f"[4/5 bench] {m}"))
    report = BenchReport("all-MiniLM-L6-v2 (edgestack demo)", rows, skipped,
                         {"threads": threads, "iterations": iterations,
                          "inputs": {k: list(v.shape) for k, v in feeds.items()},
                          "reference": "ORT fp32 of the uncompressed model",
                          "metric": probe.metric, "ratio_base": "ORT fp32"})
    write_report(report, out)
    result.bench = report.to_dict()
    by_label = {r.label: r for r in rows}
    for row, subj in zip(result.runtime, package or []):
        if subj.label in by_label:
            row["p50_ms"] = round(by_label[subj.label].p50_ms, 2)
    result.plots.update({k: v for k, v in report.files.items() if k.endswith("plot")})


# ---- 5. plots and report ------------------------------------------------------------------
def _plots_step(result: DemoResult) -> None:
    from edgestack.profiler.plots import plot_quality_vs_bits

    points = [(r["method"], r["bits_per_weight"], r["cosine_vs_fp32"]) for r in result.rows]
    tiers = [(f"bitstack {r['budget_mb']} MB", r["bits_per_weight"], r["cosine_vs_fp32"])
             for r in result.runtime if r.get("cosine_vs_fp32") is not None]
    result.plots["quality_vs_bits_plot"] = plot_quality_vs_bits(
        points, tiers, result.out_dir / "quality_vs_bits.png")


def _fmt(value: Any, spec: str, empty: str = "") -> str:
    return empty if value is None else format(value, spec)


def write_report(result: DemoResult, seq: int, threads: int) -> None:
    """Write report.md and report.json into ``result.out_dir``."""
    from edgestack.profiler.quality import held_sentences

    out = result.out_dir
    (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    lines = [
        "# edgestack demo report",
        "",
        f"Model: all-MiniLM-L6-v2 (real weights), batch 1, seq {seq}; {threads} threads. "
        f"Made by `edgestack demo` in {result.seconds:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in result.timings.items())}).",
        "",
        "## 1. Compression (quality vs the fp32 model)",
        "",
        f"Quality: mean-pooled sentence-embedding cosine vs the fp32 model on the "
        f"{len(held_sentences())} shipped sentences, and Spearman correlation of their pairwise "
        "similarities. Bits/weight and compressed MB cover the compressed layers only "
        "(embeddings, norms and the pooler stay fp32); the file size is the whole ONNX model.",
        "",
        "| method | options | bits/weight | compressed MB | ONNX file MB | cosine | Spearman "
        "| export parity max rel | compress s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result.rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        lines.append(
            f"| {r['method']} | {opts} | {r['bits_per_weight']} | "
            f"{r['compressed_bytes'] / 1e6:.2f} | {r['onnx_file_bytes'] / 1e6:.2f} | "
            f"{r['cosine_vs_fp32']:.4f} | {r['spearman_vs_fp32']:.4f} | "
            f"{r['parity_max_rel']:.1e}{'' if r['parity_passed'] else ' FAIL'} | "
            f"{r['compress_s']} |")
    lines += ["", "## 2. Targets (same inputs, every backend vs the x86 reference)", "",
              "| method | target | precision | result | worst cosine | max rel | s |",
              "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for t in result.targets:
        if t["status"] == "skipped":
            continue
        lines.append(f"| {t['method']} | {t['target']} | {t['precision']} | {t['status']}"
                     f"{' (' + t['reason'] + ')' if t['reason'] else ''} | "
                     f"{_fmt(t['cosine'], '.6f')} | {_fmt(t['max_rel'], '.2e')} | "
                     f"{t['seconds']} |")
    if result.runtime:
        lines += ["", "## 3. Runtime manager: the BitStack package at three budgets", "",
                  "| budget MB | tier | bits/weight | plan MB | peak RSS increase MB | "
                  "cosine vs fp32 | p50 ms |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in result.runtime:
            lines.append(f"| {r['budget_mb']} | {r['tier']} | {_fmt(r.get('bits_per_weight'), '.2f')} "
                         f"| {_fmt(r.get('plan_mb'), '.1f')} | "
                         f"{_fmt(r.get('rss_increase_mb'), '.1f')} | "
                         f"{_fmt(r.get('cosine_vs_fp32'), '.4f')} | "
                         f"{_fmt(r.get('p50_ms'), '.2f')} |")
    if result.bench:
        from edgestack.profiler.bench import BenchReport, Row

        rows = [Row(**{k: v for k, v in r.items()}) for r in result.bench["rows"]]
        md = BenchReport("", rows, {}, result.bench["settings"]).markdown()
        lines += ["", "## 4. Bench: latency and memory vs the baselines", "",
                  "Latency timed interleaved in one process on the first held sentence "
                  "(ratio vs ORT fp32 of the uncompressed model); peak RSS increase and load "
                  "time each in a fresh process; quality: the masked mean-pooled "
                  "sentence-embedding cosine vs ORT fp32 of the uncompressed model, mean over "
                  "the held sentences (the metric of section 1); max abs: the largest output "
                  "error on the first held sentence.", "", md]
    if result.plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{k}]({Path(v).relative_to(out)})" for k, v in result.plots.items()]
    if result.skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- {k}: {v}" for k, v in result.skipped.items()]
    env = result.environment
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    (out / "report.md").write_text("\n".join(lines))
