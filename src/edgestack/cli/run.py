"""``edgestack run``: load a package within a budget and run it on inputs from a file."""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

from edgestack.cli import COUNT, EXIT_OK, bounds, emit_json, prepare_output, printable
from edgestack.cli.plan import add_package_args
from edgestack.cli.verify import check_golden, golden_inputs_of
from edgestack.core import atomic


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="load a package within a memory budget and run it on an input file",
        description="Load PKG with the plan for the budget (largest tier that fits) and run "
        "it on --input (an .npz mapping graph input names to arrays; default: the package's "
        "golden inputs). Prints the plan, timings and output summaries; --output saves the "
        "outputs as .npz.",
    )
    add_package_args(p)
    p.add_argument("--input", default=None, help=".npz of inputs (default: golden inputs)")
    p.add_argument("--output", default=None,
                   help="write the outputs to this .npz (never an input, nor inside the "
                   "package; written whole)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--repeat", type=int, default=1, help="run N times, report the median")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)
    bounds(p, repeat=COUNT)


def run(args: argparse.Namespace) -> int:
    from edgestack.runtime import Runtime
    from edgestack.targets.feeds import load_feeds

    if args.output is not None:
        prepare_output(args.output, [args.package, args.input, args.profile],
                       overwrite=args.overwrite, kind="file", flag="--output")
    given = load_feeds(args.input) if args.input else None      # bad input fails before loading
    t0 = time.perf_counter()
    with Runtime(args.package, args.budget, profile=args.profile, auto=args.auto,
                 tier=args.tier, threads=args.threads, calibrate=args.calibrate,
                 form=args.form, engine=args.engine, precision=args.precision) as rt:
        load_s = time.perf_counter() - t0
        feeds = given
        if feeds is None:
            feeds = rt.package.golden()[0]
            check_golden(rt.package.path, "inputs", feeds)
        times = []
        with contextlib.nullcontext() if given is not None else golden_inputs_of(
                rt.package.path):
            for _ in range(args.repeat):
                t = time.perf_counter()
                out = rt.infer(feeds)
                times.append(time.perf_counter() - t)
        if args.output is not None:
            atomic.write_file(args.output, lambda f: np.savez(f, **out))
        summary = {k: {"shape": list(v.shape), "dtype": str(v.dtype),
                       "mean": float(np.mean(v)), "std": float(np.std(v))}
                   for k, v in out.items()}
        median_ms = float(np.median(times) * 1000)
        if args.json:
            emit_json({"ok": True, "tier": rt.tier, "engine": rt.engine,
                       "precision": rt.precision, "plan": rt.plan.to_dict(),
                       "load_seconds": load_s, "median_ms": median_ms, "outputs": summary,
                       "bytes_read": rt.bytes_read})
        else:
            print(rt.plan.table())
            print(f"loaded in {load_s:.2f} s ({rt.bytes_read} block bytes read); "
                  f"infer median {median_ms:.2f} ms over {len(times)} run(s)")
            for k, s in summary.items():
                print(printable(f"  {k}: {s['shape']} {s['dtype']} mean {s['mean']:.4g} std "
                                f"{s['std']:.4g}"))
    return EXIT_OK
