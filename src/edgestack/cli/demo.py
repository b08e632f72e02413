"""``edgestack demo``: the main job on the embedded default model."""

from __future__ import annotations

import argparse

from edgestack.cli import (
    COUNT,
    EXIT_CHECK_FAILED,
    EXIT_OK,
    THREADS,
    bounds,
    emit_json,
    prepare_output,
    progress,
)
from edgestack.errors import EdgestackError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole toolchain on all-MiniLM-L6-v2: compress, export, compile, pack, run, "
        "bench",
        description="Run the main job on the embedded default model (all-MiniLM-L6-v2): "
        "compress with each method and export with edgestack ops; compile for every target "
        "available here (parity vs the x86 reference; unavailable targets are listed with the "
        "reason); build the baselines (ORT fp32 / int8 / int4, OpenVINO f32 / bf16) and "
        "measure their peak RSS increase; pack the BitStack model and run it with the runtime "
        "manager at a budget equal to each baseline's memory (those below the package's "
        "smallest plan are reported, not run) and at its smallest plan; bench everything. "
        "Writes OUT/report.md (opening with what passed and what failed, ending with the "
        "files OUT holds and their sizes), report.json, PNG plots, the BitStack package and "
        "its exported model (about 0.1 GB); the scratch work (every export, compiled "
        "artifact and baseline) goes to OUT/work, removed at the end unless --keep-work. "
        "OUT is replaced (it must be new, empty or a previous demo's output). Exit 1 when a "
        "check fails: export parity, a target check, a self-test, or a package row whose "
        "measured peak RSS increase is over its budget.",
    )
    p.add_argument("--out", default="edgestack-demo", help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output folder of an earlier demo (one with a report.json)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--threads", type=int, default=2, help="ORT threads (default 2)")
    p.add_argument("--iterations", type=int, default=20, help="timed calls per bench subject")
    p.add_argument("--targets", default="all",
                   help="comma-separated targets for the compile step, or 'all' (default)")
    p.add_argument("--no-bench", action="store_true",
                   help="skip the baselines and the bench (the package then runs at the "
                   "smallest plans of its first and last tiers)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of none,shift,bitstack,lowrank,prune")
    p.add_argument("--keep-work", action="store_true",
                   help="keep the scratch folder OUT/work: every method's export, the "
                   "compiled artifacts of every target, the baselines and the bench inputs "
                   "(several GB for the full demo; bench/runtime_latency.py reads them)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=run)
    bounds(p, seq=COUNT, threads=THREADS, iterations=COUNT)


def run(args: argparse.Namespace) -> int:
    from edgestack.demo import DEFAULT_METHODS, run_demo  # lazy: keeps CLI start light

    methods = None
    if args.methods:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in names if m not in DEFAULT_METHODS]
        if bad:
            raise EdgestackError(
                f"unknown method(s) {', '.join(bad)}; choose from {', '.join(DEFAULT_METHODS)}")
        if "none" not in names:
            names.insert(0, "none")  # the fp32 reference for quality
        methods = {m: DEFAULT_METHODS[m] for m in names}
    targets = args.targets if args.targets == "all" else tuple(
        t.strip() for t in args.targets.split(",") if t.strip())
    # the demo replaces its whole folder: only an empty one or an earlier demo's
    prepare_output(args.out, overwrite=args.overwrite, kind="folder", marker="report.json")
    result = run_demo(args.out, methods=methods, seq=args.seq, threads=args.threads,
                      iterations=args.iterations, targets=targets,
                      bench=not args.no_bench, keep_work=args.keep_work,
                      log=progress("demo"))
    if args.json:
        emit_json({"report": str(result.report_path), **result.to_dict()})
    else:
        print(result.report_path.read_text())
        print(f"report written to {result.report_path.resolve()}")
        print(f"output folder {result.out_dir.resolve()}: {result.output_bytes / 1e6:.1f} MB"
              + (" (scratch work/ kept: --keep-work)" if args.keep_work else
                 " (scratch work removed; --keep-work keeps it)"))
    return EXIT_OK if result.ok else EXIT_CHECK_FAILED
