"""``edgestack bench``: latency, memory and quality of a model on its targets, with baselines.

One run measures every *subject* (the model compiled into a device package for one target,
a package at one tier, both served by the runtime manager, or a baseline a user would
otherwise pick, served as its own library serves it) in three steps:

1. **Memory and cold load**, each subject in a fresh process
   (:mod:`edgestack.profiler.probe`): peak RSS after loading and running, minus the peak
   after importing the backend, and the load time.
2. **Latency**, all subjects loaded in this process and timed **interleaved**: round after
   round, each subject runs a few calls, so that machine noise hits every subject alike and
   ratios stay meaningful. Statistics: p50/p90/p99/mean/std/min and throughput; ``spread_ms``
   is half the p10-p90 range, the band two runs of the same subject should agree within.
3. **Quality** (:class:`QualityProbe`, one rule for every subject): for a text encoder
   (an ``attention_mask`` input and a ``last_hidden_state`` or ``[batch, seq, hidden]``
   output) the masked mean-pooled sentence-embedding cosine against the reference, averaged
   over :data:`BENCH_SENTENCES` held sentences at the bench inputs' sequence length (with a
   tokenizer; else over the bench inputs), so padding rows do not count; for other models
   the cosine of the flattened outputs. Rows say which in ``metric``; ``max_abs`` /
   ``max_rel`` are the output errors on the bench inputs. The reference is the dense model
   when given, else the source model on ONNX Runtime (a package: its largest tier).

Baselines (``baseline=True``, :data:`BASELINES`): the dense float32 model (``dense_model``,
or the source with its compressed weights decoded) on ONNX Runtime fp32; ``quantize_dynamic``
int8 per-tensor and ``per_channel=True``; weight-only ``MatMulNBits`` 8-bit and 4-bit
(``MatMulNBitsQuantizer``, RTN, block 32, symmetric, ``accuracy_level=4``); OpenVINO f32 and
bf16. Every ORT baseline keeps its weights in ONNX external data (``model.onnx.data``), which
ONNX Runtime memory-maps when the session is created from the file path. Each
quantized baseline counts the weight layers it quantized (:func:`quantization_summary`:
``quantized_layers`` of ``weight_layers``, in the row, its note and the JSON); one that
quantized none (MatMulNBits on a CNN: no MatMul) gives a row labelled
``(nothing quantized)``, precision fp32, with a note saying why.

Sizes: ``disk_bytes`` is what a subject is stored as (a baseline's model and weight files;
a package: all its files, :func:`package_disk_bytes`, the same for every tier),
``tier_bytes`` what a package tier reads (its blocks, graph and weights) and ``plan_bytes``
the runtime's memory plan for the tier.
Ratios are against the ORT fp32 baseline when measured, else against the first subject.

The report adds the Pareto views of :mod:`edgestack.profiler.pareto`.

A target that cannot run here is listed with the reason and skipped; the result says so
(the CLI exits 4 when nothing at all could run).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgestack.core.latency import cpu_extensions, interleaved_latency, latency_stats
from edgestack.core.logs import no_root_config, quiet_loggers
from edgestack.core.ort import cpu_session
from edgestack.core.progress import Progress, progress_bar, progress_iter
from edgestack.core.quality import (
    cosine_rows,
    embed,
    held_sentences,
    hidden_state_output,
    sentence_feeds,
    tokenize,
)
from edgestack.core.runner import Runner, SessionRunner
from edgestack.errors import InternalError, TargetError
from edgestack.package import Package
from edgestack.package.format import ARCHIVE_SUFFIX, MANIFEST_NAME, SUPPORTED_TARGETS
from edgestack.pipeline import compile_model
from edgestack.profiler.pareto import (
    at_baseline_markdown,
    at_baseline_table,
    pareto_markdown,
    pareto_table,
)
from edgestack.profiler.plots import plot_bench
from edgestack.profiles import load_profile
from edgestack.runtime import Runtime, calibrate, plan_tier
from edgestack.runtime.openvino import PROFILE_PRECISIONS, OpenVINOSession
from edgestack.targets import TARGET_NAMES, get_target
from edgestack.targets.feeds import example_feeds
from edgestack.targets.parity import TOLERANCES, compare_output

#: Baseline labels, in report order (module docstring).
BASELINES = ("ORT fp32", "ORT dynamic int8 per-tensor", "ORT dynamic int8 per-channel",
             "ORT int8 weight-only MatMulNBits g32", "ORT int4 weight-only MatMulNBits g32",
             "OpenVINO f32", "OpenVINO bf16")
#: MatMulNBits baselines: block (group) size and ``accuracy_level`` (4: int8 activations
#: inside the kernel, ORT's fast CPU path for weight-only quantized MatMul).
NBITS_BLOCK = 32
NBITS_ACCURACY_LEVEL = 4
#: File every ORT baseline keeps its weights in (ONNX external data, memory-mapped by ORT).
EXTERNAL_DATA = "model.onnx.data"
#: Ops a quantizer adds (named in a quantized baseline's note).
QUANTIZED_OPS = frozenset({"MatMulNBits", "MatMulInteger", "ConvInteger",
                           "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
                           "DequantizeLinear", "QAttention", "QLinearMatMul", "QLinearConv"})
#: Weight layers, by op: the input that holds the weight. A node is a weight layer when
#: that input is a float initializer of 2 or more dimensions (:func:`weight_layers`).
WEIGHT_INPUTS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}
NOTHING_QUANTIZED = "nothing quantized"


@dataclass
class Subject:
    """One thing to measure.

    Attributes:
        label: Row label.
        kind: ``model`` (a baseline: an ONNX or OpenVINO IR file, served as a user would
            serve it: an ONNX Runtime session, or OpenVINO) or ``package`` (a device
            package at ``tier``, served by :class:`edgestack.runtime.Runtime`).
        path: The model file or package path.
        target: The compile target that runs it.
        group: ``edgestack`` or ``baseline``.
        precision: What it computes in (``fp32``, ``int8``, ``int4``, ``bf16`` ...).
        disk_bytes: Bytes on disk of what it is stored as (model: its graph and weight
            files; package: all the package's files, :func:`package_disk_bytes`, the same
            for every tier).
        tier_bytes: Packages: what the tier reads from the package (its ``total_bytes``:
            block prefix, graph and weights).
        plan_bytes: Packages: the runtime's memory plan for the tier (its budget).
        note: What the report should say about it (e.g. a quantizer that changed nothing).
        quantized_layers / weight_layers: Quantized baselines: the weight layers the
            quantizer rewrote, of all the dense model's (:func:`quantization_summary`).
        options: ``precision`` (OpenVINO runner hint); packages: ``budget``, ``tier``,
            ``bits`` (bits per BitStack weight of the tier), ``threads``.
        memory: ``{"load_s", "increase"}`` when already measured in a fresh process
            (:func:`measure_memory`); :func:`measure_subjects` then does not measure again.
    """

    label: str
    kind: str
    path: str
    target: str
    group: str = "edgestack"
    precision: str = "fp32"
    disk_bytes: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] | None = None
    plan_bytes: int | None = None
    note: str = ""
    tier_bytes: int | None = None
    quantized_layers: int | None = None
    weight_layers: int | None = None

    def spec(self, feeds: Path, calls: int = 3) -> dict[str, Any]:
        """The JSON description :func:`open_subject` and the probe process read."""
        return {"kind": self.kind, "path": self.path, "target": self.target,
                "options": self.options, "feeds": str(feeds),
                "calls": calls}


def preload(spec: Mapping[str, Any]) -> None:
    """Import what loading ``spec`` needs (the backend library, the runtime manager), so that
    import cost is not counted as the model's memory."""
    if spec["kind"] == "package":
        import edgestack.runtime  # noqa: F401  # lazy: importing it is what preload is for
    if spec["target"] in ("ort-cpu", "ort-arm"):
        import onnxruntime  # noqa: F401
    elif spec["target"] == "openvino-cpu" or spec["options"].get("engine") == "openvino":
        import openvino  # noqa: F401


