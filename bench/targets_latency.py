#!/usr/bin/env python3
"""MiniLM latency per target, side by side in one run (edgestack vs the baselines).

Rows (batch 1, seq 128 by default, 2 threads, median of timed calls):

- ORT fp32 dense *plain* (ORT's defaults: level ``all``, no edgestack fusions): the reference
  the issue asks for; and the same dense model compiled by ``ort-cpu`` with its default
  tuning (``transformer=auto``: MultiHeadAttention + BiasGelu fusions; the session's
  ``disabled_optimizers=SkipLayerNormFusion``): the *honest* fp32 reference, since every
  tuning that helps the int8 model helps it too;
- ORT ``quantize_dynamic`` int8 of the dense model, per-tensor and ``per_channel=True``
  (the careful baseline; weights in external data, session opened from the path), plain and
  with the same ort-cpu tuning;
- edgestack shift 4-bit DeepShift (codes with zero, GPTQ rounding calibrated on the shipped
  corpus; exact int8) compiled for ``ort-cpu`` with
  ``int8=dynamic`` (integer kernels), plain and tuned, and with ``int8=off`` (materialized
  fp32, tuned);
- the shift model's **device package** (``edgestack pack``: compiled for ``ort-cpu``, the
  integer kernels) served by ``edgestack.runtime.Runtime``, with the same threads and spinning;
- OpenVINO f32 and bf16 on the dense and the shift models (``openvino-cpu``; the shift
  model materialized, and with exact int8 weights).

With ``--spinning both`` (default) every ORT row runs twice: ORT's default (pool threads
spin between ops) and ``spinning=off`` (they sleep); each is compared with the fp32 dense rows
of the same setting. On a machine shared with other processes spinning threads steal the
cores the other thread needs, so the two settings can rank differently.

Every model is timed in ``--rounds`` interleaved rounds (each round runs every model for
``iters / rounds`` calls, in an order rotated every round), so machine load hits all of them
alike; the ratios are the numbers to read. Columns: p50 and p10 ms, p50 ratio to both fp32
references, cosine of the first output against the plain dense model on random tokens
(compression + activation rounding, not parity), and the quality a user sees: the masked
mean-pooled sentence-embedding cosine against the dense fp32 model over ``--sentences`` held
sentences (``edgestack.core.quality``, the bench's metric).

Because this machine is often shared, a second phase times the ORT models with ONE intra-op
thread by CPU time (``time.thread_time``, p50): the work per call, which preemption by other
processes does not inflate (wall time under load mostly measures the scheduler). Columns
``1-thread CPU ms`` and its ratios to both fp32 references.

A kernel check first times ``SkipLayerNormalization`` (what ORT's ``SkipLayerNormFusion``
makes) against ``Add + LayerNormalization`` on a ``[1, seq, 384]`` tensor: the reason the
ort-cpu runner disables that fusion by default.

Usage::

    .venv/bin/python bench/targets_latency.py [--seq 128] [--threads 2] [--iters 60]
        [--rounds 30] [--spinning on|off|both] [--work DIR] [--json OUT]

A GEMM check times the int8 GEMMs (the graph the ``ort-cpu`` int8 lowering writes, which
ORT fuses into ``DynamicQuantizeMatMul``) against the fp32 ``MatMul`` at MiniLM's shapes,
the 36 GEMMs of 6 layers chained in one graph, nothing else: since attention, GELU and
LayerNorm cost the fp32 and the int8 model the same, the int8 model's ratio cannot go below
that GEMM ratio. It also records the CPU's int8 dot-product extensions (VNNI), which the fast
int8 kernels need. An operator
profile (ORT's profiler, one thread) of the tuned dense fp32 and edgestack int8 models splits
each call into GEMMs and everything else.

Exported models are cached in ``--work`` (default ``.cache/bench-targets``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from edgestack.core.ort import cpu_session


class PackageRow:
    """A device package served by the runtime, with the part of a target runner the bench
    reads (``artifact.inputs/report/options/target``, ``infer``, ``release``)."""

    def __init__(self, path: Path, threads: int, spinning: str) -> None:
        from types import SimpleNamespace

        from edgestack.runtime import Runtime

        self.rt = Runtime(path, threads=threads, spinning=spinning)
        self.artifact = SimpleNamespace(inputs=set(self.rt.input_names), report={},
                                        options={"spinning": spinning}, target="package")

    def infer(self, feeds: dict) -> dict:
        return self.rt.infer(feeds)

    def release(self) -> None:
        self.rt.close()


def cpu_flags() -> list[str]:
    """The CPU's int8 dot-product / matrix extensions (``/proc/cpuinfo``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")
                   if f" {f}" in text})


