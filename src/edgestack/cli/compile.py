"""``edgestack compile``: lower an exported ONNX model for one target."""

from __future__ import annotations

import argparse
import time

from edgestack.cli import EXIT_OK, EXIT_SKIPPED, emit_json

#: edgestack.targets.TARGET_NAMES, spelled out so that building the CLI's parsers does not
#: import the targets package (a test keeps the two equal)
TARGETS = ("ort-cpu", "ort-arm", "openvino-cpu", "tensorrt-gpu")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile",
        help="compile an exported ONNX model for a target (ort-cpu, ort-arm, openvino-cpu, "
        "tensorrt-gpu)",
        description="Lower MODEL.onnx (edgestack ops allowed) into what the target's backend "
        "runs best and write it to --out with artifact.json. docs/targets.md lists what each "
        "target does. Exit 4 when the target's backend is not installed.",
    )
    p.add_argument("model", metavar="MODEL.onnx", help="an exported ONNX model")
    # No argparse choices: an unknown target is a TargetError listing the valid ones (exit 2).
    p.add_argument("--target", required=True, metavar="TARGET",
                   help=f"one of {', '.join(TARGETS)}")
    p.add_argument("--profile", default=None,
                   help="device profile name or TOML file (threads, precision, memory budget)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--int8", choices=("auto", "off", "weights", "dynamic"), default=None,
                   help="shift codes -> int8: weights (exact DequantizeLinear), dynamic "
                   "(integer matmuls, activations quantized per call), off; auto: from the "
                   "profile's precision")
    p.add_argument("--weights", choices=("materialize", "keep"), default=None,
                   help="other edgestack ops: fold to fp32 (fast, default) or keep the decode "
                   "in the graph (small)")
    p.add_argument("--golden", action="store_true",
                   help="store random inputs and x86 reference outputs for `edgestack verify`")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgestack.targets import get_target
    from edgestack.targets.feeds import example_feeds

    target = get_target(args.target)
    opts = {}
    if args.int8 is not None:
        opts["int8"] = args.int8
    if args.weights is not None:
        opts["weights"] = args.weights
    if target.name == "tensorrt-gpu":
        opts.pop("int8", None)
        opts.pop("weights", None)
    ok, why = target.available()
    if target.name == "openvino-cpu" and not ok:
        # Lowering needs openvino itself (convert_model): nothing to write without it.
        msg = f"target {target.name} is not available: {why}"
        if args.json:
            emit_json({"ok": False, "skipped": True, "reason": msg})
        print(f"edgestack compile: skipped: {msg}")
        return EXIT_SKIPPED
    t0 = time.perf_counter()
    golden = example_feeds(args.model, batch=2, seq=2) if args.golden else None
    art = target.lower(args.model, args.out, args.profile, golden=golden, **opts)
    elapsed = time.perf_counter() - t0
    if args.json:
        emit_json({"ok": True, "artifact": str(art.folder), "available": ok,
                   "unavailable_reason": why or None, "seconds": round(elapsed, 2),
                   **art.to_dict()})
    else:
        print(f"compiled {args.model} for {art.target} ({art.arch}, {art.precision}) -> "
              f"{art.folder} in {elapsed:.1f} s")
        for role, name in art.files.items():
            print(f"  {role:20s} {name}")
        for name, rep in art.report.get("passes", {}).items():
            print(f"  pass {name}: " + ", ".join(f"{k}={v}" for k, v in rep.items()
                                                  if v not in ({}, [])))
        if not ok:
            print(f"note: {art.target} cannot run here ({why})")
    return EXIT_OK
