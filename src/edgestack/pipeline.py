"""Host-side pipeline: a model source or an edgestack ONNX file -> a device package.

:func:`pack_model` is what ``edgestack pack`` runs. A model source (folder,
``module:factory``, built-in name) is compressed (:func:`edgestack.compress.compress`, its
calibration from the source) and exported (:func:`edgestack.exporter.export`) into a
temporary folder first; either way the exporter's ``compact_embeddings`` pass stores large
embedding tables int8 (a no-op on exports that already do), then
:func:`edgestack.packer.pack.pack` writes the package. This module sits above compress,
exporter and package, so the package layer (which the device runtime imports) never imports
torch or the exporter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgestack.compress.options import MAX_RATIO
from edgestack.core import atomic
from edgestack.core.latency import interleaved_latency, latency_stats
from edgestack.core.progress import Progress
from edgestack.errors import CompressError, PackageError, TargetError
from edgestack.package.format import TIERED_TARGETS
from edgestack.packer.decoder import contract_of, golden_prompt
from edgestack.profiles import load_profile
from edgestack.targets import get_target
from edgestack.targets.feeds import example_feeds
from edgestack.targets.parity import TOLERANCES, TargetCheck, judge
from edgestack.targets.reference import reference_outputs

BITSTACK_DEFAULTS: dict[str, Any] = {"n_blocks": 12, "factor_bits": 0.125}
"""BitStack options when packing a model source (any given option wins): 12 blocks reach the
original's quality at the top tier (MiniLM: cosine 0.998 at 13.2 bits a weight, within 0.002
of fp32; 5 blocks: 0.9805), so one package spans from its smallest plan to full quality;
factor bits 0.125 is the best measured on MiniLM (docs/quality.md)."""


@dataclass
class Exported:
    """What :func:`compress_and_export` did: the loaded ``source``
    (:class:`~edgestack.sources.ModelSource`), the compression ``report``, the exporter's
    ``result`` (:class:`~edgestack.exporter.ExportResult`), what calibrated it
    (``calibration``), edgestack's warnings during compression (``notes``) and the seconds
    each step took (``compress_s``, ``export_s``); ``latency``: the latency search
    (:class:`LatencySearch`) when a latency target chose the prune ratio."""

    source: Any
    report: Any
    result: Any
    calibration: str
    notes: list[str] = field(default_factory=list)
    compress_s: float = 0.0
    export_s: float = 0.0
    latency: LatencySearch | None = None

    def example_inputs(self) -> dict[str, np.ndarray]:
        """The source's example inputs as numpy, when they are exactly the graph's inputs
        (the golden inputs of a package), else ``{}``."""
        examples = {k: v.detach().cpu().numpy() for k, v in self.source.inputs.items()
                    if hasattr(v, "detach")}
        return examples if set(examples) == set(self.result.input_names) else {}


@dataclass
class LatencyStep:
    """One candidate of :func:`prune_to_latency`: its ``ratio``, the measured median and
    half p10..p90 spread of its latency (``p50_ms``, ``spread_ms``), its parameter count and
    whether it met the target."""

    ratio: float
    p50_ms: float
    spread_ms: float
    params: int
    met: bool


@dataclass
class LatencySearch:
    """What :func:`prune_to_latency` measured: on ``target``, toward ``target_ms``, every
    candidate in ``steps``; ``ratio`` is the ratio of the model it returned and ``met``
    whether that model met the target (else it is the most pruned candidate)."""

    target: str
    target_ms: float
    steps: list[LatencyStep]
    ratio: float
    met: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The steps as a text table."""
        rows = [f"latency search on {self.target} (target {self.target_ms:g} ms, median of "
                "timed runs in this process):",
                f"{'ratio':>6}  {'p50 ms':>9}  {'+-spread':>8}  {'params':>9}  met"]
        rows += [f"{st.ratio:>6.2f}  {st.p50_ms:>9.3f}  {st.spread_ms:>8.3f}  {st.params:>9}  "
                 f"{'yes' if st.met else 'no'}" for st in self.steps]
        rows.append(f"reached ratio {self.ratio:g}: " + (
            "target met" if self.met else "target NOT met by the most pruned candidate"))
        return "\n".join(rows)


def _ratios(step: float, max_ratio: float) -> list[float]:
    n = int(math.floor(max_ratio / step + 1e-9))
    ratios = [round(i * step, 6) for i in range(n + 1)]
    return ratios + ([max_ratio] if ratios[-1] < max_ratio - 1e-9 else [])


