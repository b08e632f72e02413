"""``edgestack demo``: the main job on the embedded default model."""

from __future__ import annotations

import argparse
import sys

from edgestack.cli import EXIT_CHECK_FAILED, EXIT_OK, emit_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="compress, export and measure all-MiniLM-L6-v2 with every method",
        description="Run the main job on the embedded default model (all-MiniLM-L6-v2): "
        "compress with each method, export with edgestack ops, check parity, measure size, "
        "quality and latency, and write OUT/report.md.",
    )
    p.add_argument("--out", default="edgestack-demo", help="output folder (default: %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--threads", type=int, default=2, help="ORT threads (default 2)")
    p.add_argument("--iterations", type=int, default=20, help="timed runs per model")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of none,shift,bitstack,lowrank,prune")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgestack.demo import DEFAULT_METHODS, run_demo
    from edgestack.errors import EdgestackError

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
    result = run_demo(args.out, methods=methods, seq=args.seq, threads=args.threads,
                      iterations=args.iterations,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        emit_json({"ok": result.ok, "report": str(result.report_path), "rows": result.rows,
                   "seconds": round(result.seconds, 1)})
    else:
        print(result.report_path.read_text())
        print(f"report written to {result.report_path.resolve()}")
    return EXIT_OK if result.ok else EXIT_CHECK_FAILED
