"""``edgestack verify``: run a compiled artifact and compare with the x86 reference."""

from __future__ import annotations

import argparse

from edgestack.cli import EXIT_CHECK_FAILED, EXIT_OK, emit_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="run a compiled artifact (e.g. aarch64 under emulation) against the x86 reference",
        description="Run ARTIFACT on its target (with --emulate aarch64: an ort-arm artifact "
        "under qemu) on its golden inputs (or random ones), and compare with the source model "
        "on x86 ONNX Runtime. Exit 1 when parity fails.",
    )
    p.add_argument("artifact", metavar="ARTIFACT", help="a folder written by edgestack compile")
    p.add_argument("--emulate", choices=("aarch64",), default=None,
                   help="run under qemu user-mode emulation")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgestack.cli.compile import random_feeds
    from edgestack.errors import TargetError
    from edgestack.targets import Artifact, load_runner
    from edgestack.targets.parity import TOLERANCES, CaseReport, TargetCheck, _judge
    from edgestack.targets.reference import reference_outputs

    art = Artifact.load(args.artifact)
    if args.emulate and art.arch != args.emulate:
        raise TargetError(f"--emulate {args.emulate} but {art.folder} is a {art.arch} "
                          f"artifact (target {art.target})")
    golden = art.golden()
    if golden is not None:
        feeds, ref = golden
        ref_name = "golden outputs (x86 ONNX Runtime at compile time)"
    else:
        feeds = random_feeds(str(art.path("source")))
        ref = reference_outputs(art.path("source"), feeds)
        ref_name = "onnxruntime x86 (source model)"
    kwargs = {"emulate": True} if args.emulate else {}
    with load_runner(art, **kwargs) as runner:
        got = runner.infer(feeds)
    check = TargetCheck(art.target, "fail", precision=art.precision,
                        reason=f"{art.arch}" + (" under emulation" if args.emulate else ""))
    _judge(check, got, ref, TOLERANCES)
    report = CaseReport(str(art.folder), ref_name, [check])
    if args.json:
        emit_json({"ok": report.passed, **report.to_dict()})
    else:
        print(report.table())
        print("PASS" if report.passed else "FAIL")
    return EXIT_OK if report.passed else EXIT_CHECK_FAILED
