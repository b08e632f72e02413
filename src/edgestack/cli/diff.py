"""``edgestack diff``: run two models on the same inputs and find the first value where they
diverge (every intermediate value compared, like Polygraphy's ``--onnx-outputs mark all``).

The library is :mod:`edgestack.profiler.diff`; the arguments (paths, inputs, tolerances) are
checked by :mod:`edgestack.profiler.diff_args` before any model runs.
"""

from __future__ import annotations

import argparse
import math

from edgestack.cli import EXIT_CHECK_FAILED, EXIT_OK, emit_json, progress
from edgestack.errors import TargetError

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
"""``edgestack.exporter.parity``'s defaults (the CLI checks arguments before importing it)."""

_log = progress("diff")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diff",
        help="compare two models value by value and name the first value that diverges",
        description="Run A and B on the same inputs with every intermediate value captured "
        "(ONNX: every node output marked as a graph output, edgestack functions inlined, "
        "ONNX Runtime CPU; torch: a forward hook on every module), compare every value "
        "present in both (ONNX: same name and shape; torch vs ONNX: a module and the value "
        "its name scope produces) with edgestack's one comparison rule (max_abs <= atol or "
        "max_rel <= rtol), in A's order, and name the first value that fails: the earliest "
        "divergence. Exit 0 when the final outputs agree, 1 when they do not, 2 on bad "
        "input.",
    )
    p.add_argument("a", metavar="A", help="the reference: an .onnx file, a folder with "
                   "model.onnx (a compile output or a package), or a torch model source "
                   "(model folder, module:factory, built-in name)")
    p.add_argument("b", metavar="B", help="the model compared with A (same kinds)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--inputs", default=None, metavar="FILE.npz",
                   help="inputs: an .npz of arrays named like the graph inputs")
    g.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed of the example inputs generated from the input signature "
                   "(default 0)")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help=f"absolute tolerance on max|b - a| (default {DEFAULT_ATOL:g})")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help=f"tolerance on max|b - a| / max|a| (default {DEFAULT_RTOL:g})")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="show the N largest differences (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgestack.profiler.diff_args import make_feeds, resolve_model  # lazy: onnx at CLI start

    bad = [f"{flag} {v!r} (expected {want})" for flag, v, ok, want in (
        ("--atol", args.atol, math.isfinite(args.atol) and args.atol >= 0, "a number >= 0"),
        ("--rtol", args.rtol, math.isfinite(args.rtol) and args.rtol >= 0, "a number >= 0"),
        ("--top", args.top, args.top >= 1, "an integer >= 1"),
        ("--seed", args.seed, args.seed is None or args.seed >= 0, "an integer >= 0"),
    ) if not ok]
    if bad:
        raise TargetError(f"bad value: {', '.join(bad)}")
    refs = [resolve_model(args.a, "A"), resolve_model(args.b, "B")]
    make_feeds(refs, args.inputs, args.seed or 0)      # checked before anything runs

    from edgestack.profiler.diff import diff_models, render_text  # lazy: torch at CLI start

    if not args.json:
        _log(f"running {refs[0].label} and {refs[1].label} with every value captured")
    report = diff_models(refs[0], refs[1], inputs=args.inputs, seed=args.seed or 0,
                         atol=args.atol, rtol=args.rtol)
    if args.json:
        emit_json({"ok": report.passed, **report.to_dict(args.top)})
    else:
        print(render_text(report, args.top))
    return EXIT_OK if report.passed else EXIT_CHECK_FAILED