def open_subject(spec: Mapping[str, Any]) -> Runner:
    """Load a subject from its :meth:`Subject.spec`: a
    :class:`~edgestack.core.runner.Runner` (the runtime for a package, a plain session for a
    baseline model file)."""
    opts = spec["options"]
    if spec["kind"] == "model":
        if spec["target"] == "openvino-cpu":
            return SessionRunner(OpenVINOSession(
                spec["path"], threads=opts.get("threads"),
                precision=PROFILE_PRECISIONS.get(opts.get("precision"))))

        return SessionRunner(cpu_session(spec["path"], opts.get("threads") or 0, "all",
                                         opts.get("spinning", "on")))
    if spec["kind"] == "package":
        return Runtime(spec["path"], budget=opts["budget"], tier=opts.get("tier"),
                       threads=opts.get("threads"), form=opts.get("form", "auto"),
                       engine=opts.get("engine", "auto"), precision=opts.get("precision"))
    raise InternalError(f"unknown bench subject kind {spec['kind']!r}")


# ---- inputs ---------------------------------------------------------------------------
def bench_feeds(model_path: str | Path, batch: int = 1, seq: int = 128,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for every graph input: the first dimension (when symbolic) is
    ``batch``, other symbolic ones ``seq``; token ids in [0, 1000), masks ones, token types
    zeros, floats standard normal (:func:`edgestack.targets.feeds.example_feeds`)."""
    return example_feeds(model_path, batch=batch, seq=seq, seed=seed, high=1000)


# ---- subjects -------------------------------------------------------------------------
def _files_bytes(model: Path) -> int:
    """Bytes of a model file and its weights (``model.onnx`` + ``model.onnx.data``, or
    ``model.xml`` + ``model.bin``)."""
    paths = {model, *model.parent.glob(model.name + ".*"), model.with_suffix(".bin")}
    return sum(p.stat().st_size for p in paths if p.is_file())


def target_subjects(model: Path, work: Path, targets: Sequence[str], profile: Any,
                    log: Callable[[str], None], progress: Progress = False,
                    ) -> tuple[list[Subject], dict[str, str]]:
    """Compile ``model`` into a device package for each target that can run here
    (:func:`edgestack.pipeline.compile_model`), each served by the runtime manager;
    ``(subjects, skipped)`` (``progress``: a bar over the targets,
    :mod:`edgestack.core.progress`)."""
    subjects, skipped = [], {}
    for name in progress_iter(targets, progress, "bench: compile"):
        target = get_target(name)
        ok, why = target.available()
        if name == "ort-arm":
            ok, why = False, ("its packages run only under qemu emulation on this machine; "
                              "latency there measures the emulator, not the device")
        if not ok:
            skipped[name] = why
            log(f"bench: skipping {name}: {why}")
            continue
        log(f"bench: compiling for {name} ...")
        pkg = work / name
        result = compile_model(model, name, pkg, profile=profile, overwrite=True, log=log)
        precision = (result.compile or {}).get("precision", "fp32")
        threads = getattr(profile, "threads", None)
        subjects.append(Subject(f"edgestack {name} {precision}", "package", str(pkg), name,
                                precision=precision, disk_bytes=package_disk_bytes(pkg),
                                tier_bytes=result.tiers[0]["total_bytes"],
                                options={"budget": None, "tier": 0, "threads": threads}))
    return subjects, skipped


def save_external(model: Any, path: Path) -> None:
    """Save an ONNX ``ModelProto`` with its weights in ``model.onnx.data`` next to ``path``
    (tensors from 1 KiB), so that ONNX Runtime memory-maps them when a session is created
    from the file path (the ort-cpu runner does) instead of copying them out of the
    protobuf."""
    import onnx

    for stale in (path, path.with_name(EXTERNAL_DATA)):
        stale.unlink(missing_ok=True)                     # onnx appends to the data file
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=EXTERNAL_DATA, size_threshold=1024)


def _added_ops(model: Any, dense: Any) -> dict[str, int]:
    """Quantized-op nodes (:data:`QUANTIZED_OPS`) ``model`` has beyond ``dense``'s, by op."""
    def count(m: Any) -> Counter:
        return Counter(n.op_type for n in m.graph.node if n.op_type in QUANTIZED_OPS)

    return dict(sorted((count(model) - count(dense)).items()))


def weight_layers(model: Any) -> Counter:
    """The float weight layers of an ONNX ``ModelProto``, counted by op: nodes of
    :data:`WEIGHT_INPUTS` whose weight input is a float initializer of 2+ dimensions (the
    layers a weight quantizer may rewrite; a ``MatMul`` of two activations is none)."""
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
              TensorProto.DOUBLE}
    inits = {i.name: i for i in model.graph.initializer}
    found: Counter = Counter()
    for node in model.graph.node:
        k = WEIGHT_INPUTS.get(node.op_type)
        init = inits.get(node.input[k]) if k is not None and len(node.input) > k else None
        if init is not None and init.data_type in floats and len(init.dims) >= 2:
            found[node.op_type] += 1
    return found


