"""``edgestack inspect``: what is inside an ONNX file or a device package (nothing is run,
no weights are loaded)."""

from __future__ import annotations

import argparse

from edgestack.cli import EXIT_OK, emit_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show what is inside an ONNX file or a device package (loads no weights)",
        description="FILE: an ONNX file (from `edgestack export`, or any other): opset "
        "imports, producer, inputs and outputs with dtypes and shapes, node counts by "
        "(domain, op type), initializer bytes in all and by dtype, external data files, the "
        "edgestack.* metadata, and the compressed layers (ShiftWeight, BitStackWeight, "
        "low-rank, pruned: shape, dense bytes, compressed bytes, bits per weight). External "
        "data is never read. PKG: a device package (a folder with manifest.json, or a .tar "
        "from `edgestack pack`): model, target, files with roles and sizes, tiers (blocks "
        "loaded, bytes), BitStack layers (shape, blocks, rank), graph variants, golden data "
        "and a summary of the packed graph; no hashing (`edgestack verify` checks the "
        "files). Exit 2 when the path is missing or is neither.",
    )
    p.add_argument("path", metavar="FILE|PKG",
                   help=".onnx file, or a device package (folder with manifest.json, or .tar)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgestack.profiler.inspect import inspect_path, render_text  # lazy: onnx at CLI start

    report = inspect_path(args.path)
    if args.json:
        emit_json({"ok": True, **report})
    else:
        print(render_text(report))
    return EXIT_OK
