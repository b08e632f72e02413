"""``edgestack verify``: check a device package (from ``edgestack compile`` or ``edgestack
pack``): the sha256 of every file, its structure, and its golden self-test on this machine
(or, with ``--emulate aarch64``, under qemu)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import edgestack
from edgestack.cli import EXIT_CHECK_FAILED, EXIT_OK, EXIT_SKIPPED, emit_json, printable
from edgestack.errors import BackendUnavailable, EdgestackError, PackageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check a device package: hashes, structure, golden self-test",
        description="PACKAGE (a directory with manifest.json, or .tar) from `edgestack "
        "compile` or `edgestack pack`: check its structure and the sha256 of every file (a "
        "mismatch names the file, and the block record), that the manifest agrees with the "
        "graphs (layer shapes and inputs, dense data layouts, tables; where onnx is "
        "installed), then load it with edgestack.runtime at the golden tier and "
        "compare with the golden outputs (with --emulate aarch64: in an emulated aarch64 "
        "Python, under qemu). Exit 1 when the check fails, 2 when the package is damaged, 4 "
        "when this machine cannot run its target (the hashes were checked).",
    )
    p.add_argument("package", metavar="PACKAGE", help="a device package")
    p.add_argument("--emulate", choices=("aarch64",), default=None,
                   help="run under qemu user-mode emulation")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)


def verify_package(path: str) -> dict:
    """Hash-check a package and run its golden self-test; the report as a dict."""
    import time

    from edgestack.package import Package  # lazy: keeps CLI start light
    from edgestack.runtime import Runtime  # lazy: keeps CLI start light

    t0 = time.perf_counter()
    with Package.open(path) as pkg:
        pkg.verify()
        try:
            import onnx  # noqa: F401 - the graph check reads the graphs with it (host side)
        except ImportError:   # a device without onnx: the runtime checks what ORT reports
            graphs = "skipped: onnx is not installed"
        else:
            from edgestack.packer.graphcheck import check_graphs  # lazy: onnx at CLI start

            graphs = f"ok ({len(check_graphs(pkg))} checked)"
        golden = pkg.golden_info
        info = {"package": str(pkg.path), "model": pkg.manifest.model.name,
                "target": pkg.manifest.target, "files": len(pkg.files),
                "tiers": len(pkg.tiers), "hashes": "ok", "graphs": graphs}
        if golden is None:
            return {**info, "ok": True, "self_test": {"ran": False,
                                                       "reason": "no golden data"}}
        exact = {"precision": "f32"} if pkg.manifest.target == "openvino-cpu" else {}
        inputs, outputs = pkg.golden()
        check_golden(pkg.path, "inputs", inputs)
        check_golden(pkg.path, "outputs", outputs)
        try:
            with Runtime(pkg, tier=golden.tier, verify=False, form="fp32", **exact) as rt:
                with golden_inputs_of(pkg.path):
                    test = rt.self_test()
                    got = None if test.get("passed") else rt.infer_with_tier(inputs)[1]
                if got is not None:  # a golden file that is not this graph's: exit 2
                    check_golden_fits(pkg.path, outputs, got)
        except BackendUnavailable as exc:  # the files are checked; the engine cannot run here
            return {**info, "ok": None, "skipped": True,
                    "self_test": {"ran": False, "reason": str(exc)}}
    return {**info, "ok": bool(test.get("passed")), "self_test": test,
            "seconds": round(time.perf_counter() - t0, 3)}


def check_golden(path: object, what: str, arrays: dict) -> None:
    """Golden arrays are numbers (a package whose golden file holds strings or objects is
    damaged, however its hash reads: exit 2, not a failed self-test)."""
    for name, arr in arrays.items():
        if arr.dtype.kind not in "biufc":
            raise PackageError(
                f"{path}: golden {what} {name!r} has dtype {arr.dtype}; expected numbers (the "
                "package's golden file is damaged or not edgestack's): re-pack the model")


@contextlib.contextmanager
def golden_inputs_of(path: object) -> Iterator[None]:
    """Errors of running the package's own golden inputs name them and the fix (the inputs
    are the package's, so the package is damaged)."""
    try:
        yield
    except BackendUnavailable:
        raise
    except EdgestackError as exc:
        raise PackageError(f"{path}: the package's golden inputs do not run: {exc}; the golden "
                           "file is damaged or belongs to another model: re-pack the model"
                           ) from None


def check_golden_fits(path: object, outputs: dict, got: dict) -> None:
    """The golden outputs have the names and shapes the graph gives for the golden inputs; a
    mismatch is a golden file that belongs to another graph (exit 2), not a numeric failure."""
    for name, ref in outputs.items():
        if name not in got:
            raise PackageError(
                f"{path}: golden output {name!r} is not an output of the package's graph "
                f"(it has {sorted(got)[:8]}); the golden file belongs to another model: "
                "re-pack the model")
        if tuple(got[name].shape) != tuple(ref.shape):
            raise PackageError(
                f"{path}: golden output {name!r} has shape {tuple(ref.shape)}, but the graph "
                f"gives {tuple(got[name].shape)} for the golden inputs; the golden file "
                "belongs to another model: re-pack the model")


EMULATED = """
import json, sys
from edgestack.cli.verify import verify_package
print(json.dumps(verify_package(sys.argv[1]), default=str))
"""


def verify_emulated(path: str) -> dict:
    """:func:`verify_package` in the emulated aarch64 Python (qemu; ``make arm-env``)."""
    import json
    from pathlib import Path

    from edgestack.targets.emulate import AArch64Emulator  # lazy: keeps CLI start light

    emu = AArch64Emulator.find()
    src = Path(edgestack.__file__).resolve().parents[1]
    proc = emu.run_python(EMULATED, [str(Path(path).resolve())], timeout=600, check=True,
                          env={"PYTHONPATH": f"{emu.site_packages}:{src}"})
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["emulated"] = "aarch64"
    return report


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if (Path(args.package) / "artifact.json").is_file():
        raise PackageError(
            f"{args.package} is a compiled artifact of an older edgestack; expected a device "
            "package (manifest.json). To fix: `edgestack compile MODEL.onnx --target T --out "
            "PKG` writes one")
    report = verify_emulated(args.package) if args.emulate else verify_package(args.package)
    if args.json:
        emit_json(report)
    else:
        where = " (aarch64, emulated)" if args.emulate else ""
        print(printable(f"{report['package']}: {report['model']} ({report['target']}), "
                        f"{report['files']} files, {report['tiers']} tiers: hashes ok{where}; "
                        f"manifest vs graphs {report.get('graphs', 'not checked')}"))
        test = report["self_test"]
        if test.get("ran"):
            for name, r in test["outputs"].items():
                if r.get("missing"):
                    print(printable(f"  golden {name}: missing from the runtime's outputs "
                                    f"(FAIL; tier {test['tier']})"))
                    continue
                print(printable(f"  golden {name}: max_abs {r['max_abs']:.3g} "
                                f"({'ok' if r['ok'] else 'FAIL'}; rtol {test['rtol']:g}, "
                                f"atol {test['atol']:g}, tier {test['tier']})"))
        else:
            print(printable(f"  self-test skipped: {test.get('reason')}"))
        print("SKIPPED" if report["ok"] is None else "PASS" if report["ok"] else "FAIL")
    if report["ok"] is None:
        return EXIT_SKIPPED
    return EXIT_OK if report["ok"] else EXIT_CHECK_FAILED