@dataclass
class Quantization:
    """What a baseline quantizer did (:func:`quantization_summary`).

    Attributes:
        quantized_layers: Weight layers it rewrote.
        weight_layers: Weight layers of the dense model (:func:`weight_layers`).
        note: The report's note, e.g. ``quantized 36 of 37 weight layers ...`` or
            ``nothing quantized: 0 of 4 weight layers ...``.
    """

    quantized_layers: int
    weight_layers: int
    note: str

    @property
    def nothing(self) -> bool:
        """Whether it quantized no layer (the baseline is the fp32 model)."""
        return self.quantized_layers == 0


def _counts(c: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {op}" for op, n in sorted(c.items()) if n)


def quantization_summary(dense: Any, quantized: Any, quantizer: str,
                         ops: Sequence[str]) -> Quantization:
    """How many of ``dense``'s weight layers ``quantizer`` (which rewrites ``ops``) turned
    into quantized ones in ``quantized``: those no longer float weight layers."""
    before, after = weight_layers(dense), weight_layers(quantized)
    total = sum(before.values())
    done = max(0, total - sum(after.values()))
    layers = f"{total} weight layers" + (f" ({_counts(before)})" if total else "")
    if done:
        added = _added_ops(quantized, dense)
        left = f"; left float: {_counts(after)}" if after else ""
        return Quantization(done, total, f"quantized {done} of {layers}"
                            + (f", adding {_counts(added)}" if added else "") + left)
    eligible = sum(before[op] for op in ops)
    names = "/".join(ops)
    why = (f"{quantizer} rewrites only {names} with a constant weight and the model has none"
           if not eligible else
           f"{quantizer} left the model's {eligible} {names} layers as they were")
    return Quantization(0, total, f"{NOTHING_QUANTIZED}: 0 of {layers} quantized; {why}, so "
                                  "this is the fp32 model")


def _baseline(work: Path, name: str, label: str, precision: str, threads: int,
              write: Callable[[Path], Quantization | None],
              target: str = "ort-cpu") -> Subject:
    """A baseline subject: ``write(path)`` puts its model at ``work/name/model.onnx`` and
    returns what its quantizer did (``None``: not quantized); it is served as a user would
    serve it (an ONNX Runtime session on the file, weights memory-mapped from its external
    data). A quantizer that rewrote nothing makes the row ``LABEL (nothing quantized)``,
    precision ``fp32``."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    quant = write(path)
    if quant is not None and quant.nothing:
        label, precision = f"{label} ({NOTHING_QUANTIZED})", "fp32"
    subject = Subject(label, "model", str(path), target, "baseline", precision,
                      _files_bytes(path), {"threads": threads})
    if quant is not None:
        subject.note = quant.note
        subject.quantized_layers, subject.weight_layers = (quant.quantized_layers,
                                                           quant.weight_layers)
    return subject


def baseline_subjects(dense: Path, work: Path, threads: int, log: Callable[[str], None],
                      progress: Progress = False) -> tuple[list[Subject], dict[str, str]]:
    """The baselines a user would otherwise pick (see :func:`_baseline_subjects`), with ONNX
    Runtime's quantizer quiet (it logs every node at INFO, some on the root logger) for as
    long as it runs; ``progress``: a bar over the baselines built
    (:mod:`edgestack.core.progress`)."""
    with quiet_loggers(("onnxruntime.quantization", "root"), logging.WARNING), \
            no_root_config():
        return _baseline_subjects(dense, work, threads, log, progress)


def _baseline_subjects(dense: Path, work: Path, threads: int, log: Callable[[str], None],
                       progress: Progress = False) -> tuple[list[Subject], dict[str, str]]:
    """The baselines a user would otherwise pick, built from the dense float32 model
    (:data:`BASELINES`, module docstring). Each quantized one counts the weight layers it
    quantized (:func:`quantization_summary`); one in which the quantizer rewrote nothing
    (e.g. MatMulNBits on a CNN: no MatMul) is relabelled ``... (nothing quantized)``,
    precision ``fp32``, with a note saying why."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    skipped: dict[str, str] = {}
    dense_proto = onnx.load(str(dense))

    def fp32(path: Path) -> None:
        save_external(onnx.load(str(dense)), path)

    def dynamic(per_channel: bool) -> Callable[[Path], Quantization]:
        def write(path: Path) -> Quantization:
            tmp = path.with_name("quantized.tmp.onnx")
            quantize_dynamic(str(dense), str(tmp), weight_type=QuantType.QInt8,
                             per_channel=per_channel)
            model = onnx.load(str(tmp))
            tmp.unlink()
            save_external(model, path)
            return quantization_summary(dense_proto, model, "quantize_dynamic",
                                        ("MatMul", "Gemm", "Conv", "Gather"))
        return write

    def weight_only(bits: int) -> Callable[[Path], Quantization]:
        def write(path: Path) -> Quantization:
            quant = MatMulNBitsQuantizer(onnx.load(str(dense)), bits=bits,
                                         block_size=NBITS_BLOCK, is_symmetric=True,
                                         accuracy_level=NBITS_ACCURACY_LEVEL)
            quant.process()                               # rewrites the model in place
            model = quant.model.model
            save_external(model, path)
            return quantization_summary(dense_proto, model, "MatMulNBits", ("MatMul",))
        return write

    builds = [("ort_fp32", BASELINES[0], "fp32", fp32),
              ("ort_int8", BASELINES[1], "int8", dynamic(False)),
              ("ort_int8_channel", BASELINES[2], "int8", dynamic(True)),
              ("ort_nbits8", BASELINES[3], "int8", weight_only(8)),
              ("ort_nbits4", BASELINES[4], "int4", weight_only(4))]
    subjects = []
    for name, label, precision, write in progress_iter(builds, progress, "bench: baselines"):
        log(f"bench: baseline {label} ...")
        subjects.append(_baseline(work, name, label, precision, threads, write))
    try:
        import openvino as ov
    except ImportError as exc:
        skipped["OpenVINO"] = f"openvino cannot be imported ({exc}); pip install openvino"
    else:   # OpenVINO's own model of the dense export, as its docs convert one
        log("bench: baseline OpenVINO IR ...")
        ir = work / "openvino" / "model.xml"
        ir.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov.convert_model(str(dense)), str(ir), compress_to_fp16=False)
        for prec, label in zip(("fp32", "bf16"), BASELINES[5:], strict=True):
            subjects.append(Subject(label, "model", str(ir), "openvino-cpu", "baseline", prec,
                                    _files_bytes(ir), {"precision": prec,
                                                       "threads": threads}))
    return subjects, skipped


