"""``edgestack parity``: the same inputs through a reference and every available backend."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgestack.cli import COUNT, EXIT_CHECK_FAILED, EXIT_OK, bounds, emit_json
from edgestack.cli.compile import TARGETS
from edgestack.cli.options import METHODS, add_method_options, method_options
from edgestack.compress.options import check_options
from edgestack.core import atomic


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity",
        help="run a model through every backend on the same inputs and compare",
        description="MODEL is an .onnx file (reference: the file on x86 ONNX Runtime) or a "
        "model source (built-in name or module:factory; reference: the torch model, exported "
        "first, after --method). Each target compiles and runs it; a table shows max abs, "
        "max rel, cosine and top-1 agreement per output with precision-aware tolerances "
        "(docs/targets.md). Unavailable targets are skipped with the reason. Exit 1 on a "
        "failure.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--targets", default="all",
                   help=f"comma-separated targets or 'all' ({', '.join(TARGETS)})")
    p.add_argument("--profile", default=None, help="profile applied to every target")
    p.add_argument("--int8", choices=("off", "weights", "dynamic"), default=None,
                   help="int8 lowering for the ONNX Runtime targets (default: from profile)")
    p.add_argument("--method", choices=("none", *METHODS), default="none",
                   help="model sources only: compression method before export (calibrated "
                   "like `edgestack export`)")
    add_method_options(p)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)
    bounds(p, batch=COUNT, seq=COUNT)


def run(args: argparse.Namespace) -> int:
    opts = method_options(args)       # a flag the method does not take: exit 2, first
    if args.method != "none":
        check_options(args.method, **opts)                   # bad values fail first
    from edgestack.targets.feeds import example_feeds  # lazy: keeps CLI start light
    from edgestack.targets.parity import Case, cross_check  # lazy: keeps CLI start light

    targets = "all" if args.targets == "all" else [t.strip() for t in args.targets.split(",")]
    options = {}
    if args.int8:
        options = {"ort-cpu": {"int8": args.int8}, "ort-arm": {"int8": args.int8}}
    with atomic.scratch("parity") as tmp:
        path = Path(args.model)
        if path.suffix == ".onnx" and path.is_file():
            case = Case(path.stem, path, example_feeds(path, batch=2, seq=2))
        else:
            case = _case_from_source(args, Path(tmp))
        reports = cross_check([case], targets, profile=args.profile, options=options,
                              work_dir=Path(tmp) / "work")
    rep = reports[0]
    if args.json:
        emit_json({"ok": rep.passed, **rep.to_dict()})
    else:
        print(rep.table())
        print("PASS" if rep.passed else "FAIL")
    return EXIT_OK if rep.passed else EXIT_CHECK_FAILED


def _case_from_source(args: argparse.Namespace, tmp: Path):
    import warnings

    import torch

    from edgestack.exporter.export import compacted_tables  # lazy: onnx at CLI start
    from edgestack.exporter.signature import (  # lazy: onnx at CLI start
        flatten_outputs,
        normalize_inputs,
    )
    from edgestack.pipeline import compress_and_export  # lazy: keeps CLI start light
    from edgestack.targets.parity import Case  # lazy: keeps CLI start light

    out = tmp / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = compress_and_export(args.model, args.method, method_options(args), out,
                                   log=lambda m: None,
                                   load={"batch": args.batch, "seq": args.seq},
                                   export_options={"parity": False})
    src, result = done.source, done.result
    norm = normalize_inputs(src.model, src.inputs)
    # the file stores the compacted embedding tables as int8: so does the reference
    with torch.no_grad(), compacted_tables(src.model, result.compact_embeddings):
        ref = [t.detach().numpy() for _, t in flatten_outputs(src.model(*norm.args,
                                                                        **norm.kwargs))]
    feeds = dict(norm.numpy())
    return Case(f"{args.model}:{args.method}", out, feeds,
                dict(zip(result.output_names, ref, strict=False)), "torch (compressed model)")
