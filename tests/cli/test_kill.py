"""kill -9 at every rename and removal of ``export``, ``compile`` and ``pack`` (issue 14).

Each run is a subprocess of ``edgestack`` with ``EDGESTACK_FAULT=OP:N``
(:mod:`edgestack.core.atomic`), which SIGKILLs it just before its N-th rename (or removal of
a replaced output). After every kill the destination must hold the complete old output or
the complete new one (an ONNX file that ONNX Runtime loads with its data and that computes
the old or the new model; a package whose files all match their hashes), and the next run's
sweep must leave nothing else behind: no temporary names beside it, no stray data file, no
scratch folder of the killed process in the temporary folder.

All runs start at once (each in its own folder) and are checked one by one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgestack.cli import main
from edgestack.core import atomic
from edgestack.package import Package

FACTORY = """\
import torch


def build(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    return m.eval(), {"input": torch.ones(1, 64)}


def build_new():
    return build(seed=1)
"""

SRC = str(Path(__file__).resolve().parents[2] / "src")

# (scenario, command after the inputs, the destination, whether an old output is there,
#  the faults, and which output each fault must leave: "old" or "new")
SCENARIOS = {
    "export-overwrite": (["export", "fac.py:build_new", "--external-data", "always",
                          "--overwrite", "--out", "m.onnx"], "m.onnx", True,
                         {"rename:1": "old", "rename:2": "old", "remove:1": "new"}),
    "export-new": (["export", "fac.py:build_new", "--external-data", "always", "--out",
                    "m.onnx"], "m.onnx", False, {"rename:1": "old", "rename:2": "old"}),
    "pack-overwrite": (["pack", "model.onnx", "--overwrite", "--out", "pkg"], "pkg", True,
                       {"rename:1": "old", "remove:1": "new"}),
    "pack-new": (["pack", "model.onnx", "--out", "pkg"], "pkg", False, {"rename:1": "old"}),
    "pack-tar-overwrite": (["pack", "model.onnx", "--overwrite", "--out", "pkg.tar"],
                           "pkg.tar", True, {"rename:1": "old", "rename:2": "old"}),
    "compile-overwrite": (["compile", "model.onnx", "--target", "ort-cpu", "--overwrite",
                           "--out", "pkg"], "pkg", True, {"rename:1": "old", "remove:1": "new"}),
}
CASES = [(s, f) for s, spec in SCENARIOS.items() for f in spec[3]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, int, int, str]]:
    """Every (scenario, fault) run, started together: its folder, pid, exit code, stderr."""
    base = tmp_path_factory.mktemp("kill-base")
    (base / "fac.py").write_text(FACTORY)
    assert main(["-q", "export", "small-cnn", "--out", str(base / "model.onnx")]) == 0
    old = {
        "m.onnx": ["export", "fac.py:build", "--external-data", "always", "--out", "m.onnx"],
        "pkg": ["compile", "model.onnx", "--target", "ort-cpu", "--name", "old", "--out",
                "pkg"],
        "pkg.tar": ["pack", "model.onnx", "--name", "old", "--out", "pkg.tar"],
    }
    cwd = os.getcwd()
    try:
        os.chdir(base)
        for argv in old.values():
            assert main(["-q", *argv]) == 0
    finally:
        os.chdir(cwd)
    procs = {}
    env = {**os.environ, "PYTHONPATH": SRC}
    for scenario, fault in CASES:
        argv, dest, has_old, _ = SCENARIOS[scenario]
        folder = tmp_path_factory.mktemp(f"kill-{scenario}-{fault.replace(':', '')}")
        for name in ("fac.py", "model.onnx"):
            shutil.copy(base / name, folder / name)
        if has_old:  # the destination, and an ONNX file's data file
            for path in [base / dest, *base.glob(f"{dest}.*.data")]:
                if path.is_dir():
                    shutil.copytree(path, folder / path.name)
                else:
                    shutil.copy(path, folder / path.name)
        procs[scenario, fault] = (folder, subprocess.Popen(
            [sys.executable, "-m", "edgestack.cli", "-q", *argv], cwd=folder,
            env={**env, atomic.FAULT_ENV: fault}, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True))
    out = {}
    for key, (folder, proc) in procs.items():
        _, err = proc.communicate(timeout=600)
        out[key] = (folder, proc.pid, proc.returncode, err)
    out["base"] = (base, 0, 0, "")
    return out


def _outputs(path: Path) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": np.ones((1, 64), np.float32)})[0]


def _which_onnx(folder: Path, base: Path) -> str:
    """"old", "new" or "none": what ``folder/m.onnx`` (with its data) computes."""
    if not os.path.lexists(folder / "m.onnx"):
        return "none"
    got = _outputs(folder / "m.onnx")
    if np.allclose(got, _outputs(base / "m.onnx"), atol=1e-5):
        return "old"
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("kill_factory", base / "fac.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, inputs = module.build_new()
    with torch.no_grad():
        ref = model(**inputs).numpy()
    assert np.allclose(got, ref, atol=1e-4), "m.onnx computes neither the old nor the new model"
    return "new"


def _which_package(path: Path, base: Path) -> str:
    """"old", "new" or "none": the package at ``path``, every file hash-checked."""
    if not os.path.lexists(path):
        return "none"
    with Package.open(path) as pkg:
        pkg.verify()  # every file present and matching its sha256
        return "old" if pkg.manifest.model.name == "old" else "new"


@pytest.mark.slow
@pytest.mark.parametrize("scenario,fault", CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_kill_leaves_a_whole_old_or_new_output(runs, scenario, fault):
    folder, pid, code, err = runs[scenario, fault]
    base = runs["base"][0]
    _, dest, has_old, expect = SCENARIOS[scenario]
    assert code == -signal.SIGKILL, f"not killed at {fault} (exit {code}): {err[-2000:]}"
    want = expect[fault] if has_old or expect[fault] == "new" else "none"

    def whole() -> str:
        if dest.endswith(".onnx"):
            return _which_onnx(folder, base)
        return _which_package(folder / dest, base)

    assert whole() == want
    # the next run sweeps what the killed one left; the destination stays as it was
    atomic.sweep(folder, again=True)
    atomic.sweep(tempfile.gettempdir(), again=True)
    assert whole() == want
    left = sorted(p.name for p in folder.iterdir())
    expected = {"fac.py", "model.onnx"} | ({dest} if want != "none" else set())
    if dest.endswith(".onnx") and want != "none":
        data = [n for n in left if n.startswith(f"{dest}.") and n.endswith(".data")]
        assert len(data) == 1, left  # exactly the data file of the m.onnx in place
        expected |= set(data)
    assert set(left) == expected, left
    scratch = [p.name for p in Path(tempfile.gettempdir()).iterdir()
               if p.name.startswith(atomic.PREFIX) and f"-{pid}-" in p.name]
    assert scratch == []
