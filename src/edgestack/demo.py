"""The demo: the main job of edgestack on the embedded default model.

all-MiniLM-L6-v2 (real weights, offline, from an installed package) goes through the whole
toolchain; the report, the plots and the BitStack package land in one folder a user can keep
(:data:`OUTPUT_FILES`), the scratch work in its ``work/`` folder (:data:`WORK`), removed at the
end unless ``keep_work``:

1. **compress** with each method and **export** to ONNX with edgestack ops (parity against
   the compressed torch model), measuring stored bytes and embedding quality vs the fp32
   model on the shipped sentence set;
2. **compile** every exported model for every target this machine can run, with the same
   inputs through each backend against the x86 reference (targets it cannot run are listed
   with the reason);
3. **baselines**: build the baselines a user would otherwise pick from the dense model (ORT
   fp32, dynamic int8 per-tensor / per-channel, weight-only MatMulNBits int8 / int4,
   OpenVINO f32 / bf16) and measure each one's peak RSS increase in a fresh process;
4. **pack** the BitStack model into a device package and **run** it with the runtime manager
   at a budget equal to each baseline's measured memory (:func:`runtime_budgets`: a
   baseline below the package's smallest plan is reported as not fitting, not run), plus
   the package's smallest budget (tier 0's calibrated plan + 1 MiB): tier and forms chosen,
   plan, measured peak RSS, quality;
5. **bench** the compiled models, the package rows and the baselines, latency timed
   interleaved in one process (memory: the fresh-process measurements of steps 3 and 4);
   then the **report**: ``report.md`` (opening with what passed and what failed) and
   ``report.json`` with every table, and PNG plots.

Without the bench (``bench=False``) no baseline is built and the package runs at the
smallest plan of its first and last tiers (+ 1 MiB each).

The output folder keeps ``report.md``, ``report.json``, the plots (``quality_vs_bits.png``,
``bench/``), the package the runtime served (``packages/``) and the export of
:data:`KEEP_MODEL` when it is at most :data:`KEEP_MODEL_BYTES` (``models/``): about 0.1 GB for
the full demo. Everything else is scratch under ``work/``: every method's export
(``work/models``), the compiled artifacts of every target (``work/targets``), the baselines and
the bench inputs (``work/bench``), several GB for the full demo. It is removed when the demo
ends, passing, failing or raising, unless ``keep_work`` (``bench/runtime_latency.py`` reads the
baselines there); a killed run's ``work/`` goes when the next run replaces the folder. The
report ends with a "Files" section: what the folder holds and each entry's measured size
(:func:`output_files`).

:attr:`DemoResult.ok` (the CLI's exit status) is whether every check held
(:attr:`DemoResult.checks`): export parity, every target check that ran, and for every
package row the runtime's promise, measured peak RSS increase <= budget (and the self-test
where it is judged). A baseline whose memory is below the package's smallest plan is not a
check: the runtime cannot serve it and says so (``BudgetError``); the report lists it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import edgestack
from edgestack import zoo
from edgestack.core.ort import cpu_session
from edgestack.errors import BudgetError, EdgestackError
from edgestack.profiler.plots import plot_quality_vs_bits

#: GPTQ statistics (shift rounding, BitStack signs) from the whole shipped corpus: 836
#: sentences (``extra_texts``) instead of the 128 calibration batches (docs/quality.md)
DEFAULT_METHODS: dict[str, dict[str, Any]] = {
    "none": {},
    "shift": {"bits": 4, "zero": True, "rounding": "gptq", "extra_texts": 836},
    # 12 blocks: the package spans from 34 MB (int8) to the original's quality (cosine 0.998
    # at its top tier, 13.2 bits/weight); its first 5 blocks are the 5-block model (0.9805)
    "bitstack": {"n_blocks": 12, "factor_bits": 0.125, "signs": "gptq", "extra_texts": 836},
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


MB = 1e6

WORK = "work"
"""The scratch folder inside the output folder: removed when the demo ends, unless
``keep_work``."""
KEEP_MODEL = "bitstack"
"""The method whose export the output folder keeps (``models/``): the one packed and served."""
KEEP_MODEL_BYTES = 64 * MB
"""... when its files total at most this (the full demo's BitStack export: 31 MB)."""
OUTPUT_FILES = {
    "report.md": "this report",
    "report.json": "every table and check, for machines",
    "quality_vs_bits.png": "plot: quality vs bits/weight",
    "bench/bench.md": "the bench tables, with edgestack's best subject per baseline memory",
    "bench/bench.json": "the bench rows, for machines",
    "bench/latency_vs_memory.png": "plot: latency vs peak RSS increase",
    "bench/quality_vs_memory.png": "plot: quality vs peak RSS increase",
    "bench/pareto.png": "plot: the bench's Pareto front",
    "packages/minilm-bitstack": "the BitStack device package the runtime served (folder)",
    "packages/minilm-bitstack.tar": "the same package as one archive",
    f"models/minilm-{KEEP_MODEL}.onnx": "the exported BitStack model that was packed",
    WORK: "scratch kept by --keep-work: every export, compiled artifact, baseline",
}
"""What the output folder holds (relative path -> what it is), for the report's "Files"."""


@dataclass
class DemoResult:
    """What the demo measured: ``rows`` (one per method), ``targets`` (parity per method and
    target), ``baselines`` (each baseline's measured memory and the package row run at it),
    ``runtime`` (the package at each budget), ``bench`` (the bench report dict)."""

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    baselines: list[dict[str, Any]] = field(default_factory=list)
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
    keep_work: bool = False
    files: list[dict[str, Any]] | None = None       # None: not measured (output_files)

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.md"

    @property
    def work_dir(self) -> Path:
        """The scratch folder (:data:`WORK`)."""
        return self.out_dir / WORK

    @property
    def output_bytes(self) -> int | None:
        """The output folder's size as last measured (:attr:`files`), or None."""
        return None if self.files is None else sum(f["bytes"] for f in self.files)

    @property
    def checks(self) -> list[dict[str, Any]]:
        """Every check the demo made, ``{"check", "passed", "detail"}``: export parity per
        method, each target check that ran (skipped targets are not checks), and per package
        row the memory promise (measured peak RSS increase <= budget; a budget at or above
        the smallest plan that the runtime refused fails it) and the self-test where it is
        judged. Baselines below the package's smallest plan are not checks."""
        out: list[dict[str, Any]] = []
        for r in self.rows:
            out.append({"check": f"export parity: {r['method']}",
                        "passed": bool(r["parity_passed"]),
                        "detail": f"max rel {r['parity_max_rel']:.1e}"})
        for t in self.targets:
            if t["status"] == "skipped":
                continue
            out.append({"check": f"target {t['target']}: {t['method']}",
                        "passed": t["status"] == "pass",
                        "detail": t["status"] + (f" ({t['reason']})" if t["reason"] else "")})
        for r in self.runtime:
            name = (f"runtime at {r['budget_mb']:.2f} MB ({r['for']})"
                    + (f", form {r['form']}" if r.get("form", "auto") != "auto" else "")
                    + (f", OpenVINO {r.get('precision')}" if r.get("engine") == "openvino"
                       else ""))
            if r.get("error"):
                out.append({"check": f"{name}: served", "passed": False,
                            "detail": r["error"]})
                continue
            out.append({"check": f"{name}: peak RSS increase <= budget",
                        "passed": r["rss_increase_mb"] is not None
                        and r["rss_increase"] <= r["budget"],
                        "detail": f"+{r['rss_increase_mb']:.2f} MB at tier {r['tier']}, "
                                  f"plan {r['plan_mb']:.2f} MB"})
            if r.get("self_test") is not None:
                out.append({"check": f"{name}: self-test", "passed": bool(r["self_test"]),
                            "detail": "judged at the golden tier"})
        return out

    @property
    def ok(self) -> bool:
        """Whether every check held (:attr:`checks`): the CLI's exit status."""
        return all(c["passed"] for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": self.checks, "environment": self.environment,
                "seconds": round(self.seconds, 1), "timings": self.timings,
                "methods": self.rows, "targets": self.targets, "baselines": self.baselines,
                "runtime": self.runtime, "package": self.package, "bench": self.bench,
                "skipped": self.skipped, "plots": self.plots, "keep_work": self.keep_work,
                "files": self.files, "output_bytes": self.output_bytes}


def runtime_budgets(baseline_memory: dict[str, int], smallest_plan: int,
                    smallest_budget: int) -> tuple[list[int], dict[str, int | None]]:
    """The budgets the demo runs the package at: one per distinct baseline memory point
    (bytes of measured peak RSS increase) that is at least ``smallest_plan``, plus
    ``smallest_budget``; ``(budgets ascending, baseline label -> its budget or None when
    below the smallest plan)``."""
    per_baseline = {label: (mem if mem >= smallest_plan else None)
                    for label, mem in baseline_memory.items()}
    budgets = sorted({smallest_budget, *(b for b in per_baseline.values() if b is not None)})
    return budgets, per_baseline


def _environment() -> dict[str, Any]:
    import os
    import platform

    import onnxruntime
    import torch

    from edgestack.core.latency import cpu_extensions  # lazy: numpy at import

    env = {"edgestack": edgestack.__version__, "python": platform.python_version(),
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "machine": platform.machine(), "cpus": os.cpu_count(),
           "cpu extensions": cpu_extensions()}
    try:
        import openvino

        env["openvino"] = openvino.__version__
    except ImportError:
        pass
    return env


def run_demo(out_dir: str | Path = "edgestack-demo", methods: dict[str, dict] | None = None,
             seq: int = 128, threads: int = 2, iterations: int = 20,
             targets: tuple[str, ...] | str = "all", bench: bool = True,
             baselines: tuple[str, ...] | None = None, keep_work: bool = False,
             log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo and write ``out_dir/report.md``, ``report.json``, plots and the package.

    Args:
        out_dir: Folder for the report, plots, package and kept model (replaced when it is
            empty or a demo's output; any other folder is refused).
        methods: Method name -> compress() options (default :data:`DEFAULT_METHODS`); the
            first is the fp32 reference and must be ``none``.
        seq: Sequence length of the exported models.
        threads: Intra-op threads for every backend.
        iterations: Timed calls per bench subject.
        targets: Target names or ``"all"`` for the compile/parity step.
        bench: Build the baselines, run the package at their memory and bench everything
            (latency and memory vs baselines); ``False``: the package runs at the smallest
            plans of its first and last tiers only.
        baselines: Labels (:data:`edgestack.profiler.bench.BASELINES`) of the baselines to
            measure and budget at; ``None``: every baseline that can run here.
        keep_work: Keep the scratch folder ``out_dir/work`` (:data:`WORK`); by default it
            is removed when the demo ends, whether it passed, failed or raised.
        log: Progress callback.

    Raises:
        EdgestackError: ``out_dir`` is a file, or a non-empty folder that is not a demo's
            output.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    _replace_output(out)
    (out / WORK / "models").mkdir(parents=True)
    methods = dict(DEFAULT_METHODS if methods is None else methods)
    if next(iter(methods), None) != "none":
        methods = {"none": {}, **methods}
    result = DemoResult(out, environment=_environment(), keep_work=keep_work)

    def step(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        result.timings[name] = round(time.perf_counter() - t0, 1)
        return value

    try:
        models = step("compress+export",
                      lambda: _methods_step(result, methods, seq, threads, log))
        step("targets", lambda: _targets_step(result, models, targets, log))
        base: tuple[list[Any], dict[str, str]] | None = None
        if bench:
            base = step("baselines", lambda: _baselines_step(result, models["none"], threads,
                                                            baselines, log))
        package = None
        if "bitstack" in models:
            package = step("pack+runtime",
                           lambda: _runtime_step(result, models["bitstack"], threads,
                                                 base[0] if base else None, log))
        if base is not None:
            step("bench", lambda: _bench_step(result, models, base, package, threads,
                                              iterations, log))
        step("plots", lambda: _plots_step(result))
        _keep_model(result, models.get(KEEP_MODEL), log)
    finally:
        if not keep_work:
            shutil.rmtree(result.work_dir, ignore_errors=True)
            if result.work_dir.exists():
                log(f"could not remove the scratch folder {result.work_dir}; remove it by hand")
    result.seconds = time.perf_counter() - t_start
    result.files = output_files(out)
    write_report(result, seq=seq, threads=threads)
    return result


def _replace_output(out: Path) -> None:
    """Remove ``out`` (a previous demo's output, or a killed run's leftovers: its ``work/``)
    so that the demo starts from an empty folder; refuse anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise EdgestackError(f"demo: the output folder {out} is a file; expected a folder. "
                             "To fix: pass --out with a new folder name")
    names = {p.name for p in out.iterdir()}
    if names and not names & {"report.json", "report.md", WORK}:
        raise EdgestackError(
            f"demo: the output folder {out} is not empty and is not a demo's output (it has "
            f"no report.json, report.md or {WORK}/; found {', '.join(sorted(names)[:5])}"
            f"{', ...' if len(names) > 5 else ''}). The demo replaces its output folder. "
            "To fix: pass --out with a new or empty folder, or a previous demo's output")
    shutil.rmtree(out)


def _keep_model(result: DemoResult, model: Path | None, log: Callable[[str], None]) -> None:
    """Put the export of :data:`KEEP_MODEL` (``model``: its path under ``work/models``) in
    ``out/models`` when its files total at most :data:`KEEP_MODEL_BYTES`: moved, or copied
    with ``keep_work`` (the scratch folder stays whole)."""
    from edgestack.exporter.output import is_data_name  # lazy: onnx at import

    if model is None:
        return
    files = [model, *(f for f in model.parent.iterdir()
                      if is_data_name(model.name, f.name))]
    size = sum(f.stat().st_size for f in files)
    if size > KEEP_MODEL_BYTES:
        log(f"not keeping {model.name}: {size / MB:.1f} MB > {KEEP_MODEL_BYTES / MB:.0f} MB")
        return
    dest = result.out_dir / "models"
    dest.mkdir(exist_ok=True)
    for f in files:
        (shutil.copy2 if result.keep_work else shutil.move)(f, dest / f.name)


def output_files(out: Path) -> list[dict[str, Any]]:
    """What the output folder ``out`` holds, measured: each file at its top level and one
    folder down, each folder deeper than that (a package) and the scratch folder
    (:data:`WORK`) as one entry; ``[{"path", "bytes", "what"}]`` in the order of
    :data:`OUTPUT_FILES` (anything else last, by path), ``bytes`` the sum of the files' sizes,
    ``what`` from :data:`OUTPUT_FILES` (empty for anything else)."""

    def size(p: Path) -> int:
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    entries = []
    for top in sorted(out.iterdir()):
        subs = ([top] if top.is_file() or top.name == WORK
                else sorted(top.iterdir()))
        for p in subs:
            rel = p.relative_to(out).as_posix()
            entries.append({"path": rel + ("" if p.is_file() else "/"), "bytes": size(p),
                            "what": OUTPUT_FILES.get(rel, "")})
    order = {rel: i for i, rel in enumerate(OUTPUT_FILES)}
    return sorted(entries, key=lambda e: (order.get(e["path"].rstrip("/"), len(order)),
                                          e["path"]))


# ---- 1. compress and export ---------------------------------------------------------------
def _methods_step(result: DemoResult, methods: dict[str, dict], seq: int, threads: int,
                  log: Callable[[str], None]) -> dict[str, Path]:
    from edgestack.core.quality import (  # lazy: numpy at import
        compare_embeddings,
        embed,
        held_sentences,
        ort_runner,
        tokenize,
    )
    from edgestack.pipeline import compress_and_export  # lazy: numpy at import

    batches = result.held_batches = tokenize(zoo.minilm_path(), held_sentences(), seq)
    ref_emb = None
    models: dict[str, Path] = {}
    for i, (method, opts) in enumerate(methods.items(), 1):
        log(f"[1/5 methods {i}/{len(methods)}] {method} {opts or ''}: compress, export, check")
        path = result.work_dir / "models" / f"minilm-{method}.onnx"
        # the one compress -> export pipeline; calibration: the first 128 corpus sentences
        done = compress_and_export(
            "minilm", method, {**({"skip": ("pooler",)} if method != "none" else {}), **opts},
            path, log=lambda m: None, calib_n=128, load={"seq": seq})
        report, res = done.report, done.result
        t_compress, t_export = done.compress_s, done.export_s
        sess = cpu_session(path, threads)
        emb = embed(ort_runner(sess), batches)
        if ref_emb is None:
            ref_emb = result.reference_embeddings = emb  # "none": the fp32 reference
        quality = compare_embeddings(ref_emb, emb)
        files = [path, *([res.data_path] if res.data_path else [])]
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
    from edgestack.targets import TARGET_NAMES, get_target  # lazy: numpy at import
    from edgestack.targets.parity import Case, cross_check  # lazy: numpy at import

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
                          work_dir=result.work_dir / "targets")
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


# ---- 3. baselines: build, measure memory ----------------------------------------------------
def _feeds_file(result: DemoResult) -> Path:
    """The first held sentence as an ``.npz``: what every memory probe runs."""
    import numpy as np

    path = result.work_dir / "bench" / "memory_feeds.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **result.held_batches[0])
    return path


def _baselines_step(result: DemoResult, dense: Path, threads: int,
                    labels: tuple[str, ...] | None, log: Callable[[str], None]
                    ) -> tuple[list[Any], dict[str, str]]:
    """Build the baselines from the dense model and measure each one's peak RSS increase in
    a fresh process (:func:`~edgestack.profiler.bench.measure_memory`, the bench's probe);
    ``(subjects with memory, skipped)``."""
    from edgestack.profiler.bench import baseline_subjects, measure_memory  # lazy: numpy at import

    log("[3/5 baselines] building the baselines from the dense model ...")
    subjects, skipped = baseline_subjects(dense, result.work_dir / "bench" / "baselines",
                                          threads, lambda m: log(f"[3/5 baselines] {m}"))
    if labels is not None:
        subjects = [s for s in subjects if s.label.split(" (")[0] in labels]
    feeds = _feeds_file(result)
    for subj in subjects:
        subj.memory = measure_memory(subj, feeds)
        result.baselines.append({"label": subj.label, "precision": subj.precision,
                                 "rss_increase": subj.memory["increase"],
                                 "rss_increase_mb": round(subj.memory["increase"] / MB, 2),
                                 "load_s": round(subj.memory["load_s"], 2)})
        log(f"[3/5 baselines] {subj.label}: peak RSS +{subj.memory['increase'] / MB:.1f} MB")
    return subjects, skipped


# ---- 4. pack and run with the runtime manager ---------------------------------------------
def _forms(modes: dict[str, str]) -> dict[str, int]:
    """Layers per form of a plan (``int8``, ``fp32``, ``on-the-fly``, and any other form
    it uses, e.g. ``nbits8``)."""
    counts = {"int8": 0, "fp32": 0, "on-the-fly": 0}
    for mode in modes.values():
        counts[mode] = counts.get(mode, 0) + 1
    return counts


def _forms_text(forms: dict[str, int] | None) -> str:
    if not forms:
        return ""
    return ", ".join(f"{n} {form}" for form, n in forms.items() if n)


def _row_forms(row: dict[str, Any]) -> str:
    """A package row's forms, and the engine when it is OpenVINO."""
    text = _forms_text(row["forms"])
    if row.get("engine") == "openvino":
        text += f" on OpenVINO {row.get('precision') or ''}".rstrip()
    return text


def _precision(forms: dict[str, int]) -> str:
    """What a plan computes its BitStack layers in (on-the-fly layers decode to float32)."""
    parts = (["int8"] if forms.get("int8") else []) + (
        ["int8 weights"] if forms.get("nbits8") else []) + (
        ["fp32"] if forms.get("fp32") or forms.get("on-the-fly") else [])
    return "+".join(parts) or "fp32"


def _runtime_step(result: DemoResult, model: Path, threads: int,
                  baselines: list[Any] | None, log: Callable[[str], None]) -> list[Any]:
    """Pack the BitStack model and run it with the runtime manager at each budget of
    :func:`runtime_budgets` (the baselines' measured memory; without baselines, the smallest
    plans of the first and last tiers + 1 MiB); returns the package subjects for the bench,
    memory measured. A baseline below the smallest plan gets ``does_not_fit``."""
    import numpy as np

    from edgestack.core.quality import compare_embeddings, embed  # lazy: numpy at import
    from edgestack.package import Package  # lazy: numpy at import
    from edgestack.package.archive import write_archive  # lazy: numpy at import
    from edgestack.packer.pack import pack  # lazy: onnx at import
    from edgestack.profiler.bench import (  # lazy: numpy at import
        BUDGET_HEADROOM,
        Subject,
        measure_memory,
        package_disk_bytes,
        package_subjects,
    )
    from edgestack.runtime import Runtime  # lazy: numpy at import
    from edgestack.runtime.openvino import PROFILE_PRECISIONS  # lazy: numpy at import

    pkg_dir = result.out_dir / "packages" / "minilm-bitstack"
    log(f"[4/5 runtime] packing {model.name} -> {pkg_dir} (and .tar) ...")
    packed = pack(model, pkg_dir, target="ort-cpu", name="all-MiniLM-L6-v2-bitstack")
    write_archive(pkg_dir, pkg_dir.with_suffix(".tar"))
    result.package = {"path": str(pkg_dir), "archive": str(pkg_dir.with_suffix(".tar")),
                      **packed.to_dict()}
    # tier 0 and the top tier, each at its calibrated smallest plan + 1 MiB
    ends, skipped, _, top = package_subjects(pkg_dir, 2, log, threads)
    if not ends:
        result.skipped.update({f"runtime ({k})": v for k, v in skipped.items()})
        return []
    smallest_budget = ends[0].options["budget"]
    smallest_plan = smallest_budget - BUDGET_HEADROOM
    result.package["smallest_plan_mb"] = round(smallest_plan / MB, 2)
    if baselines is not None:
        budgets, per_baseline = runtime_budgets(
            {b.label: b.memory["increase"] for b in baselines}, smallest_plan, smallest_budget)
        why: dict[int, list[str]] = {}
        for label, budget in per_baseline.items():
            if budget is not None:
                why.setdefault(budget, []).append(label)
        why.setdefault(smallest_budget, []).insert(0, "smallest plan + 1 MiB")
    else:
        budgets = sorted({s.options["budget"] for s in ends})
        why = {s.options["budget"]: [f"tier {s.options['tier']} smallest plan + 1 MiB"]
               for s in ends}
    with Package.open(pkg_dir) as pkg:
        man = pkg.manifest
        numel = sum(int(np.prod(info.shape)) for info in man.layers.values()) or 1
        tier_bits = [t.bytes * 8 / numel for t in man.tiers]
        tier_disk = [t.total_bytes for t in man.tiers]
    batches = result.held_batches
    feeds = _feeds_file(result)
    subjects = []
    ORT = ("onnxruntime", None)
    todo = [(b, "auto", *ORT) for b in budgets]
    if baselines is not None:   # OpenVINO's baselines: also the package served by OpenVINO
        todo += [(per_baseline[b.label], "auto", "openvino",
                  PROFILE_PRECISIONS[b.options["precision"]]) for b in baselines
                 if b.target == "openvino-cpu" and per_baseline.get(b.label) is not None]
    while todo:
        budget_forms, todo = todo, []
        for budget, form, engine, precision in budget_forms:
            row: dict[str, Any] = {"budget": budget, "budget_mb": round(budget / MB, 2),
                                   "for": "; ".join(why[budget]), "form": form,
                                   "engine": engine, "precision": precision,
                                   "n_tiers": top + 1, "tier": None, "forms": None,
                                   "plan_mb": None, "rss_increase": None,
                                   "rss_increase_mb": None, "cosine_vs_fp32": None,
                                   "p50_ms": None, "error": None}
            log(f"[4/5 runtime] budget {budget / MB:.2f} MB ({row['for']}), form {form}, "
                f"{engine}{'' if precision is None else ' ' + precision} ...")
            try:
                rt = Runtime(pkg_dir, budget=budget, threads=threads, form=form, engine=engine,
                             precision=precision)
            except BudgetError as err:
                # at or above the smallest plan by construction: a refusal breaks the promise
                row.update(error=f"BudgetError: {err}", ok=False)
                result.runtime.append(row)
                log(f"    refused: {err}")
                continue
            try:
                emb = embed(lambda f, rt=rt: next(iter(rt.infer(f).values())), batches)
                test = rt.self_test()
                row.update(tier=rt.tier, bits_per_weight=round(tier_bits[rt.tier], 3),
                           forms=_forms(rt.plan.modes), plan_mb=round(rt.plan.total / MB, 2),
                           self_test=test.get("passed"),     # judged at the golden tier only
                           cosine_vs_fp32=round(compare_embeddings(
                               result.reference_embeddings, emb)["cosine_mean"], 5))
                plan_bytes, graph = rt.plan.total, rt.plan.graph
            finally:
                rt.close()
            if form == "auto" and graph in ("nbits8", "fp32") and engine == "onnxruntime":
                todo.append((budget, "int8", *ORT))  # the fastest plan at this budget, beside it
            # the probe process runs the runtime manager at the same budget: it plans again
            ov = engine == "openvino"
            subj = Subject(f"bitstack package at {row['budget_mb']:.2f} MB (tier "
                           f"{row['tier']}{', int8' if form == 'int8' else ''}"
                           f"{f', OpenVINO {precision}' if ov else ''})",
                           "package", str(pkg_dir), "openvino-cpu" if ov else "ort-cpu",
                           precision=_precision(row["forms"]),
                           disk_bytes=package_disk_bytes(pkg_dir),
                           tier_bytes=tier_disk[row["tier"]], plan_bytes=plan_bytes,
                           options={"budget": budget, "bits": tier_bits[row["tier"]],
                                    "threads": threads, "form": form, "engine": engine,
                                    "precision": precision})
            subj.memory = measure_memory(subj, feeds)
            row.update(label=subj.label, rss_increase=subj.memory["increase"],
                       rss_increase_mb=round(subj.memory["increase"] / MB, 2),
                       load_s=round(subj.memory["load_s"], 2))
            row["ok"] = row["self_test"] is not False and subj.memory["increase"] <= budget
            result.runtime.append(row)
            subjects.append(subj)
            log(f"    tier {row['tier']}/{top} ({_forms_text(row['forms'])}): "
                f"{row['bits_per_weight']} bits/weight, plan {row['plan_mb']} MB, peak RSS "
                f"+{row['rss_increase_mb']} MB{'' if row['ok'] else ' OVER BUDGET'}, cosine "
                f"{row['cosine_vs_fp32']}")
    if baselines is not None:
        by_budget = {(r["budget"], r["form"], r["engine"], r["precision"]): r
                     for r in result.runtime}
        ov_precision = {b.label: PROFILE_PRECISIONS[b.options["precision"]] for b in baselines
                        if b.target == "openvino-cpu"}
        for entry in result.baselines:
            budget = per_baseline.get(entry["label"])
            entry["budget_mb"] = None if budget is None else round(budget / MB, 2)
            entry["runtime_label"] = (None if budget is None
                                      else by_budget[(budget, "auto", *ORT)].get("label"))
            for key, variant in (("runtime_int8_label", ("int8", *ORT)),
                                 ("runtime_ov_label", ("auto", "openvino",
                                                       ov_precision.get(entry["label"])))):
                row = by_budget.get((budget, *variant))
                entry[key] = None if row is None else row.get("label")
            entry["does_not_fit"] = (None if budget is not None else
                                     f"does not fit: smallest plan {smallest_plan / MB:.2f} MB")
    return subjects


# ---- 5. bench -------------------------------------------------------------------------------
def _bench_step(result: DemoResult, models: dict[str, Path], baselines: tuple[list[Any],
                dict[str, str]], package: list[Any] | None, threads: int, iterations: int,
                log: Callable[[str], None]) -> None:
    from edgestack.core.quality import sentence_feeds  # lazy: numpy at import
    from edgestack.pipeline import compile_model  # lazy: numpy at import
    from edgestack.profiler.bench import (  # lazy: numpy at import
        BenchReport,
        QualityProbe,
        Subject,
        measure_subjects,
        package_disk_bytes,
        reference_handle,
        write_report,
    )

    out = result.out_dir / "bench"                       # kept: tables and plots
    out.mkdir(exist_ok=True)
    work = result.work_dir / "bench"
    dense = models["none"]
    feeds = result.held_batches[0]                       # the first held sentence: timing
    ref = reference_handle(dense, threads=threads)
    try:                                                 # quality: every held sentence
        reference = ref.infer(feeds)
        probe = QualityProbe.build(feeds, reference, ref.infer,
                                   sentence_feeds(result.held_batches, feeds))
    finally:
        ref.release()
    subjects, skipped = list(baselines[0]), dict(baselines[1])

    def compiled(label: str, method: str, target: str, opts: dict[str, Any],
                 name: str) -> Subject:
        """``models[method]`` compiled into a device package, served by the runtime."""
        pkg = work / "packages" / name
        res = compile_model(models[method], target, pkg, options=opts, overwrite=True,
                            log=lambda m: None)
        precision = res.compile["precision"]
        suffix = "" if name.endswith(target) else " (int8 activations)"
        return Subject(f"{label} {precision}{suffix}", "package", str(pkg),
                       target, precision=precision, disk_bytes=package_disk_bytes(pkg),
                       tier_bytes=res.tiers[0]["total_bytes"],
                       options={"budget": None, "tier": 0, "threads": threads})

    for method in models:
        if method == "none":
            continue
        for target in BENCH_TARGETS:
            if target in result.skipped:
                continue
            subjects.append(compiled(f"{method} {target}", method, target,
                                     TARGET_OPTIONS.get(target, {}), f"{method}-{target}"))
    for method, opts in FAST_OPTIONS.items():
        if method in models:
            subjects.append(compiled(f"{method} ort-cpu", method, "ort-cpu", opts,
                                     f"{method}-fast"))
    if package:
        subjects.extend(package)
    rows = measure_subjects(subjects, feeds, reference, work, quality=probe,
                            iterations=iterations, warmup=3,
                            log=lambda m: log(f"[5/5 bench] {m}"))
    by_label = {r.label: r for r in rows}
    for row in result.runtime:                           # the tier the runtime chose
        if row.get("label") in by_label:
            bench_row = by_label[row["label"]]
            bench_row.tier = row["tier"]
            row["p50_ms"] = round(bench_row.p50_ms, 2)
            row["quality"] = round(bench_row.cosine, 5)
    report = BenchReport("all-MiniLM-L6-v2 (edgestack demo)", rows, skipped,
                         {"threads": threads, "iterations": iterations,
                          "inputs": {k: list(v.shape) for k, v in feeds.items()},
                          "reference": "ORT fp32 of the uncompressed model",
                          "metric": probe.metric, "ratio_base": "ORT fp32"})
    write_report(report, out)
    result.bench = report.to_dict()
    runtime_by_label = {r.get("label"): r for r in result.runtime}
    for entry in result.baselines:
        base = by_label.get(entry["label"])
        if base is None:
            continue
        entry["quality"] = round(base.cosine, 5) if base.cosine is not None else None
        entry["p50_ms"] = round(base.p50_ms, 2)
        results = []
        for key, suffix in RUNTIME_VARIANTS:
            ours = runtime_by_label.get(entry.get(key))
            if ours is None:
                continue
            if ours.get("p50_ms") is not None and base.p50_ms:
                entry["latency_ratio" + suffix] = round(
                    by_label[ours["label"]].p50_ms / base.p50_ms, 3)
            results.append(target_result(entry, ours, entry.get("latency_ratio" + suffix)))
        entry["target"] = ("met" if "met" in results else results[0] if results
                           else "missed")
    result.plots.update({k: v for k, v in report.files.items() if k.endswith("plot")})


# ---- 5. plots and report ------------------------------------------------------------------
def _plots_step(result: DemoResult) -> None:
    points = [(r["method"], r["bits_per_weight"], r["cosine_vs_fp32"]) for r in result.rows]
    tiers = [(f"bitstack {r['budget_mb']} MB", r["bits_per_weight"], r["cosine_vs_fp32"])
             for r in result.runtime if r.get("cosine_vs_fp32") is not None]
    result.plots["quality_vs_bits_plot"] = plot_quality_vs_bits(
        points, tiers, result.out_dir / "quality_vs_bits.png")


RUNTIME_VARIANTS = (("runtime_label", ""), ("runtime_int8_label", "_int8"),
                    ("runtime_ov_label", "_ov"))
"""Section 4's package rows at each baseline's memory: the planner's choice (ONNX Runtime),
the int8 plan beside it, and (OpenVINO baselines) the package served by OpenVINO in the
baseline's precision: (baseline entry key of the row's label, suffix of its latency ratio)."""

TARGET_QUALITY_SLACK = 0.002
"""Issue 11's goal at each baseline's memory: quality at least the baseline's minus this..."""
TARGET_LATENCY_RATIO = 1.5
"""... and p50 latency at most this times the baseline's."""


def target_result(baseline: dict[str, Any], ours: dict[str, Any],
                  ratio: float | None) -> str:
    """``"met"``, or ``"missed: <what>"``, for the package row ``ours`` served at
    ``baseline``'s memory with latency ``ratio`` to it (section 4's goal)."""
    missed = []
    rss, budget = ours.get("rss_increase_mb"), baseline.get("rss_increase_mb")
    if rss is None or budget is None or rss > budget:
        missed.append("memory")
    q, qb = ours.get("quality"), baseline.get("quality")
    if q is None or qb is None or q < qb - TARGET_QUALITY_SLACK:
        missed.append("quality")
    if ratio is None or ratio > TARGET_LATENCY_RATIO:
        missed.append("latency")
    return "met" if not missed else "missed: " + ", ".join(missed)


def _fmt(value: Any, spec: str, empty: str = "") -> str:
    return empty if value is None else format(value, spec)


def _size_text(n: int) -> str:
    return f"{n / MB:.1f} MB" if n >= MB else f"{n / 1e3:.1f} kB"


def write_report(result: DemoResult, seq: int, threads: int) -> None:
    """Write report.md and report.json into ``result.out_dir``. Where :attr:`DemoResult.files`
    is measured, both end with the folder's files and sizes, their own included: written
    again until the sizes they list are the ones measured."""
    for _ in range(10):
        _write_report(result, seq, threads)
        if result.files is None:
            return
        files = output_files(result.out_dir)
        if files == result.files:
            return
        result.files = files


def _write_report(result: DemoResult, seq: int, threads: int) -> None:
    from edgestack.core.quality import held_sentences  # lazy: numpy at import

    out = result.out_dir
    (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    checks = result.checks
    failed = [c for c in checks if not c["passed"]]
    lines = [
        "# edgestack demo report",
        "",
        "## What passed / what failed",
        "",
        (f"**PASS**: all {len(checks)} checks held." if not failed else
         f"**FAIL**: {len(failed)} of {len(checks)} checks failed "
         f"({', '.join(c['check'] for c in failed)})."),
        "",
        "| check | result | detail |",
        "| --- | --- | --- |",
        *[f"| {c['check']} | {'PASS' if c['passed'] else 'FAIL'} | {c['detail']} |"
          for c in checks],
    ]
    info = [f"- {b['label']} (+{b['rss_increase_mb']:.2f} MB): {b['does_not_fit']}"
            for b in result.baselines if b.get("does_not_fit")]
    info += [f"- {k}: skipped ({v})" for k, v in result.skipped.items()]
    if info:
        lines += ["", "Not checks (nothing promised): baselines whose memory is below the "
                  "package's smallest plan, where the runtime refuses the budget "
                  "(`BudgetError`), and targets that cannot run here.", "", *info]
    lines += [
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
        smallest = result.package.get("smallest_plan_mb")
        budgets = ("each baseline's measured peak RSS increase (section 4) that is at least "
                   f"the package's smallest plan ({_fmt(smallest, '.2f')} MB), and that "
                   "smallest plan + 1 MiB" if result.baselines else
                   "the smallest plans of the first and last tiers + 1 MiB (no baselines: "
                   "the bench was skipped)")
        lines += ["", "## 3. Runtime manager: the BitStack package at "
                  + ("the baselines' memory" if result.baselines else "its smallest budgets"),
                  "",
                  "The runtime manager picks the largest tier whose calibrated plan fits the "
                  "budget and, by default (form auto), the most exact form that fits: every "
                  "layer fp32, else 8-bit weight-only (nbits8), else int8 (else some layers "
                  "decoded on the fly). Where it picked fp32 or nbits8, a second row runs the "
                  "int8 plan (the fastest) at the same budget. At each OpenVINO baseline's "
                  "memory a third row serves the package with OpenVINO in the baseline's "
                  "precision (every layer materialised into one dense graph, OpenVINO "
                  "compiling it; its costs calibrated with OpenVINO). "
                  f"Budgets: {budgets}. Peak RSS increase: a fresh process running the "
                  "runtime at the budget; cosine: masked mean-pooled vs fp32 on the held "
                  "sentences; p50: the bench's interleaved timing; ok: measured <= budget.", "",
                  "| budget MB | for | tier | forms | bits/weight | plan MB | "
                  "peak RSS increase MB | cosine vs fp32 | p50 ms | ok |",
                  "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | :---: |"]
        for r in result.runtime:
            if r.get("error"):
                lines.append(f"| {r['budget_mb']:.2f} | {r['for']} | | | | | | | | "
                             f"FAIL: {r['error']} |")
                continue
            lines.append(f"| {r['budget_mb']:.2f} | {r['for']} | {r['tier']} of "
                         f"{r['n_tiers'] - 1} | {_row_forms(r)} | "
                         f"{_fmt(r.get('bits_per_weight'), '.2f')} | "
                         f"{_fmt(r.get('plan_mb'), '.2f')} | "
                         f"{_fmt(r.get('rss_increase_mb'), '.2f')} | "
                         f"{_fmt(r.get('cosine_vs_fp32'), '.4f')} | "
                         f"{_fmt(r.get('p50_ms'), '.2f')} | {'yes' if r['ok'] else 'NO'} |")
    if result.baselines:
        lines += ["", "## 4. At each baseline's memory: the runtime manager at that budget", "",
                  "Each baseline's peak RSS increase (a fresh process, the same probe as the "
                  "package rows) is the package's budget; quality: the bench's metric (section "
                  "5) for both; latency ratio: the package's p50 / the baseline's p50, timed "
                  "interleaved in one process (below 1 is faster). target: the issue's goal "
                  f"for each baseline, peak RSS <= the baseline's, quality >= the baseline's - "
                  f"{TARGET_QUALITY_SLACK}, latency ratio <= {TARGET_LATENCY_RATIO} (a goal, "
                  "not a check: the demo's exit code does not depend on it).", "",
                  "| baseline | peak RSS increase MB | quality | p50 ms | package at that "
                  "budget | tier | forms | its peak RSS increase MB | its quality | latency "
                  "ratio vs baseline | target |",
                  "| --- | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | --- |"]
        by_label = {r.get("label"): r for r in result.runtime}
        for b in result.baselines:
            head = (f"| {b['label']} | {b['rss_increase_mb']:.2f} | "
                    f"{_fmt(b.get('quality'), '.5f')} | {_fmt(b.get('p50_ms'), '.2f')} | ")
            ours = by_label.get(b.get("runtime_label"))
            if b.get("does_not_fit"):
                lines.append(head + f"{b['does_not_fit']} | | | | | | missed |")
            elif ours is None:
                budget = b.get("budget_mb")
                lines.append(head + f"not served at {_fmt(budget, '.2f')} MB (section 3) "
                             "| | | | | | missed |")
            else:
                whats = ("budget", "budget, int8", "budget, OpenVINO")
                for (key, suffix), what in zip(RUNTIME_VARIANTS, whats, strict=True):
                    row = by_label.get(b.get(key))
                    if row is None:
                        continue
                    ratio = b.get("latency_ratio" + suffix)
                    lines.append((head if not suffix else "| | | | | ")
                                 + f"{row['budget_mb']:.2f} MB {what} | {row['tier']} | "
                                 f"{_row_forms(row)} | "
                                 f"{_fmt(row.get('rss_increase_mb'), '.2f')} | "
                                 f"{_fmt(row.get('quality'), '.5f')} | "
                                 f"{_fmt(ratio, '.3f')} | {target_result(b, row, ratio)} |")
    if result.bench:
        from edgestack.profiler.bench import BenchReport, Row  # lazy: numpy at import

        rows = [Row(**{k: v for k, v in r.items()}) for r in result.bench["rows"]]
        md = BenchReport("", rows, {}, result.bench["settings"]).markdown(at_baseline=False)
        lines += ["", "## 5. Bench: latency and memory vs the baselines", "",
                  "Latency timed interleaved in one process on the first held sentence "
                  "(ratio vs ORT fp32 of the uncompressed model); peak RSS increase and load "
                  "time each in a fresh process; quality: the masked mean-pooled "
                  "sentence-embedding cosine vs ORT fp32 of the uncompressed model, mean over "
                  "the held sentences (the metric of section 1); max abs: the largest output "
                  "error on the first held sentence. The table of edgestack's best subject "
                  "within each baseline's memory (any compiled model or package row) is in "
                  "`bench/bench.md`.", "", md]
    if result.plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{k}]({Path(v).relative_to(out)})" for k, v in result.plots.items()]
    if result.skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- {k}: {v}" for k, v in result.skipped.items()]
    env = result.environment
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    if result.files is not None:
        lines += ["## Files", "",
                  f"What `{out}` holds: {_size_text(result.output_bytes)} in all (sizes "
                  "measured: the sum of each entry's file sizes). "
                  + (f"The scratch folder `{WORK}/` is kept (`--keep-work`): every method's "
                     "export, the compiled artifacts of every target, the baselines and the "
                     "bench inputs." if result.keep_work else
                     f"The scratch work (every method's export, the compiled artifacts of every "
                     f"target, the baselines and the bench inputs) was removed; "
                     f"`edgestack demo --keep-work` keeps it in `{WORK}/`."),
                  "", "| file | size | what |", "| --- | ---: | --- |",
                  *[f"| `{f['path']}` | {_size_text(f['bytes'])} | {f['what']} |"
                    for f in result.files], ""]
    (out / "report.md").write_text("\n".join(lines))