def prune_to_latency(model: Any, inputs: Mapping[str, Any], target_ms: float, *,
                     target: str = "ort-cpu", options: Mapping[str, Any] | None = None,
                     calib: list[dict[str, Any]] | None = None, step: float = 0.1,
                     max_ratio: float | None = None, iterations: int = 30, warmup: int = 5,
                     export_options: Mapping[str, Any] | None = None,
                     log: Callable[[str], None] = lambda _m: None, progress: Progress = False
                     ) -> tuple[Any, Any, LatencySearch]:
    """Prune ``model`` step by step until its measured latency meets ``target_ms`` (the idea
    of ZipLM: a latency target measured on the deployment backend, not a parameter count).

    For ratio ``0, step, 2*step, ...`` up to ``max_ratio`` (default the prune maximum,
    0.9), a copy of the model is pruned (``compress(copy, "prune", ratio=r, **options)``,
    calibration statistics collected once), exported to ONNX, lowered for ``target``
    (:func:`edgestack.targets.get_target`) and timed on the target's runner with the example
    ``inputs`` (``warmup`` runs, then the median of ``iterations``), in this process. The
    first candidate whose median is at most ``target_ms`` is returned; when none is, the most
    pruned one is, with ``met=False``. The same ratio applies to every structure (or the
    global ranking with ``adaptive=True``); unlike ZipLM, structures are not chosen by their
    own latency.

    Returns:
        ``(pruned model, its CompressReport, LatencySearch)``; ``model`` is not changed.

    Raises:
        CompressError: bad options (``ratio`` is the search's to choose).
        TargetError: unknown or unavailable target.
    """
    import copy
    import tempfile

    from edgestack.compress import compress  # lazy: torch at import
    from edgestack.compress.api import StatsCache  # lazy: torch at import
    from edgestack.exporter import export  # lazy: onnx at import

    opts = dict(options or {})
    if opts.get("ratio") is not None:
        raise CompressError("prune to a latency target: the search chooses ratio; give "
                            f"--ratio or --target-latency, not both (found ratio={opts['ratio']})")
    opts.pop("ratio", None)
    if not target_ms > 0:
        raise CompressError(f"target latency must be > 0 ms, found {target_ms!r}")
    max_ratio = MAX_RATIO if max_ratio is None else max_ratio
    if not 0 < step <= max_ratio <= MAX_RATIO:
        raise CompressError(f"latency search: expected 0 < step <= max_ratio <= {MAX_RATIO}, "
                            f"found step={step!r}, max_ratio={max_ratio!r}")
    tgt = get_target(target)
    ok, why = tgt.available()
    if not ok:
        raise TargetError(f"target {target} cannot measure latency here: {why}")
    cache = StatsCache()
    steps: list[LatencyStep] = []
    feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items() if hasattr(v, "detach")}
    best: tuple[Any, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="edgestack-latency-") as tmp:
        for i, ratio in enumerate(_ratios(step, max_ratio)):
            cand = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ratio 0 prunes nothing, by design
                report = compress(cand, "prune", calib=calib, stats_cache=cache,
                                  progress=progress, **{**opts, "ratio": ratio})
                onnx_path = Path(tmp) / f"step{i}.onnx"
                export(cand, dict(inputs), onnx_path,
                       **{**dict(export_options or {}), "parity": False, "overwrite": True})
            art = tgt.lower(onnx_path, Path(tmp) / f"step{i}")
            runner = tgt.runner(art)
            with runner:
                run_feeds = {k: v for k, v in feeds.items() if not art.inputs or k in art.inputs}
                stats = latency_stats(interleaved_latency([runner], run_feeds,
                                                          iterations=iterations,
                                                          warmup=warmup)[0])
            p50 = stats["p50_ms"]
            met = p50 <= target_ms
            steps.append(LatencyStep(ratio, round(p50, 4), round(stats["spread_ms"], 4),
                                     sum(p.numel() for p in cand.parameters()), met))
            log(f"latency search: ratio {ratio:g}: {p50:.3f} ms on {target} "
                f"(target {target_ms:g} ms){' - met' if met else ''}")
            best = (cand, report)
            if met:
                break
    assert best is not None
    return best[0], best[1], LatencySearch(target, float(target_ms), steps, steps[-1].ratio,
                                           steps[-1].met)


