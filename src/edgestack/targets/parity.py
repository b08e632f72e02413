"""Cross-backend parity: the same inputs through a reference and every available target.

Per output of each target (``a``) against the reference (``ref``):

- ``max_abs = max|a - ref|``; ``max_rel = max|a - ref| / max|ref|`` (relative to the output's
  largest magnitude, as in :mod:`edgestack.exporter.parity`);
- ``cosine`` of the flattened outputs;
- ``top1``: the fraction of positions whose argmax over the last dim agrees.

An output passes when its shape matches, nothing is NaN, ``(max_abs <= atol or max_rel <=
rtol)``, ``cosine >= min_cosine`` and ``top1 >= min_top1``, with the tolerances of the
artifact's precision (:data:`TOLERANCES`, documented in docs/targets.md). A target that is
not available on this machine is reported as skipped with the reason and does not fail the
check. Emulated aarch64 runs of every case are batched into ONE emulated process.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgestack.core import atomic
from edgestack.core.compare import agree
from edgestack.errors import TargetError
from edgestack.targets import TARGET_NAMES, get_target
from edgestack.targets.emulate import AArch64Emulator
from edgestack.targets.reference import reference_outputs


@dataclass(frozen=True)
class Tolerance:
    """Pass thresholds for one precision."""

    atol: float
    rtol: float
    min_cosine: float
    min_top1: float


#: Default tolerances per artifact precision. fp32: kernels differ only in summation order.
#: int8: dynamic per-tensor uint8 activations (weights exact): ~1e-2 relative on these models.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-4, 1e-4, 0.99999, 0.99),
    "fp16": Tolerance(1e-2, 1e-2, 0.999, 0.95),
    "bf16": Tolerance(5e-2, 5e-2, 0.995, 0.9),
    "int8": Tolerance(5e-2, 8e-2, 0.99, 0.85),
}


@dataclass
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    top1: float
    passed: bool


@dataclass
class TargetCheck:
    """One target's run of one case."""

    target: str
    status: str                 # "pass", "fail", "skipped", "error"
    precision: str = ""
    reason: str = ""
    outputs: list[OutputCheck] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status in ("pass", "skipped")


@dataclass
class CaseReport:
    """All targets on one case (model + inputs) against its reference."""

    case: str
    reference: str
    checks: list[TargetCheck]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "reference": self.reference, "passed": self.passed,
                "targets": [dict(asdict(c), passed=c.passed) for c in self.checks]}

    def table(self) -> str:
        lines = [f"{self.case}  (reference: {self.reference})",
                 f"  {'target':14s} {'prec':5s} {'output':24s} {'max_abs':>10s} "
                 f"{'max_rel':>10s} {'cosine':>9s} {'top1':>6s}  result"]
        for c in self.checks:
            if not c.outputs:
                lines.append(f"  {c.target:14s} {c.precision:5s} {'-':24s} {'':>10s} "
                             f"{'':>10s} {'':>9s} {'':>6s}  {c.status.upper()}: {c.reason}")
            for o in c.outputs:
                lines.append(f"  {c.target:14s} {c.precision:5s} {o.name[:24]:24s} "
                             f"{o.max_abs:10.3g} {o.max_rel:10.3g} {o.cosine:9.6f} "
                             f"{o.top1:6.3f}  {'ok' if o.passed else 'FAIL'}")
        return "\n".join(lines)


@dataclass
class Case:
    """A model file, its inputs, and (optionally) reference outputs (else x86 ORT on it)."""

    name: str
    model: Path
    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] | None = None
    reference_name: str = "onnxruntime x86 (source model)"