def package_disk_bytes(path: str | Path) -> int:
    """Bytes on disk of a device package: a ``.tar`` archive's size, or a folder's
    ``manifest.json`` plus every file the manifest lists (their sizes, which
    :meth:`~edgestack.package.Package.open` checks); files it does not list are not part of
    the package."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    with Package.open(path) as pkg:
        listed = sum(entry.size for entry in pkg.manifest.files.values())
    return (path / MANIFEST_NAME).stat().st_size + listed


def is_package_path(path: Path) -> bool:
    """Whether ``path`` looks like a device package (a folder with manifest.json, or .tar)."""
    return (path.is_dir() and (path / MANIFEST_NAME).is_file()) or (
        path.is_file() and path.suffix == ARCHIVE_SUFFIX)


def pick_tiers(n_tiers: int, count: int | str) -> list[int]:
    """``count`` tier indices spread evenly over ``0..n_tiers-1`` (always the first and last;
    ``"all"``: every tier)."""
    if count == "all" or int(count) >= n_tiers:
        return list(range(n_tiers))
    count = int(count)
    if count < 1:
        raise TargetError(f"bench: tiers must be >= 1 or 'all', found {count}")
    if count == 1:
        return [n_tiers - 1]
    return sorted({round(i * (n_tiers - 1) / (count - 1)) for i in range(count)})


BUDGET_HEADROOM = 2**20
"""Bytes above a tier's plan that a bench budget gets (a budget at exactly the plan leaves
the runtime no room for a planner rounding; the plan itself carries the safety margin)."""


def package_subjects(path: Path, count: int | str, log: Callable[[str], None],
                     threads: int | None = None
                     ) -> tuple[list[Subject], dict[str, str], dict[str, np.ndarray], int]:
    """One subject per measured tier of a package: ``(subjects, skipped, golden inputs,
    largest tier)``. A package whose target cannot run here gives no subjects and says why
    in ``skipped``."""
    with Package.open(path) as pkg:
        man = pkg.manifest
        if man.golden is None:
            raise TargetError(f"bench: package {path} has no golden inputs; give inputs with "
                              f"--input FILE.npz")
        golden = pkg.golden()[0]
        top = len(man.tiers) - 1
        ok, why = get_target(man.target).available()
        if ok and man.target not in SUPPORTED_TARGETS:
            ok, why = False, (f"the runtime manager serves {', '.join(SUPPORTED_TARGETS)} "
                              f"packages, not {man.target}")
        if not ok:
            log(f"bench: skipping package {path} (target {man.target}): {why}")
            return [], {man.target: why}, golden, top
        numel = sum(int(np.prod(info.shape)) for info in man.layers.values()) or 1
        costs = calibrate(pkg, threads=threads, log=log)  # as the runtime will plan
        disk = package_disk_bytes(path)
        subjects = []
        for t in pick_tiers(len(man.tiers), count):
            # the tier's smallest plan on this machine, plus headroom: never exactly the plan
            budget = plan_tier(man, t, costs=costs).total + BUDGET_HEADROOM
            bits = man.tiers[t].bytes * 8 / numel
            subjects.append(Subject(
                f"tier {t} ({bits:.2f} bits/weight, plan {budget / 1e6:.1f} MB)", "package",
                str(path), man.target, precision="fp32",
                disk_bytes=disk, tier_bytes=man.tiers[t].total_bytes, plan_bytes=budget,
                options={"budget": budget, "tier": t, "bits": bits, "threads": threads}))
    return subjects, {}, golden, top


def reference_handle(path: Path, *, tier: int | None = None, threads: int = 1) -> Runner:
    """The quality reference, loaded once: an ONNX model on ORT CPU (all optimizations,
    like :func:`edgestack.targets.reference.reference_outputs`), or a package at ``tier``
    (the runtime manager, no budget limit, the tier's exact float32 weights)."""
    if tier is not None:
        return Runtime(path, tier=tier, form="fp32")

    return SessionRunner(cpu_session(path, threads, "all"))


def dense_of(model: Path, out: Path) -> Path:
    """``model`` with every ``edgestack`` node decoded to a float32 initializer and constant
    subgraphs folded (ONNX Runtime's basic, standard-op-only optimizations), i.e. the dense
    float32 model a user would quantize: weights are initializers that feed ``MatMul``.
    ORT's ``MatMulAddFusion`` is off: it turns ``MatMul + Add`` into ``Gemm`` (with reshapes
    for 3-D inputs), which ``MatMulNBitsQuantizer`` does not quantize (the int4 baseline
    was silently fp32)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from edgestack.targets import passes as P  # lazy: onnx at import

    m = ir.load(model)
    P.run_passes(m, [P.MaterializePass()])
    decoded = out.with_name(out.stem + ".decoded.onnx")
    ir.save(m, decoded)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(decoded), so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["MatMulAddFusion"])
    decoded.unlink()
    return out


# ---- measuring ------------------------------------------------------------------------
@dataclass
class Row:
    """One subject's measurements: ``cosine`` is the quality under ``metric``
    (:class:`QualityProbe`); ``max_abs`` / ``max_rel`` are the worst output errors on the
    bench inputs; ``disk_bytes``, ``tier_bytes``, ``plan_bytes``, ``quantized_layers`` and
    ``weight_layers`` as in :class:`Subject`."""

    label: str
    target: str
    group: str
    precision: str
    disk_bytes: int
    iterations: int = 0
    p10_ms: float = math.nan
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    mean_ms: float = math.nan
    std_ms: float = math.nan
    min_ms: float = math.nan
    spread_ms: float = math.nan
    throughput: float = math.nan
    load_s: float | None = None
    peak_rss_increase: int | None = None
    cosine: float | None = None
    metric: str = ""
    max_abs: float | None = None
    max_rel: float | None = None
    ratio: float | None = None
    tier: int | None = None
    plan_bytes: int | None = None
    note: str = ""
    tier_bytes: int | None = None
    quantized_layers: int | None = None
    weight_layers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def measure_memory(subject: Subject, feeds_path: Path, timeout: float = 600.0
                   ) -> dict[str, Any]:
    """Cold load time and peak RSS increase of ``subject`` in a fresh process."""
    spec_path = feeds_path.parent / f"probe_{abs(hash(subject.label)) % 10**8}.json"
    spec_path.write_text(json.dumps(subject.spec(feeds_path)), encoding="utf-8")
    try:
        proc = subprocess.run([sys.executable, "-m", "edgestack.profiler.probe",
                               str(spec_path)], capture_output=True, text=True,
                              timeout=timeout)
    finally:
        spec_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise TargetError(f"bench: measuring {subject.label} in a fresh process failed "
                          f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _quality(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]
             ) -> tuple[float, float, float]:
    """Worst ``(cosine, max_abs, max_rel)`` over the reference's outputs (a missing or
    misshapen output: ``(0, inf, inf)``)."""
    if any(name not in got for name in ref):
        return 0.0, math.inf, math.inf
    checks = [compare_output(name, got[name], r, TOLERANCES["fp32"]) for name, r in ref.items()]
    return (min((c.cosine for c in checks), default=1.0),
            max((c.max_abs for c in checks), default=0.0),
            max((c.max_rel for c in checks), default=0.0))


#: Held sentences a text encoder is scored on (at the bench inputs' sequence length).
BENCH_SENTENCES = 40
#: What :attr:`Row.metric` says for each way of scoring quality.
METRIC_SENTENCES = "masked mean-pooled sentence-embedding cosine, mean of {n} held sentences"
METRIC_POOLED_INPUTS = ("masked mean-pooled embedding cosine on the bench inputs (no "
                        "tokenizer given for the held sentences)")
METRIC_OUTPUT = "output cosine (flattened outputs, worst output)"


@dataclass
class QualityProbe:
    """How every subject's quality is scored against the reference: one rule for all.

    Text encoders (:func:`~edgestack.core.quality.hidden_state_output`): the mean over
    ``batches`` of the cosine between the subject's and the reference's masked mean-pooled
    embeddings (:func:`~edgestack.core.quality.embed`), so padding rows do not count.
    Other models: the worst cosine over the flattened outputs on the bench inputs.

    Attributes:
        metric: What :meth:`score` measures (the report's ``metric``).
        batches: The inputs scored (text with a tokenizer: one held sentence each).
        output: Text encoders: the output that is pooled; ``None``: output cosine.
        reference: Text: the reference embeddings ``[n, hidden]``; else its outputs.
    """

    metric: str
    batches: list[dict[str, np.ndarray]]
    output: str | None = None
    reference: Any = None

    @classmethod
    def build(cls, feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
              reference_infer: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
              batches: list[dict[str, np.ndarray]] | None = None) -> QualityProbe:
        """The probe for a model: ``feeds`` (the bench inputs) and the ``reference``'s
        outputs on them decide whether it is a text encoder; a text encoder is scored on
        ``batches`` (held sentences, :func:`~edgestack.core.quality.sentence_feeds`)
        when given, else on the bench inputs; ``reference_infer`` embeds them once."""
        output = hidden_state_output(feeds, reference)
        if output is None:
            return cls.outputs(feeds, reference)
        probe = (cls(METRIC_POOLED_INPUTS, [dict(feeds)], output) if batches is None else
                 cls(METRIC_SENTENCES.format(n=len(batches)), list(batches), output))
        probe.reference = probe.embeddings(reference_infer)
        return probe

    @classmethod
    def outputs(cls, feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
                ) -> QualityProbe:
        """The output-cosine probe (non-text models)."""
        return cls(METRIC_OUTPUT, [dict(feeds)], None, dict(reference))

    def embeddings(self, infer: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
                   ) -> np.ndarray | None:
        """Masked mean-pooled embeddings ``[n, hidden]`` of :attr:`batches` (``None``: the
        subject lacks the pooled output)."""
        class Missing(Exception):
            pass

        def hidden(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
            out = infer(feeds)
            if self.output not in out:
                raise Missing
            return out[self.output]

        try:
            return embed(hidden, self.batches)
        except Missing:
            return None

    def score(self, infer: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
              ) -> float:
        """The subject's quality under :attr:`metric` (0.0: an output is missing)."""
        if self.output is None:
            return _quality(infer(self.batches[0]), self.reference)[0]
        emb = self.embeddings(infer)
        if emb is None or emb.shape != self.reference.shape:
            return 0.0
        return float(cosine_rows(self.reference.astype(np.float64),
                                 emb.astype(np.float64)).mean())


@dataclass
class BenchReport:
    """What :func:`run_bench` measured."""

    source: str
    rows: list[Row]
    skipped: dict[str, str]
    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def ran(self) -> bool:
        return any(r.iterations for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "settings": self.settings,
                "rows": [r.to_dict() for r in self.rows], "skipped": self.skipped,
                "pareto": pareto_table(self.rows), "at_baseline": at_baseline_table(self.rows),
                "files": self.files}

    def markdown(self, at_baseline: bool = True) -> str:
        """The rows as a markdown table, then the Pareto tables (what bench.md and the
        terminal show); ``at_baseline=False`` leaves out the at-each-baseline's-memory table
        (the demo report has its own)."""
        head = ("| subject | target | precision | disk MB | tier MB | plan MB | peak RSS +MB | "
                "load s | p50 ms | p90 ms | p99 ms | ± ms | items/s | ratio | quality | "
                "max abs |")
        lines = [head, "|" + " --- |" * 3 + " ---: |" * 13]

        def f(v: Any, fmt: str) -> str:
            return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) \
                else format(v, fmt)

        for r in self.rows:
            rss = None if r.peak_rss_increase is None else r.peak_rss_increase / 1e6
            plan = None if r.plan_bytes is None else r.plan_bytes / 1e6
            tier = None if r.tier_bytes is None else r.tier_bytes / 1e6
            lines.append(
                f"| {r.label} | {r.target} | {r.precision} | {f(r.disk_bytes / 1e6, '.2f')} | "
                f"{f(tier, '.2f')} | {f(plan, '.2f')} | {f(rss, '.1f')} | "
                f"{f(r.load_s, '.2f')} | "
                f"{f(r.p50_ms, '.2f')} | {f(r.p90_ms, '.2f')} | {f(r.p99_ms, '.2f')} | "
                f"{f(r.spread_ms, '.2f')} | {f(r.throughput, '.1f')} | {f(r.ratio, '.3f')} | "
                f"{f(r.cosine, '.5f')} | {f(r.max_abs, '.3g')} |")
        metrics = sorted({r.metric for r in self.rows if r.metric})
        lines.append("")
        lines.append(f"quality: {'; '.join(metrics) or 'not measured'}, against "
                     f"{self.settings.get('reference', 'the reference')}. disk MB: bytes on "
                     f"disk (a baseline's model and weight files; a package: all its files, "
                     f"the same for every tier); tier MB: what a package tier reads (its "
                     f"blocks, graph and weights); plan MB: the runtime's memory plan for the "
                     f"tier (its budget), not bytes on disk; ratio: p50 / "
                     f"{self.settings.get('ratio_base') or 'the first subject'}.")
        notes = [f"- {r.label}: {r.note}" for r in self.rows if r.note]
        if notes:
            lines += ["", "notes:", *notes]
        pareto = pareto_table(self.rows)
        if pareto["rows"]:
            lines += ["", "### By memory (Pareto: no other subject has less or equal memory "
                      "and higher or equal quality)", "", pareto_markdown(pareto)]
        at_base = at_baseline_table(self.rows) if at_baseline else {"rows": []}
        if at_base["rows"]:
            lines += ["", "### At each baseline's memory: edgestack's best subject", "",
                      at_baseline_markdown(at_base)]
        for name, why in self.skipped.items():
            lines.append(f"\nskipped {name}: {why}")
        return "\n".join(lines)


