#!/usr/bin/env python3
"""MiniLM latency per target, side by side in one run (edgestack vs the baselines).

Rows (batch 1, seq 128 by default, 2 threads, median of timed calls):

- ORT fp32 dense (the reference) and ORT ``quantize_dynamic`` int8 of the dense model (the
  baseline a user would pick);
- edgestack shift 4-bit DeepShift (7 levels: exact int8) compiled for ``ort-cpu`` with
  ``int8=dynamic`` (integer kernels) and with ``int8=off`` (materialized fp32);
- OpenVINO f32 and bf16 on the dense and the shift models (``openvino-cpu``; the shift
  model materialized, and with exact int8 weights).

Usage::

    .venv/bin/python bench/targets_latency.py [--seq 128] [--threads 2] [--iters 50]
        [--work DIR] [--json OUT]

Exported models are cached in ``--work`` (default ``.cache/bench-targets``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np


def export_models(work: Path, seq: int) -> dict[str, Path]:
    from edgestack import zoo
    from edgestack.compress import compress
    from edgestack.exporter import export

    out = {}
    for name, opts in (("dense", None), ("shift4z", {"bits": 4, "zero": True})):
        path = work / f"minilm_s{seq}_{name}.onnx"
        if not path.exists():
            print(f"exporting {path.name} ...", file=sys.stderr, flush=True)
            model, inputs = zoo.minilm(seq=seq)
            if opts:
                compress(model, "shift", calib=[inputs], **opts)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export(model, inputs, path, parity=False)
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--work", default=".cache/bench-targets")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgestack.targets import get_target
    from edgestack.targets.openvino_cpu import OpenVinoCpuRunner

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = export_models(work, args.seq)
    qd = work / f"minilm_s{args.seq}_dense_qdyn.onnx"
    if not qd.exists():
        quantize_dynamic(str(models["dense"]), str(qd), weight_type=QuantType.QInt8)

    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 30000, (1, args.seq)).astype(np.int64),
             "attention_mask": np.ones((1, args.seq), np.int64),
             "token_type_ids": np.zeros((1, args.seq), np.int64)}
    ort_cpu, ov = get_target("ort-cpu"), get_target("openvino-cpu")
    opts = {"threads": args.threads, "graph_optimization": "all"}
    entries = []

    def bench(label: str, runner, precision: str) -> None:
        entries.append((label, runner.activate(), precision))

    art = ort_cpu.lower(models["dense"], work / "a_dense", int8="off", **opts)
    bench("ORT fp32 dense", ort_cpu.runner(art), "fp32")
    art = ort_cpu.lower(qd, work / "a_qdyn", int8="off", **opts)
    bench("ORT quantize_dynamic int8 (baseline)", ort_cpu.runner(art), "int8")
    art = ort_cpu.lower(models["shift4z"], work / "a_shift_dyn", int8="dynamic", **opts)
    bench("edgestack shift4 DeepShift, ort-cpu int8", ort_cpu.runner(art), "int8")
    art = ort_cpu.lower(models["shift4z"], work / "a_shift_f32", int8="off", **opts)
    bench("edgestack shift4 DeepShift, ort-cpu fp32", ort_cpu.runner(art), "fp32")
    for name, int8 in (("dense", "off"), ("shift4z", "off"), ("shift4z", "weights")):
        art = ov.lower(models[name], work / f"ov_{name}_{int8}", threads=args.threads,
                       int8=int8)
        label = {"dense": "OpenVINO dense", "shift4z": "OpenVINO shift4 DeepShift"}[name]
        for prec in ("fp32", "bf16"):
            bench(f"{label}, int8 weights={int8}", OpenVinoCpuRunner(art, precision=prec),
                  prec)

    # Interleaved rounds: every model gets the same share of a noisy (shared) machine.
    import time

    ref = None
    times: list[list[float]] = [[] for _ in entries]
    cos = []
    for label, runner, _ in entries:
        f = {k: v for k, v in feeds.items() if k in runner.artifact.inputs}
        out = runner.infer(f)
        first = out[next(iter(out))].ravel().astype(np.float64)
        ref = first if ref is None else ref
        cos.append(float(first @ ref / (np.linalg.norm(first) * np.linalg.norm(ref))))
        for _ in range(3):
            runner.infer(f)
    rounds = 5
    for _ in range(rounds):
        for k, (label, runner, _) in enumerate(entries):
            f = {n: v for n, v in feeds.items() if n in runner.artifact.inputs}
            for _ in range(max(1, args.iters // rounds)):
                t0 = time.perf_counter()
                runner.infer(f)
                times[k].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for (label, runner, precision), ts, c in zip(entries, times, cos):
        runner.release()
        rows.append({"model": label, "precision": precision,
                     "p50_ms": round(float(np.median(ts)), 2), "cosine_vs_fp32": round(c, 5)})

    base = rows[0]["p50_ms"]
    import os

    print(f"\nMiniLM batch 1, seq {args.seq}, {args.threads} threads, median of "
          f"{args.iters} calls per model in 5 interleaved rounds; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"| model | precision | p50 ms | vs ORT fp32 | cosine vs ORT fp32 dense |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        r["ratio"] = round(r["p50_ms"] / base, 3)
        print(f"| {r['model']} | {r['precision']} | {r['p50_ms']:.2f} | {r['ratio']:.2f}x | "
              f"{r['cosine_vs_fp32']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
