"""``edgestack plan``: print the memory plan of a package for a budget, loading nothing."""

from __future__ import annotations

import argparse

from edgestack.cli import EXIT_OK, NONNEG, THREADS, bounds, emit_json, printable, progress


def add_package_args(p: argparse.ArgumentParser) -> None:
    """PKG, then --budget / --profile / --auto (one of them) and --tier: what ``plan`` and
    ``run`` both take to pick a package's tier."""
    p.add_argument("package", metavar="PKG", help="package directory or .tar")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", default=None,
                   help="memory budget, e.g. 48MB, 1.5GiB (MB = 10^6 bytes, MiB = 2^20)")
    g.add_argument("--profile", default=None, help="device profile: its memory_budget")
    g.add_argument("--auto", action="store_true",
                   help="budget from available memory and the cgroup limit, minus a margin")
    p.add_argument("--tier", type=int, default=None, help="force a tier")
    p.add_argument("--form", choices=("auto", "int8", "nbits8", "fp32"), default="auto",
                   help="what materialised layers become: auto (default: the most exact "
                   "form whose plan fits the budget: fp32, then 8-bit weight-only nbits8, "
                   "then int8), or int8 (the fastest), nbits8, fp32")
    p.add_argument("--engine", choices=("auto", "onnxruntime", "openvino"), default="auto",
                   help="what runs the graphs: auto (default: the package target's; "
                   "openvino-cpu packages -> openvino), onnxruntime, or openvino (every layer "
                   "materialised in one dense graph)")
    p.add_argument("--precision", choices=("f32", "bf16", "f16"), default=None,
                   help="OpenVINO's inference precision (default: OpenVINO's, bf16 where the "
                   "CPU has it); only with the openvino engine")
    p.add_argument("--threads", type=int, default=None,
                   help="inference threads (1 to this machine's CPUs)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="plan with the documented memory constants instead of this machine's "
                   "measured fixed costs (measured once per package, a few seconds, cached)")
    p.add_argument("--recalibrate", action="store_true",
                   help="measure this machine's fixed costs again (ignore the cached ones)")
    bounds(p, threads=THREADS, tier=NONNEG)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="print the memory plan of a package for a budget (loads nothing)",
        description="Plan PKG for a memory budget before loading anything: the largest tier "
        "that fits, per layer the blocks, bytes and mode (materialized = fast, on-the-fly "
        "decode = small), activation arena, runtime overhead, total vs budget. Exit 2 when "
        "the budget is below the smallest tier (the message gives the minimum).",
    )
    add_package_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgestack.package import Package  # lazy: keeps CLI start light
    from edgestack.runtime import (  # lazy: keeps CLI start light
        DEFAULT_COSTS,
        calibrate,
        check_engine,
        plan_memory,
        resolve_budget,
    )

    budget, source = resolve_budget(args.budget, profile=args.profile, auto=args.auto)
    with Package.open(args.package) as pkg:
        engine = check_engine(args.engine, args.precision, pkg.manifest.target)
        costs = DEFAULT_COSTS if not (args.calibrate and budget is not None) else calibrate(
            pkg, threads=args.threads, refresh=args.recalibrate, log=progress("plan"),
            engine=engine, precision=args.precision)
        plan = plan_memory(pkg, budget, tier=args.tier, budget_source=source, costs=costs,
                           form=args.form, dense=engine == "openvino")
        if args.json:
            emit_json({"ok": True, "package": str(pkg.path), "model": pkg.manifest.model.name,
                       "target": pkg.manifest.target, "engine": engine, "plan": plan.to_dict()})
        else:
            print(printable(f"{pkg.path}: {pkg.manifest.model.name} ({pkg.manifest.target}, "
                            f"served with {engine}), {len(pkg.tiers)} tiers"))
            print(plan.table())
    return EXIT_OK