def sentence_cosines(entries: list, seq: int, count: int) -> list[float]:
    """Mean masked mean-pooled sentence-embedding cosine of every entry against the first
    (the plain dense fp32 model) over ``count`` held sentences."""
    from edgestack.core.quality import (
        compare_embeddings,
        embed,
        held_sentences,
        sentence_feeds,
        tokenize,
    )
    from edgestack.zoo import minilm_path

    batches = tokenize(minilm_path(), held_sentences()[:count], seq)
    out, ref = [], None
    for _label, runner, *_ in entries:
        like = {k: np.zeros((1, seq), np.int64) for k in runner.artifact.inputs}
        feeds = sentence_feeds(batches, like)
        e = embed(lambda f, r=runner: r.infer(f)["last_hidden_state"], feeds)
        ref = e if ref is None else ref
        out.append(compare_embeddings(ref, e)["cosine_mean"])
    return out


def export_models(work: Path, seq: int) -> dict[str, Path]:
    """The dense MiniLM and shift 4-bit DeepShift codes (with zero: at most 7 exponent levels
    a channel, so exact int8; GPTQ rounding calibrated on the shipped corpus: ``edgestack
    export minilm --method shift --zero``), exported at ``seq``. (The zero-free default has 8
    levels: not exact int8, so ort-cpu's int8 lowering leaves it float32.)"""
    from edgestack import zoo
    from edgestack.compress import compress
    from edgestack.exporter import export
    from edgestack.sources import load_source

    out = {}
    for name in ("dense", "shift4z"):
        path = work / f"minilm_s{seq}_{name}.onnx"
        if not path.exists():
            print(f"exporting {path.name} ...", file=sys.stderr, flush=True)
            model, inputs = zoo.minilm(seq=seq)
            if name == "shift4z":
                calib, _what = load_source("minilm").calibration()
                compress(model, "shift", calib=calib, bits=4, zero=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export(model, inputs, path, parity=False)
        out[name] = path
    return out


def interleaved(calls: list, rounds: int, per: int, clock=time.perf_counter,
                rotate: bool = True) -> list[list[float]]:
    """Time ``calls`` (argument-less callables) in ``rounds`` rounds of ``per`` calls each,
    ms per call by ``clock``; with ``rotate`` the order turns one place every round (no
    model always follows the same one: a spinning session's threads keep spinning a moment
    after its run and slow the next model)."""
    times: list[list[float]] = [[] for _ in calls]
    n = len(calls)
    for rnd in range(rounds):
        for k in ([(rnd + j) % n for j in range(n)] if rotate else range(n)):
            for _ in range(per):
                t0 = clock()
                calls[k]()
                times[k].append((clock() - t0) * 1e3)
    return times


def layernorm_kernels(seq: int, threads: int, iters: int = 200) -> dict[str, float]:
    """p50 microseconds of ``SkipLayerNormalization`` vs ``Add + LayerNormalization`` on
    ``[1, seq, 384]`` (interleaved)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d = 384
    feeds = {n: rng.standard_normal((1, seq, d)).astype(np.float32) for n in ("x", "r")}
    inits = [numpy_helper.from_array(rng.random(d).astype(np.float32), n) for n in "gb"]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, seq, d]) for n in "xro"]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "r"], ["a"]),
         helper.make_node("LayerNormalization", ["a", "g", "b"], ["o"], axis=-1,
                          epsilon=1e-12)], "ln", io[:2], io[2:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model = model.SerializeToString()
    sessions = {label: cpu_session(model, threads, disabled=disabled) for label, disabled in
                (("SkipLayerNormalization (fused)", []),
                 ("Add + LayerNormalization", ["SkipLayerNormFusion"]))}
    times = interleaved([lambda s=s: s.run(None, feeds) for s in sessions.values()],
                        iters // 10, 10, rotate=False)
    return {k: round(float(np.median(v)) * 1e3, 1) for k, v in zip(sessions, times, strict=True)}


def gemm_kernels(seq: int, threads: int, d: int = 384, layers: int = 6, rounds: int = 20,
                 per: int = 3) -> dict:
    """The int8 GEMMs against the fp32 GEMMs at MiniLM's shapes, nothing else: how much
    faster ORT's int8 kernel is than its fp32 one on this CPU.

    One graph per precision chains the GEMMs of ``layers`` encoder layers (per layer 4 of
    ``[seq, d] x [d, d]``, then ``[seq, d] x [d, 4d]`` and ``[seq, 4d] x [4d, d]``; random
    weights scaled by ``1/sqrt(in)``), so the call overhead is paid once as in the model:
    fp32 ``MatMul`` on constant weights against the graph the ``ort-cpu`` int8 lowering
    writes for each (``DynamicQuantizeLinear``, ``MatMulInteger`` on int8 codes, ``Cast``,
    ``Mul``; ORT fuses it into ``DynamicQuantizeMatMul``). p50 per call: 1 thread by thread
    CPU time, ``threads`` threads by wall time, pool threads not spinning. Attention, GELU
    and LayerNorm cost the fp32 and the int8 model about the same, so the int8 model's
    ratio sits above ``gemm_ratio``. Also the CPU's int8 dot-product extensions (``*vnni*``
    flags of /proc/cpuinfo), which the fast int8 kernels need.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]
    weights = [(rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
               for _ in range(layers) for k, n in shapes]

    def graph(int8: bool) -> bytes:
        nodes, inits, x = [], [], "x"
        for i, w in enumerate(weights):
            y = f"h{i}"
            if int8:
                s = (np.abs(w).max(axis=0) / 64).astype(np.float32)
                q = np.clip(np.round(w / s), -127, 127).astype(np.int8)
                inits += [numpy_helper.from_array(q, f"q{i}"),
                          numpy_helper.from_array(s, f"s{i}")]
                nodes += [helper.make_node("DynamicQuantizeLinear", [x],
                                           [f"xq{i}", f"xs{i}", f"xz{i}"]),
                          helper.make_node("MatMulInteger", [f"xq{i}", f"q{i}", f"xz{i}"],
                                           [f"acc{i}"]),
                          helper.make_node("Cast", [f"acc{i}"], [f"accf{i}"],
                                           to=TensorProto.FLOAT),
                          helper.make_node("Mul", [f"xs{i}", f"s{i}"], [f"xws{i}"]),
                          helper.make_node("Mul", [f"accf{i}", f"xws{i}"], [y])]
            else:
                inits.append(numpy_helper.from_array(w, f"w{i}"))
                nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
            x = y
        io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d]),
              helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, seq, d])]
        g = helper.make_graph(nodes, "gemms", io[:1], io[1:], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]
                                 ).SerializeToString()

    models = {"fp32": graph(False), "int8": graph(True)}
    feeds = {"x": rng.standard_normal((1, seq, d)).astype(np.float32)}
    out: dict = {}
    for n_threads, clock, key in ((1, time.thread_time, "1_thread_cpu"),
                                  (threads, time.perf_counter, f"{threads}_threads_wall")):
        sessions = {name: cpu_session(model, n_threads, spinning="off")
                    for name, model in models.items()}
        for sess in sessions.values():
            sess.run(None, feeds)
        times = interleaved([lambda s=s: s.run(None, feeds) for s in sessions.values()],
                            rounds, per, clock, rotate=False)
        med = {name: float(np.median(ts)) for name, ts in zip(sessions, times, strict=True)}
        out[key] = {"fp32_ms": round(med["fp32"], 2), "int8_ms": round(med["int8"], 2),
                    "gemm_ratio": round(med["int8"] / med["fp32"], 3)}
    from edgestack.core.latency import cpu_extensions

    out["cpu_int8_dot_extensions"] = cpu_extensions()
    return out


