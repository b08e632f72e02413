"""``edgestack compile``: lower an exported ONNX model for one target into a device package."""

from __future__ import annotations

import argparse
import time

from edgestack.cli import EXIT_OK, emit_json, prepare_output, progress
from edgestack.targets import get_target

#: edgestack.targets.TARGET_NAMES, spelled out so that building the CLI's parsers does not
#: import the targets package (a test keeps the two equal)
TARGETS = ("ort-cpu", "ort-arm", "openvino-cpu", "tensorrt-gpu")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile",
        help="compile an exported ONNX model for a target into a device package (ort-cpu, "
        "ort-arm, openvino-cpu, tensorrt-gpu)",
        description="Lower MODEL.onnx (edgestack ops allowed) into what the target's backend "
        "runs best and write it to --out as a device package (manifest, sha256 of every "
        "file, golden inputs and x86 outputs), the format `edgestack pack` writes and "
        "`edgestack verify`, `plan` and `run` read. The lowered graph is checked against "
        "the source model (recorded in the manifest's metadata.compile.parity). "
        "docs/targets.md lists what each target does.",
    )
    p.add_argument("model", metavar="MODEL.onnx", help="an exported ONNX model")
    # No argparse choices: an unknown target is a TargetError listing the valid ones (exit 2).
    p.add_argument("--target", required=True, metavar="TARGET",
                   help=f"one of {', '.join(TARGETS)}")
    p.add_argument("--profile", default=None,
                   help="device profile name or TOML file (threads, precision, memory budget)")
    p.add_argument("--out", required=True,
                   help="the package: a new folder, or a file ending in .tar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing package (a package folder or .tar only; swapped "
                   "in whole)")
    p.add_argument("--name", default=None, help="model name in the manifest (default: the "
                   "file's stem)")
    p.add_argument("--int8", choices=("auto", "off", "weights", "dynamic"), default=None,
                   help="shift codes -> int8: weights (exact DequantizeLinear), dynamic "
                   "(integer matmuls, activations quantized per call), off; auto: from the "
                   "profile's precision")
    p.add_argument("--weights", choices=("materialize", "keep"), default=None,
                   help="other edgestack ops: fold to fp32 (fast, default) or keep the decode "
                   "in the graph (small)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgestack.pipeline import compile_model  # lazy: keeps CLI start light

    target = get_target(args.target)       # an unknown target fails before any work
    prepare_output(args.out, [args.model, args.profile], overwrite=args.overwrite,
                   kind="package")
    opts = {}
    if target.name != "tensorrt-gpu":
        opts = {k: v for k, v in (("int8", args.int8), ("weights", args.weights))
                if v is not None}
    say = progress("compile")
    t0 = time.perf_counter()
    result = compile_model(args.model, target.name, args.out, profile=args.profile,
                           options=opts, name=args.name, overwrite=args.overwrite, log=say)
    elapsed = time.perf_counter() - t0
    info = result.compile or {}
    if args.json:
        emit_json({"ok": True, "package": str(result.path), "target": target.name,
                   "seconds": round(elapsed, 2), **result.to_dict()})
        return EXIT_OK
    print(f"compiled {args.model} for {target.name} ({info.get('arch')}, "
          f"{info.get('precision')}) -> {result.path} in {elapsed:.1f} s")
    for name, size in result.files.items():
        print(f"  {name:24s} {size / 1e6:9.2f} MB")
    for name, rep in info.get("report", {}).get("passes", {}).items():
        print(f"  pass {name}: " + ", ".join(f"{k}={v}" for k, v in rep.items()
                                              if v not in ({}, [])))
    parity = info.get("parity", {})
    worst = min((o.get("cosine", 1.0) for o in parity.get("outputs", [])), default=1.0)
    print(f"  vs the source model on x86 ONNX Runtime: "
          f"{'ok' if parity.get('passed') else 'OUTSIDE the tolerance'} "
          f"({info.get('precision')} tolerance; lowest cosine {worst:.5f})")
    ok, why = target.available()
    if not ok:
        print(f"note: {target.name} cannot run here ({why}); `edgestack verify` checks the "
              "files here and runs it on the device")
    return EXIT_OK
