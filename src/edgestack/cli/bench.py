"""``edgestack bench``: latency, memory and quality per target (and tier), with baselines."""

from __future__ import annotations

import argparse

from edgestack.cli import (
    COUNT,
    EXIT_OK,
    EXIT_SKIPPED,
    NONNEG,
    POSITIVE,
    THREADS,
    bars,
    bounds,
    emit_json,
    prepare_output,
    progress,
)
from edgestack.errors import EdgestackError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure latency, peak memory and quality on each target, vs baselines",
        description="Benchmark an exported model (MODEL.onnx) or a device package (PKG): "
        "cold load time and peak RSS (each subject in a fresh process), latency p50/p90/p99/"
        "mean/std and throughput (all subjects timed interleaved in one process), and "
        "quality vs the reference: for a text encoder the masked mean-pooled "
        "sentence-embedding cosine (on the held sentences with --tokenizer), else the output "
        "cosine. --baseline adds what a user would pick instead: ONNX Runtime fp32, dynamic "
        "int8 per-tensor and per-channel, weight-only MatMulNBits int8 and int4, OpenVINO "
        "f32/bf16. Writes bench.json, bench.md (with Pareto tables) and PNG plots to --out. "
        "Exit 4 when no subject can run on this machine.",
    )
    p.add_argument("source", metavar="PKG|MODEL.onnx",
                   help="an ONNX model from `edgestack export`, or a package from "
                   "`edgestack pack` (then every tier is measured)")
    p.add_argument("--profile", default=None,
                   help="device profile name or TOML file (target, threads, precision)")
    p.add_argument("--targets", default=None,
                   help="comma-separated targets, or 'all' (default: the profile's target, "
                   "else ort-cpu)")
    p.add_argument("--baseline", action="store_true",
                   help="also measure ORT fp32 / dynamic int8 (per-tensor, per-channel) / "
                   "MatMulNBits int8 and int4 and OpenVINO f32/bf16")
    p.add_argument("--dense", default=None, metavar="DENSE.onnx",
                   help="the uncompressed model: baselines and quality reference (default: "
                   "the source with its compressed weights decoded)")
    p.add_argument("--iterations", type=int, default=30, help="timed calls per subject")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per subject first")
    p.add_argument("--seconds", type=float, default=None,
                   help="time each subject for at least this long (in addition to "
                   "--iterations)")
    p.add_argument("--batch", type=int, default=1, help="first symbolic input dimension")
    p.add_argument("--seq", type=int, default=128, help="other symbolic input dimensions")
    p.add_argument("--input", default=None, metavar="FILE.npz",
                   help="inputs (input name -> array) instead of generated ones")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: the profile's, else 2)")
    p.add_argument("--tiers", default="5",
                   help="packages: how many tiers to measure, spread from the smallest to the "
                   "largest, or 'all' (default 5)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a folder with the model's tokenizer.json: a text encoder's quality "
                   "is then measured on the 40 held sentences (default: on the bench inputs)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the fresh-process load time / peak RSS measurement")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--out", default="edgestack-bench", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing output folder of an earlier bench (one with a "
                   "bench.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)
    bounds(p, iterations=COUNT, warmup=NONNEG, seconds=POSITIVE, batch=COUNT, seq=COUNT,
           threads=THREADS)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise EdgestackError(f"bench: --tiers must be a positive count or 'all', found {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from edgestack.profiler.bench import run_bench  # lazy: keeps CLI start light
    from edgestack.targets.feeds import load_feeds  # lazy: keeps CLI start light

    prepare_output(args.out, [args.source, args.dense, args.input, args.profile, args.tokenizer],
                   overwrite=args.overwrite, kind="folder", marker="bench.json")
    targets = args.targets
    if targets not in (None, "all"):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    say = progress("bench")
    report = run_bench(
        args.source, args.out, profile=args.profile, targets=targets, baseline=args.baseline,
        dense_model=args.dense, iterations=args.iterations, warmup=args.warmup,
        seconds=args.seconds, batch=args.batch, seq=args.seq,
        feeds=load_feeds(args.input) if args.input else None, memory=not args.no_memory,
        plots=not args.no_plots, threads=args.threads, tokenizer=args.tokenizer,
        tiers=args.tiers if args.tiers == "all" else _count(args.tiers),
        log=lambda line: say(line.removeprefix("bench: ")),
        progress=bars(args))
    if args.json:
        emit_json({"ok": report.ran, "skipped_all": not report.ran, **report.to_dict()})
    else:
        print(report.markdown())
        print(f"\nwrote {report.files.get('markdown')}, {report.files.get('json')}"
              + "".join(f", {v}" for k, v in report.files.items() if k.endswith("plot")))
    if not report.ran:
        if not args.json:
            print("edgestack bench: skipped: no subject can run on this machine "
                  f"({'; '.join(f'{k}: {v}' for k, v in report.skipped.items())})")
        return EXIT_SKIPPED
    return EXIT_OK