def cpu_times(entries: list, feeds: dict, spinning: str, iters: int, rounds: int
              ) -> dict[int, float]:
    """p50 CPU time (ms, ``time.thread_time``) of one call with ONE intra-op thread, for the
    ORT rows with ``spinning`` (at one thread there is no pool to spin): the work each model
    does, which other processes on the machine do not inflate the way they inflate wall time.
    Keyed by entry index; interleaved and rotated like the wall-time rounds."""
    keys, calls = [], []
    for i, (_, runner, _, _) in enumerate(entries):
        art = runner.artifact
        if art.target != "ort-cpu" or art.options.get("spinning", "on") != spinning:
            continue
        s = cpu_session(art.path(), 1, art.options["graph_optimization"],
                        disabled=art.options.get("disabled_optimizers"))
        f = {k: v for k, v in feeds.items() if k in art.inputs}
        for _ in range(2):
            s.run(None, f)
        keys.append(i)
        calls.append(lambda s=s, f=f: s.run(None, f))
    times = interleaved(calls, rounds, max(1, iters // rounds), time.thread_time)
    return {k: round(float(np.median(v)), 2) for k, v in zip(keys, times, strict=True)}


def op_profile(entries: list, feeds: dict, calls: int = 30) -> dict[str, dict[str, float]]:
    """ms per call by operator type (ORT's profiler, ONE intra-op thread, pool not spinning)
    for the tuned dense fp32 and the tuned edgestack int8 model: where the two differ."""
    import tempfile

    wanted = {("ORT fp32 dense", "ort-cpu tuned"): "dense fp32",
              ("edgestack shift4 DeepShift, ort-cpu int8", "ort-cpu tuned"): "edgestack int8"}
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, runner, _p, tuning in entries:
            art = runner.artifact
            key = wanted.get((label, tuning))
            if key is None or key in out:
                continue
            sess = cpu_session(art.path(), 1, art.options["graph_optimization"], "off",
                               art.options.get("disabled_optimizers"),
                               profile=str(Path(tmp) / key.replace(" ", "_")))
            f = {k: v for k, v in feeds.items() if k in art.inputs}
            for _ in range(calls):
                sess.run(None, f)
            per_op: dict[str, float] = {}
            for ev in json.loads(Path(sess.end_profiling()).read_text()):
                if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
                    op = ev["args"]["op_name"]
                    per_op[op] = per_op.get(op, 0.0) + ev["dur"] / 1e3 / calls
            out[key] = {op: round(ms, 3) for op, ms in
                        sorted(per_op.items(), key=lambda kv: -kv[1])}
    return out


GEMM_OPS = ("Gemm", "FusedGemm", "MatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
            "MatMulInteger", "DynamicQuantizeLinear")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--spinning", choices=("on", "off", "both"), default="both",
                    help="ORT pool threads spin (ORT's default) or sleep between ops; both: "
                         "every ORT row twice, each compared with the fp32 rows of its setting")
    ap.add_argument("--work", default=".cache/bench-targets")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sentences", type=int, default=40,
                    help="held sentences for the sentence-embedding cosine")
    args = ap.parse_args(argv)

    import onnxruntime
    import openvino
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgestack.core.latency import latency_stats
    from edgestack.targets import get_target
    from edgestack.targets.openvino_cpu import OpenVinoCpuRunner

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = export_models(work, args.seq)
    qd = work / f"minilm_s{args.seq}_dense_qdyn.onnx"
    if not qd.exists():
        quantize_dynamic(str(models["dense"]), str(qd), weight_type=QuantType.QInt8)
    qdc = work / f"minilm_s{args.seq}_dense_qdyn_pc.onnx"
    if not qdc.exists():
        quantize_dynamic(str(models["dense"]), str(qdc), weight_type=QuantType.QInt8,
                         per_channel=True, use_external_data_format=True)
    pkg = work / f"minilm_s{args.seq}_shift4z.pkg"
    if not pkg.exists():
        from edgestack.pipeline import pack_model

        pack_model(models["shift4z"], pkg, log=lambda m: None)   # compiled: int8 kernels

    load0 = os.getloadavg()[0]
    kernels = layernorm_kernels(args.seq, args.threads)
    gemms = gemm_kernels(args.seq, args.threads)

    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 30000, (1, args.seq)).astype(np.int64),
             "attention_mask": np.ones((1, args.seq), np.int64),
             "token_type_ids": np.zeros((1, args.seq), np.int64)}
    ort_cpu, ov = get_target("ort-cpu"), get_target("openvino-cpu")
    common = {"threads": args.threads, "graph_optimization": "all"}
    plain = dict(common, transformer="off", disabled_optimizers=[])   # ORT's defaults
    tuned = dict(common)                                              # ort-cpu's defaults
    entries = []   # (label, runner, precision, tuning); runner.artifact: the compiled model

    def ort_row(label: str, src: Path, folder: str, int8: str, opts: dict, tuning: str,
                precision: str) -> None:
        art = ort_cpu.lower(src, work / folder, int8=int8, **opts)
        entries.append((label, ort_cpu.runner(art).activate(), precision, tuning))

    spins = ("on", "off") if args.spinning == "both" else (args.spinning,)
    for spin in spins:
        sfx = "" if spin == "on" else "_nospin"
        p, t = dict(plain, spinning=spin), dict(tuned, spinning=spin)
        ort_row("ORT fp32 dense", models["dense"], "a_dense" + sfx, "off", p, "plain", "fp32")
        ort_row("ORT fp32 dense", models["dense"], "a_dense_tuned" + sfx, "off", t,
                "ort-cpu tuned", "fp32")
        ort_row("ORT quantize_dynamic int8 (baseline)", qd, "a_qdyn" + sfx, "off", p, "plain",
                "int8")
        ort_row("ORT quantize_dynamic int8 (baseline)", qd, "a_qdyn_tuned" + sfx, "off", t,
                "ort-cpu tuned", "int8")
        ort_row("ORT quantize_dynamic int8 per-channel (baseline)", qdc, "a_qdync" + sfx,
                "off", p, "plain", "int8")
        ort_row("ORT quantize_dynamic int8 per-channel (baseline)", qdc,
                "a_qdync_tuned" + sfx, "off", t, "ort-cpu tuned", "int8")
        ort_row("edgestack shift4 DeepShift, ort-cpu int8", models["shift4z"],
                "a_shift_dyn" + sfx, "dynamic", p, "plain", "int8")
        ort_row("edgestack shift4 DeepShift, ort-cpu int8", models["shift4z"],
                "a_shift_dyn_tuned" + sfx, "dynamic", t, "ort-cpu tuned", "int8")
        ort_row("edgestack shift4 DeepShift, ort-cpu fp32", models["shift4z"],
                "a_shift_f32_tuned" + sfx, "off", t, "ort-cpu tuned", "fp32")
        entries.append(("edgestack shift4 DeepShift package, runtime (ort-cpu int8)",
                        PackageRow(pkg, args.threads, spin), "int8", "ort-cpu tuned"))
    for name, int8 in (("dense", "off"), ("shift4z", "off"), ("shift4z", "weights")):
        art = ov.lower(models[name], work / f"ov_{name}_{int8}", threads=args.threads,
                       int8=int8)
        label = {"dense": "OpenVINO dense", "shift4z": "OpenVINO shift4 DeepShift"}[name]
        for prec in ("fp32", "bf16"):
            entries.append((f"{label}, int8 weights={int8}",
                            OpenVinoCpuRunner(art, precision=prec).activate(), prec,
                            "openvino"))

    sentence_cos = sentence_cosines(entries, args.seq, args.sentences)
    ref = None
    cos, calls = [], []
    for _label, runner, *_ in entries:
        f = {k: v for k, v in feeds.items() if k in runner.artifact.inputs}
        out = runner.infer(f)
        first = out[next(iter(out))].ravel().astype(np.float64)
        ref = first if ref is None else ref
        cos.append(float(first @ ref / (np.linalg.norm(first) * np.linalg.norm(ref))))
        for _ in range(3):
            runner.infer(f)
        calls.append(lambda r=runner, f=f: r.infer(f))
    times = interleaved(calls, args.rounds, max(1, args.iters // args.rounds))
    cpu = cpu_times(entries, feeds, spins[0], args.iters, args.rounds)
    ops = op_profile(entries, feeds)
    load1 = os.getloadavg()[0]
    rows = []
    for i, ((label, runner, precision, tuning), ts, c) in enumerate(zip(entries, times, cos,
                                                                          strict=True)):
        art = runner.artifact
        runner.release()
        stats = latency_stats(ts)
        fusion = art.report.get("passes", {}).get("TransformerFusionPass", {})
        spin = art.options.get("spinning", "on") if art.target == "ort-cpu" else "-"
        rows.append({"model": label, "tuning": tuning, "spinning": spin, "precision": precision,
                     "p50_ms": round(stats["p50_ms"], 2), "p10_ms": round(stats["p10_ms"], 2),
                     "cpu_1thread_ms": cpu.get(i),
                     "attention_fused": fusion.get("attention_fused", 0),
                     "cosine_vs_fp32": round(c, 5),
                     "sentence_cosine": round(sentence_cos[i], 5)})
    refs = {}      # spinning -> (plain dense fp32, tuned dense fp32) p50
    for r in rows:
        if r["model"] == "ORT fp32 dense":
            refs.setdefault(r["spinning"], {})[r["tuning"]] = r["p50_ms"]
    cpu_ref = {r["tuning"]: r["cpu_1thread_ms"] for r in rows
               if r["model"] == "ORT fp32 dense" and r["cpu_1thread_ms"]}
    for r in rows:
        ref = refs.get(r["spinning"], refs[spins[0]])   # OpenVINO: vs the first ORT setting
        r["ratio"] = round(r["p50_ms"] / ref["plain"], 3)
        r["ratio_vs_tuned_fp32"] = round(r["p50_ms"] / ref["ort-cpu tuned"], 3)
        if r["cpu_1thread_ms"]:
            r["cpu_ratio"] = round(r["cpu_1thread_ms"] / cpu_ref["plain"], 3)
            r["cpu_ratio_vs_tuned_fp32"] = round(r["cpu_1thread_ms"] / cpu_ref["ort-cpu tuned"],
                                                 3)

    print(f"\nMiniLM batch 1, seq {args.seq}, {args.threads} threads, {len(times[0])} calls per "
          f"model in {args.rounds} interleaved rounds; ORT {onnxruntime.__version__}, OpenVINO "
          f"{openvino.__version__.split('-')[0]}; load average {load0:.1f} -> {load1:.1f}")
    kernel_p50 = ", ".join(f"{k} {v:.1f}" for k, v in kernels.items())
    print(f"kernel check, [1, {args.seq}, 384], p50 us: {kernel_p50}")
    gemm_ratios = "; ".join(
        f"{k}: fp32 {v['fp32_ms']:.2f} ms, int8 {v['int8_ms']:.2f} ms, int8/fp32 "
        f"{v['gemm_ratio']:.2f}" for k, v in gemms.items() if isinstance(v, dict))
    print("GEMM check (the 36 GEMMs of 6 layers chained, nothing else; int8 dot extensions: "
          f"{gemms['cpu_int8_dot_extensions']}): {gemm_ratios}")
    for key, per_op in ops.items():
        gemm = sum(v for k, v in per_op.items() if k in GEMM_OPS)
        rest = sum(v for k, v in per_op.items() if k not in GEMM_OPS)
        print(f"op profile, 1 thread, {key}: GEMMs {gemm:.2f} ms, other ops {rest:.2f} ms ("
              + ", ".join(f"{k} {v:.2f}" for k, v in list(per_op.items())[:6]) + ")")
    print("| model | tuning | spinning | precision | p50 ms | p10 ms | vs ORT fp32 (plain) | "
          "vs ORT fp32 (tuned) | 1-thread CPU ms | CPU vs plain fp32 | CPU vs tuned fp32 | "
          "cosine vs ORT fp32 dense | sentence cosine |")
    print("| --- " * 13 + "|")
    for r in rows:
        c = (f"{r['cpu_1thread_ms']:.2f} | {r['cpu_ratio']:.2f}x | "
             f"{r['cpu_ratio_vs_tuned_fp32']:.2f}x" if r["cpu_1thread_ms"] else "- | - | -")
        print(f"| {r['model']} | {r['tuning']} | {r['spinning']} | {r['precision']} | "
              f"{r['p50_ms']:.2f} | "
              f"{r['p10_ms']:.2f} | {r['ratio']:.2f}x | {r['ratio_vs_tuned_fp32']:.2f}x | "
              f"{c} | {r['cosine_vs_fp32']:.4f} | {r['sentence_cosine']:.4f} |")
    if args.json:
        meta = {"seq": args.seq, "batch": 1, "threads": args.threads, "calls": len(times[0]),
                "rounds": args.rounds, "onnxruntime": onnxruntime.__version__,
                "openvino": openvino.__version__, "load_average": [load0, load1],
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "layernorm_kernels_us": kernels,
                "gemm_kernels": gemms,
                "op_profile_1thread_ms": ops,
                "plain": "ORT defaults (level all), no edgestack fusions",
                "ort-cpu tuned": "ort-cpu defaults: transformer=auto (MultiHeadAttention, "
                                 "BiasGelu), disabled_optimizers=SkipLayerNormFusion",
                "spinning": "session.intra_op.allow_spinning on (ORT default) / off; ratios "
                            "are against the fp32 dense rows with the same setting",
                "cpu_1thread_ms": "p50 thread CPU time of one call with 1 intra-op thread "
                                  "(work per call, robust to other processes)",
                "sentence_cosine": f"masked mean-pooled embedding cosine vs the dense fp32 "
                                   f"model, {args.sentences} held sentences, seq {args.seq}",
                "cpu_flags": cpu_flags()}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n",
                                   encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
