"""``edgestack verify``: run a compiled artifact and compare with the x86 reference, or check a
device package (hashes of every file, structure, golden self-test)."""

from __future__ import annotations

import argparse

from edgestack.cli import EXIT_CHECK_FAILED, EXIT_OK, emit_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check a compiled artifact against the x86 reference, or a device package "
        "(hashes, golden self-test)",
        description="ARTIFACT from `edgestack compile`: run it on its target (with --emulate "
        "aarch64: an ort-arm artifact under qemu) on its golden inputs (or random ones) and "
        "compare with the source model on x86 ONNX Runtime. A device package (directory with "
        "manifest.json, or .tar) from `edgestack pack`: check its structure and the sha256 of "
        "every file (a mismatch names the file), then load it with edgestack.runtime at the "
        "golden tier and compare with the golden outputs. Exit 1 when the check fails, 2 when "
        "the package is damaged.",
    )
    p.add_argument("artifact", metavar="ARTIFACT",
                   help="a folder written by edgestack compile, or a device package")
    p.add_argument("--emulate", choices=("aarch64",), default=None,
                   help="run under qemu user-mode emulation")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)


def is_package(path: str) -> bool:
    """Whether ``path`` looks like a device package (a folder with manifest.json, or a file)."""
    from pathlib import Path

    p = Path(path)
    return (p.is_dir() and (p / "manifest.json").is_file()) or p.is_file()


def verify_package(path: str) -> dict:
    """Hash-check a package and run its golden self-test; the report as a dict."""
    import time

    from edgestack.package import Package
    from edgestack.runtime import Runtime

    t0 = time.perf_counter()
    with Package.open(path) as pkg:
        pkg.verify()
        golden = pkg.golden_info
        info = {"package": str(pkg.path), "model": pkg.manifest.model.name,
                "target": pkg.manifest.target, "files": len(pkg.files),
                "tiers": len(pkg.tiers), "hashes": "ok"}
        if golden is None:
            return {**info, "ok": True, "self_test": {"ran": False,
                                                       "reason": "no golden data"}}
        exact = {"precision": "f32"} if pkg.manifest.target == "openvino-cpu" else {}
        with Runtime(pkg, tier=golden.tier, verify=False, form="fp32", **exact) as rt:
            test = rt.self_test()
    return {**info, "ok": bool(test.get("passed")), "self_test": test,
            "seconds": round(time.perf_counter() - t0, 3)}


def run(args: argparse.Namespace) -> int:
    if is_package(args.artifact) and not args.emulate:
        report = verify_package(args.artifact)
        if args.json:
            emit_json(report)
        else:
            print(f"{report['package']}: {report['model']} ({report['target']}), "
                  f"{report['files']} files, {report['tiers']} tiers: hashes ok")
            test = report["self_test"]
            if test.get("ran"):
                for name, r in test["outputs"].items():
                    if r.get("missing"):
                        print(f"  golden {name}: missing from the runtime's outputs (FAIL; "
                              f"tier {test['tier']})")
                        continue
                    print(f"  golden {name}: max_abs {r['max_abs']:.3g} "
                          f"({'ok' if r['ok'] else 'FAIL'}; rtol {test['rtol']:g}, "
                          f"atol {test['atol']:g}, tier {test['tier']})")
            else:
                print(f"  self-test skipped: {test.get('reason')}")
            print("PASS" if report["ok"] else "FAIL")
        return EXIT_OK if report["ok"] else EXIT_CHECK_FAILED
    from edgestack.errors import TargetError
    from edgestack.targets import Artifact, load_runner
    from edgestack.targets.feeds import example_feeds
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
        feeds = example_feeds(art.path("source"), batch=2, seq=2)
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