def compress_and_export(source: str, method: str, options: Mapping[str, Any],
                        out: str | os.PathLike[str], *, log: Callable[[str], None],
                        calib_file: str | None = None, calib_n: int | None = None,
                        load: Mapping[str, Any] | None = None,
                        export_options: Mapping[str, Any] | None = None,
                        progress: Progress = False,
                        latency: Mapping[str, Any] | None = None) -> Exported:
    """The one compress -> export pipeline (``edgestack export``, ``pack``, ``parity``):
    load ``source`` (:func:`edgestack.sources.load_source` with ``load``: ``task``,
    ``from_``, ``base``, ``batch``, ``seq``), calibrate it
    (:meth:`~edgestack.sources.ModelSource.calibration`: the shipped corpus for a text model,
    ``calib_file``, or the example inputs; none for ``method="none"``), compress it with
    ``method`` and ``options`` and export it to ``out`` (:func:`edgestack.exporter.export`
    with ``export_options``), the compression report in the file's metadata. With
    ``load["task"] == "text-generation"`` the export is a decoder with its LM head and a KV
    cache (:func:`edgestack.exporter.export_decoder`: dynamic batch, sequence and past
    length; a ``dynamic`` export option is ignored). ``progress``: tqdm bars
    (:mod:`edgestack.core.progress`). ``latency`` (method ``prune`` only): the keyword
    arguments of :func:`prune_to_latency` (``target_ms``, ``target``, ``step``, ...); the
    search picks the ratio and :attr:`Exported.latency` holds its steps."""
    from edgestack.compress import compress  # lazy: torch at import
    from edgestack.exporter import export, export_decoder  # lazy: onnx at import
    from edgestack.sources import load_source  # lazy: tests patch edgestack.sources.load_source

    src = load_source(source, **dict(load or {}))
    calib, calib_text = ((None, "none") if method == "none"
                         else src.calibration(calib_n, file=calib_file))
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log(f"compressing: method={method} {dict(options) or ''}"
            + (f", calibration: {calib_text}" if calib else ""))
        search = None
        if latency is not None:
            if method != "prune":
                raise CompressError(f"a latency target needs method 'prune', found {method!r}")
            src.model, report, search = prune_to_latency(
                src.model, src.inputs, options=options, calib=calib, log=log,
                progress=progress, export_options={
                    k: v for k, v in dict(export_options or {}).items()
                    if k in ("opset", "dynamic", "compact_embeddings")}, **dict(latency))
        else:
            report = compress(src.model, method, calib=calib, progress=progress, **options)
    notes = [str(w.message) for w in caught if "edgestack" in str(w.filename)]
    t1 = time.perf_counter()
    log(f"exporting to {out}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves none
    metadata = {"method": method, "source": src.description, "compression": report.to_dict(),
                **({"latency_search": search.to_dict()} if search else {})}
    opts = {"log": log, **dict(export_options or {})}
    if (load or {}).get("task") == "text-generation":
        opts.pop("dynamic", None)  # a decoder export is dynamic by its contract
        result = export_decoder(src.model, out, progress=progress, metadata=metadata, **opts)
    else:
        result = export(src.model, src.inputs, out, progress=progress, metadata=metadata,
                        **opts)
    return Exported(src, report, result, calib_text, notes, t1 - t0,
                    time.perf_counter() - t1, search)


def export_source(source: str, method: str, options: Mapping[str, Any], folder: Path,
                  say: Callable[[str], None], task: str | None = None,
                  calib_file: str | None = None, progress: Progress = False,
                  ) -> tuple[Path, dict[str, np.ndarray]]:
    """Compress ``source`` with ``method`` (BitStack: :data:`BITSTACK_DEFAULTS` under
    ``options``) and export it to ``folder/exported.onnx`` (:func:`compress_and_export`, no
    parity check: the packer checks the package); also the source's example inputs (numpy),
    used as the golden inputs."""
    say(f"pack: loading {source}")
    opts = {**(BITSTACK_DEFAULTS if method == "bitstack" else {}), **dict(options)}
    out = folder / "exported.onnx"
    done = compress_and_export(source, method, opts, out, log=lambda m: say(f"pack: {m}"),
                               calib_file=calib_file, load={"task": task},
                               export_options={"parity": False}, progress=progress)
    return out, done.example_inputs()


def pack_model(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
               method: str = "bitstack", options: Mapping[str, Any] | None = None,
               target: str = "ort-cpu", name: str | None = None,
               golden_inputs: Mapping[str, np.ndarray] | None = None,
               overwrite: bool = False, log: Callable[[str], None] | None = None,
               task: str | None = None, calib: str | None = None,
               progress: Progress = False, **pack_options: Any) -> Any:
    """Write a device package for ``source`` at ``out`` (a directory, or ``.tar``).

    Args:
        source: an ONNX file written by ``edgestack export``, or a model source (folder,
            ``module:factory``, built-in name) to compress with ``method`` and ``options``
            and export first (its example inputs become the golden inputs).
        out, target, overwrite: as :func:`edgestack.packer.pack.pack` (checked before any
            compression).
        name: the model name in the manifest (default: the ONNX file's stem, or
            ``<source>-<method>``).
        task: a Hugging Face folder's task (see :func:`edgestack.sources.load_source`).
        calib: a calibration file for a model source (see
            :meth:`edgestack.sources.ModelSource.calibration`).
        progress: a model source: tqdm bars of its compression and export on stderr
            (``True``, ``False`` (default) or ``None``: when stderr is a terminal).
        golden_inputs, log, pack_options: passed to :func:`edgestack.packer.pack.pack`
            (``profile``, ``steps_per_level``, ``created``; a decoder's ``max_context``,
            ``max_batch``, ``prefill_chunk``, ``tokenizer``: default, a source folder's
            ``tokenizer.json``; ``tied_tables``).

    A graph with BitStack layers packed for a tiered target (``ort-cpu``, ``ort-arm``,
    ``openvino-cpu``) becomes a tiered package; any other graph, or any graph for
    ``tensorrt-gpu``, is compiled for the target first (:func:`compile_model`: one dense
    tier; BitStack layers at their full stack), so a shift model's package serves the same
    int8 graph as ``edgestack compile``.

    Returns:
        The :class:`~edgestack.packer.pack.PackResult`.

    Raises:
        PackageError: as :func:`edgestack.packer.pack.pack`, or a file that is not ONNX
            (:func:`edgestack.packer.pack.read_onnx`).
    """
    from edgestack.exporter.passes import compact_embeddings  # lazy: onnx at import
    from edgestack.packer.pack import check_out, logger, pack, read_onnx  # lazy: onnx at import

    say = log or logger.info
    check_out(out, target, overwrite)
    src = Path(source)
    work = atomic.temp_dir("pipeline")  # removed below; after a kill, by the next run
    try:
        if src.suffix != ".onnx":
            if src.is_file():
                raise PackageError(
                    f"pack: {src} is not an .onnx file; expected an ONNX file written by "
                    "`edgestack export`, or a model source (folder, module:factory, built-in)")
            name = name or f"{Path(str(source).rstrip('/')).name.split(':')[-1]}-{method}"
            src, examples = export_source(str(source), method, options or {}, work, say,
                                         task, calib, progress)
            if task == "text-generation":   # the packer's golden prompt, not the trace's
                examples = {}
                if pack_options.get("tokenizer") is None and (
                        Path(str(source)) / "tokenizer.json").is_file():
                    pack_options["tokenizer"] = str(source)   # the folder's own tokenizer
            golden_inputs = golden_inputs or examples or None
        model = compact_embeddings(read_onnx(src, say), log=say)  # int8 embedding tables
        tiered = any(n.domain == "edgestack" and n.op_type == "BitStackWeight"
                     for n in model.graph)
        if not tiered or target not in TIERED_TARGETS:
            # nothing to tier, or a target that serves no tiers: the target's compiled graph
            # (shift codes as int8, attention fused, every other edgestack op materialised)
            import onnx_ir as ir

            dense = work / "dense.onnx"
            ir.save(model, dense, external_data="dense.onnx.data")
            del model
            pack_options.pop("steps_per_level", None)
            return compile_model(dense, target, out, name=name or src.stem, source=str(source),
                                 golden_inputs=golden_inputs, overwrite=overwrite, log=say,
                                 **pack_options)
        return pack(source, out, target=target, name=name or src.stem, model=model,
                    golden_inputs=golden_inputs, overwrite=overwrite, log=say,
                    **pack_options)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compile_model(model: str | os.PathLike[str], target: str, out: str | os.PathLike[str], *,
                  profile: Any = None, options: Mapping[str, Any] | None = None,
                  golden_inputs: Mapping[str, np.ndarray] | None = None,
                  name: str | None = None, overwrite: bool = False,
                  log: Callable[[str], None] | None = None, created: str | None = None,
                  source: str | None = None, **decoder_options: Any) -> Any:
    """Compile an exported ONNX model for ``target`` into a device package at ``out``.

    The target lowers the graph (:meth:`edgestack.targets.base.Target.lower`: shift codes to
    int8, attention fusion, every other edgestack op materialised, ...) and the lowered ONNX
    is packed (:func:`edgestack.packer.pack.pack`: one dense tier, weights as external
    data). Its golden outputs are the lowered graph's on x86 ONNX Runtime, judged with the
    target precision's tolerance (:data:`edgestack.targets.parity.TOLERANCES`): the device
    self-test checks that it computes what x86 computes. The lowered graph itself is checked
    against the source model on the same inputs (target parity,
    :func:`~edgestack.targets.parity.judge`: the rule
    plus cosine/top-1 for quantized precisions); the result, with the lowering's options,
    report and precision (and TensorRT's engine build settings) is the manifest's
    ``metadata.compile``.

    Args:
        model: an ONNX file written by ``edgestack export``.
        target: one of :data:`edgestack.targets.TARGET_NAMES`.
        out: the package directory, or ``.tar``.
        profile: a device profile (name or object) for the lowering's defaults.
        options: the target's lowering options (see each target's docstring).
        golden_inputs: the self-test's inputs (default: generated from the graph's inputs).
        name, overwrite, log, created: as :func:`edgestack.packer.pack.pack`.
        source: what the manifest records as the model's source (default: ``model``).
        decoder_options: a decoder's ``max_context``, ``max_batch``, ``prefill_chunk``,
            ``tokenizer`` (see :func:`edgestack.packer.pack.pack`); its default golden
            inputs are a short prompt with an empty cache. A tied LM head's table stays as
            the target lowered it (``tied_tables`` is ignored: the golden outputs are the
            lowered graph's, judged with its tolerance).

    Returns:
        The :class:`~edgestack.packer.pack.PackResult`, with ``compile`` set (the
        ``metadata.compile`` it wrote).

    Raises:
        TargetError: a bad option, or the lowering failed. PackageError: as ``pack``.
    """
    import onnx_ir as ir

    from edgestack.packer.pack import check_out, logger, pack, read_onnx  # lazy: onnx at import

    say = log or logger.info
    tgt = get_target(target)
    check_out(out, target, overwrite)
    src = Path(model)
    contract = contract_of(read_onnx(src, say, what="compile").metadata_props)  # no weights
    if contract is not None and golden_inputs is None:
        golden_inputs = golden_prompt(contract)
    if isinstance(profile, str):
        profile = load_profile(profile)
    work = atomic.temp_dir("compile")  # removed below; after a kill, by the next run
    try:
        feeds = {k: np.asarray(v) for k, v in (golden_inputs or example_feeds(
            src, batch=1, seq=16)).items()}
        say(f"compile: lowering {src} for {target}")
        art = tgt.lower(src, work / "lowered", profile, **dict(options or {}))
        source_ref = reference_outputs(src, feeds)       # what the source model computes
        lowered_path = art.folder / "model.onnx"
        got = reference_outputs(lowered_path, feeds)
        check = TargetCheck(target, "fail", precision=art.precision, reason="x86 ORT")
        judge(check, got, source_ref, TOLERANCES)
        parity = {"passed": check.status == "pass",
                  "outputs": [asdict(o) for o in check.outputs], "reason": check.reason}
        if not parity["passed"]:
            worst = min((o.cosine for o in check.outputs), default=0.0)
            logging.getLogger("edgestack.pipeline").warning(
                "compile: the %s graph differs from the source model on x86 ONNX Runtime by "
                "more than the %s tolerance on the golden inputs (lowest cosine %.5f; "
                "metadata.compile.parity has every output)", target, art.precision, worst)
        tol = TOLERANCES[art.precision]
        info: dict[str, Any] = {"precision": art.precision, "arch": art.arch,
                                "options": art.options, "report": art.report,
                                "parity": parity}
        if "build" in art.report:  # TensorRT: the engine is built on the device
            info["build"] = {**art.report["build"], "onnx": "model.onnx",
                             "engine": "model.engine"}
        info = json.loads(json.dumps(info, default=str))  # as the manifest stores it
        result = pack(source or src, out, target=target, name=name or src.stem,
                      model=ir.load(lowered_path), golden_inputs=feeds,
                      golden_outputs=got, tolerance=(tol.rtol, tol.atol),
                      metadata={"compile": info}, overwrite=overwrite, log=say,
                      created=created,
                      profile=profile if getattr(profile, "target", None) == target else None,
                      **{**decoder_options, "tied_tables": "float"})
        result.compile = info
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = ["pack_model", "compile_model", "compress_and_export", "export_source", "Exported",
           "BITSTACK_DEFAULTS"]