def compare_output(name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> OutputCheck:
    """Compare one output: :func:`edgestack.core.compare.agree` with ``tol``'s atol/rtol,
    plus ``tol``'s minimum cosine and top-1 agreement (see the module docstring)."""
    r = agree(got, ref, tol.atol, tol.rtol)
    if r.shape != r.ref_shape:
        return OutputCheck(name, r.shape, r.max_abs, r.max_rel, r.cosine, 0.0, False)
    got, ref = np.asarray(got), np.asarray(ref)
    if got.size and got.ndim >= 1 and got.shape[-1] > 1 and np.issubdtype(got.dtype,
                                                                          np.floating):
        top1 = float(np.mean(np.argmax(got, -1) == np.argmax(ref, -1)))
    else:
        top1 = 1.0
    ok = r.passed and r.cosine >= tol.min_cosine and top1 >= tol.min_top1
    return OutputCheck(name, r.shape, r.max_abs, r.max_rel, r.cosine, top1, bool(ok))


def judge(check: TargetCheck, got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
          tolerances: Mapping[str, Tolerance]) -> None:
    """Fill ``check`` (status, per-output results) from ``got`` against ``ref`` with the
    tolerance of the check's precision."""
    tol = tolerances[check.precision or "fp32"]
    missing = [n for n in ref if n not in got]
    if missing:
        check.status, check.reason = "fail", f"outputs missing: {missing}"
        return
    check.outputs = [compare_output(n, got[n], ref[n], tol) for n in ref]
    check.status = "pass" if all(o.passed for o in check.outputs) else "fail"


def cross_check(cases: Sequence[Case], targets: Sequence[str] | str = "all", *,
                profile: Any | None = None, options: Mapping[str, Mapping[str, Any]] | None
                = None, work_dir: str | Path | None = None,
                tolerances: Mapping[str, Tolerance] | None = None) -> list[CaseReport]:
    """Compile every case for every target, run it, and compare with the reference.

    Args:
        cases: the models and inputs.
        targets: target names or ``"all"``.
        profile: a profile (or name) for every target (default: fp32 defaults).
        options: per-target lowering options, e.g. ``{"ort-cpu": {"int8": "dynamic"}}``.
        work_dir: where artifacts go (default: a temporary folder, removed after).
        tolerances: overrides of :data:`TOLERANCES`.

    Returns:
        One :class:`CaseReport` per case.
    """
    names = list(TARGET_NAMES) if targets == "all" else list(targets)
    tols = dict(TOLERANCES, **(tolerances or {}))
    resolved = [get_target(n) for n in names]      # unknown names fail before any work
    tmp = None
    if work_dir is None:
        tmp = work_dir = atomic.temp_dir("parity")  # after a kill: removed by the next run
    work = Path(work_dir)
    try:
        refs = [c.reference if c.reference is not None else reference_outputs(c.model, c.feeds)
                for c in cases]
        reports = [CaseReport(c.name, c.reference_name, []) for c in cases]
        arm_jobs: list[tuple[int, TargetCheck, Any]] = []
        for tname, target in zip(names, resolved, strict=True):
            ok, why = target.available()
            for i, case in enumerate(cases):
                check = TargetCheck(tname, "skipped", reason=why)
                reports[i].checks.append(check)
                if not ok:
                    continue
                t0 = time.perf_counter()
                try:
                    art = target.lower(case.model, work / f"{i}_{case.name}" / tname, profile,
                                       **dict((options or {}).get(tname, {})))
                    check.precision = art.precision
                    if tname == "ort-arm" and why:      # available under emulation: batch later
                        arm_jobs.append((i, check, art))
                        continue
                    with target.runner(art) as runner:
                        got = runner.infer(case.feeds)
                except TargetError as exc:
                    check.status, check.reason = "error", str(exc)
                    continue
                check.seconds = round(time.perf_counter() - t0, 3)
                judge(check, got, refs[i], tols)
        if arm_jobs:
            t0 = time.perf_counter()
            emu = AArch64Emulator.find()
            results = emu.run_many([(art.path(), cases[i].feeds) for i, _, art in arm_jobs])
            each = round((time.perf_counter() - t0) / len(arm_jobs), 3)
            for (i, check, _), res in zip(arm_jobs, results, strict=True):
                check.seconds = each
                if isinstance(res, TargetError):
                    check.status, check.reason = "error", str(res)
                else:
                    check.reason = "aarch64 under qemu emulation"
                    judge(check, res, refs[i], tols)
        return reports
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["Tolerance", "TOLERANCES", "OutputCheck", "TargetCheck", "CaseReport", "Case",
           "compare_output", "cross_check", "judge"]