def run_bench(source: str | Path, out_dir: str | Path, *, profile: Any = None,
              targets: Sequence[str] | str | None = None, baseline: bool = False,
              dense_model: str | Path | None = None, iterations: int = 30, warmup: int = 3,
              seconds: float | None = None, batch: int = 1, seq: int = 128,
              feeds: Mapping[str, np.ndarray] | None = None, memory: bool = True,
              plots: bool = True, threads: int | None = None, tiers: int | str = 5,
              tokenizer: str | Path | None = None,
              log: Callable[[str], None] | None = None,
              progress: Progress = False) -> BenchReport:
    """Benchmark an exported model on its targets, or a package at its tiers (and the
    baselines); write the results.

    Args:
        source: An ONNX model written by ``edgestack export``, or a package (directory or
            ``.tar``) written by ``edgestack pack``: then each measured tier is a subject,
            loaded by :class:`edgestack.runtime.Runtime` with its plan's budget, the inputs
            are the package's golden inputs, and the reference is ``dense_model`` or the
            largest tier.
        out_dir: Where compiled packages, ``bench.json``, ``bench.md`` and plots go.
        profile: A profile (name, path or :class:`~edgestack.profiles.Profile`): its target,
            threads and precision; ``None``: ``ort-cpu`` with 2 threads.
        targets: Target names, ``"all"``, or ``None`` (the profile's target).
        baseline: Also measure the baselines (module docstring).
        dense_model: The uncompressed model for the baselines and the quality reference.
        iterations / warmup / seconds: Timed calls per subject (at least ``iterations``,
            and for at least ``seconds`` when given), untimed calls first.
        batch / seq: Sizes of the symbolic input dimensions (first / others).
        feeds: Inputs to use instead of generated ones.
        memory: Measure cold load and peak RSS per subject in fresh processes.
        plots: Write ``latency_vs_memory.png`` and ``quality_vs_memory.png``.
        threads: Intra-op threads (default: the profile's, else 2).
        tiers: Packages: how many tiers to measure, spread evenly from the smallest to the
            largest (``"all"``: every tier).
        tokenizer: A folder with the model's ``tokenizer.json``: a text encoder is then
            scored on :data:`BENCH_SENTENCES` held sentences (:class:`QualityProbe`);
            without it, on the bench inputs.
        log: Progress lines (default: printed to stderr).
        progress: tqdm bars on stderr over the targets compiled, the baselines built, the
            subjects measured in fresh processes and scored, and the timing rounds:
            ``True`` (even when stderr is not a terminal), ``False`` (default: none) or
            ``None`` (when stderr is a terminal); see :mod:`edgestack.core.progress`.

    Raises:
        EdgestackError: a bad source, profile or target name.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    src = Path(source)
    is_package = is_package_path(src)
    if not is_package and (not src.is_file() or src.suffix != ".onnx"):
        raise TargetError(f"bench: expected an ONNX model (.onnx) written by edgestack export "
                          f"or a package from edgestack pack, found {src} "
                          f"({'missing' if not src.exists() else 'neither'}). To fix: "
                          f"`edgestack export MODEL --out model.onnx` first.")
    prof = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    threads = int(threads or (prof.threads if prof else 2))
    if targets is None:
        targets = [prof.target] if prof else ["ort-cpu"]
    elif targets == "all":
        targets = list(TARGET_NAMES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    dense = Path(dense_model) if dense_model else None
    if is_package:
        if baseline and dense is None:
            raise TargetError("bench: baselines of a package need the dense model it came "
                              "from: add --dense DENSE.onnx (e.g. `edgestack export MODEL "
                              "--method none --out dense.onnx`)")
        subjects, skipped, golden, top = package_subjects(src, tiers, log, threads)
        feeds = dict(feeds) if feeds is not None else golden
    else:
        feeds = dict(feeds) if feeds is not None else bench_feeds(src, batch, seq)
        subjects, skipped = target_subjects(src, work, list(targets), prof, log, progress)
    if baseline:
        if dense is None:
            dense = dense_of(src, work / "dense.onnx")
        base, skip2 = baseline_subjects(dense, work / "baselines", threads, log, progress)
        subjects = base + subjects
        skipped.update(skip2)
    if dense is not None:
        ref_model: Any = dense
        ref = reference_handle(dense, threads=threads)
    elif is_package:
        ref_model = f"the package's largest tier ({top})"
        ref = reference_handle(src, tier=top) if subjects else None
    else:
        ref_model = src
        ref = reference_handle(src, threads=threads)
    reference: dict[str, np.ndarray] = {}
    probe = None
    if ref is not None:
        try:
            reference = ref.infer(feeds)
            batches = None
            if tokenizer is not None and hidden_state_output(feeds, reference):
                seq_len = feeds["attention_mask"].shape[1]
                batches = sentence_feeds(tokenize(tokenizer, held_sentences()[:BENCH_SENTENCES],
                                                  seq_len), feeds)
            probe = QualityProbe.build(feeds, reference, ref.infer, batches)
        finally:
            ref.release()
    rows = measure_subjects(subjects, feeds, reference, work, quality=probe,
                            iterations=iterations, warmup=warmup, seconds=seconds,
                            memory=memory, log=log, progress=progress)

    settings = {"threads": threads, "cpu_extensions": cpu_extensions(),
                "iterations": iterations, "warmup": warmup,
                "seconds": seconds, "inputs": {k: list(v.shape) for k, v in feeds.items()},
                "profile": prof.name if prof else None, "reference": str(ref_model),
                "metric": probe.metric if probe else None,
                "ratio_base": next((r.label for r in rows if r.label == "ORT fp32"),
                                   rows[0].label if rows else None)}
    return write_report(BenchReport(str(src), rows, skipped, settings), out, plots=plots)


def measure_subjects(subjects: Sequence[Subject], feeds: Mapping[str, np.ndarray],
                     reference: Mapping[str, np.ndarray], work: Path, *,
                     quality: QualityProbe | None = None, iterations: int = 30,
                     warmup: int = 3, seconds: float | None = None, memory: bool = True,
                     log: Callable[[str], None] = lambda m: None,
                     progress: Progress = False) -> list[Row]:
    """Measure ``subjects`` (module docstring, steps 1-3): ``reference`` is the reference's
    outputs on ``feeds`` (max abs/rel errors), ``quality`` scores quality (default: output
    cosine on ``feeds``); ratios against ``ORT fp32`` when it is a subject, else the
    first. ``progress``: bars over the subjects (memory, quality) and the timing rounds
    (:mod:`edgestack.core.progress`)."""
    work.mkdir(parents=True, exist_ok=True)
    feeds_path = work / "feeds.npz"
    np.savez(feeds_path, **feeds)
    probe = quality or QualityProbe.outputs(feeds, reference)
    rows = [Row(s.label, s.target, s.group, s.precision, s.disk_bytes, metric=probe.metric,
                tier=s.options.get("tier"), plan_bytes=s.plan_bytes, note=s.note,
                tier_bytes=s.tier_bytes, quantized_layers=s.quantized_layers,
                weight_layers=s.weight_layers)
            for s in subjects]
    if memory:
        pairs = progress_iter(list(zip(subjects, rows, strict=True)), progress,
                              "bench: memory")
        for i, (s, row) in enumerate(pairs):
            if s.memory is None:
                log(f"bench: memory [{i + 1}/{len(subjects)}] {s.label} ...")
                s.memory = measure_memory(s, feeds_path)
            row.load_s, row.peak_rss_increase = s.memory["load_s"], s.memory["increase"]
    handles: list[Runner] = []
    times: list[list[float]] = []
    try:
        for s in subjects:
            handles.append(open_subject(s.spec(feeds_path)))
        if handles:
            log(f"bench: quality of {len(handles)} subjects ({probe.metric}) ...")
        for h, row in progress_iter(list(zip(handles, rows, strict=True)), progress,
                                    "bench: quality"):
            _, row.max_abs, row.max_rel = _quality(h.infer(feeds), reference)
            row.cosine = probe.score(h.infer)
        if handles:
            log(f"bench: timing {len(handles)} subjects interleaved, {iterations} calls "
                "each ...")
            rounds = max(1, math.ceil(iterations / 2))
            with progress_bar(rounds, progress, "bench: timing", unit="round") as bar:
                def tick(r: int, n: int) -> None:
                    bar.update(1)
                    if r % 5 == 0:
                        log(f"bench: round {r}/{n}")

                times = interleaved_latency(handles, feeds, iterations=iterations,
                                            warmup=warmup, seconds=seconds, progress=tick)
    finally:
        for h in handles:
            h.release()
    batch_n = next((v.shape[0] for v in feeds.values() if np.ndim(v)), 1)
    for row, t in zip(rows, times, strict=True):
        for k, v in latency_stats(t, batch_n).items():
            setattr(row, k, v)
    base_row = next((r for r in rows if r.label == "ORT fp32"), rows[0] if rows else None)
    for row in rows:
        row.ratio = row.p50_ms / base_row.p50_ms if base_row else None
    return rows


def write_report(report: BenchReport, out: Path, plots: bool = True) -> BenchReport:
    """Write ``bench.json``, ``bench.md`` and (``plots``) the PNG plots into ``out``."""
    report.files["json"] = str(out / "bench.json")
    report.files["markdown"] = str(out / "bench.md")
    if plots:
        report.files.update(plot_bench(report, out))
    (out / "bench.md").write_text(report.markdown() + "\n", encoding="utf-8")
    (out / "bench.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n",
                                    encoding="utf-8")
    return report


__all__ = ["BASELINES", "BenchReport", "Quantization", "Row", "Subject",
           "bench_feeds", "baseline_subjects", "dense_of",
           "measure_memory", "measure_subjects", "open_subject", "package_disk_bytes",
           "package_subjects", "pick_tiers", "is_package_path", "quantization_summary",
           "run_bench", "target_subjects", "weight_layers", "write_report"]
