"""The standing attack suite of the command line (issue 14): hostile but fair input.

Every case is generated from a small class of attacks (output paths x the commands that
write, bad numbers x the options that take them, tampered or broken inputs x their kinds)
and asserts the same four things: the exit code, one line on stderr that says what is
wrong (no traceback), and that nothing changed but the output: every file under the test's
folder (the inputs, the output's folder) is hashed before and after.

The commands run in this process (``edgestack.cli.main``) on tiny models built once per
module: the built-in ``small-cnn`` exported and compiled into a package, and a two-layer
MLP factory. The kill -9 cases, which need subprocesses, are in ``test_kill.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgestack.cli import main
from edgestack.core import atomic

FACTORY = """\
import torch


def build():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    return m, {"input": torch.randn(1, 64)}


def boom():
    raise RuntimeError("factory exploded")


def not_a_model():
    return "model", {}
"""


# ---- shared inputs (built once) -----------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder with ``model.onnx`` (small-cnn, weights in its data file), ``pkg`` (it
    compiled for ort-cpu), ``in.npz`` (the package's golden inputs) and ``fac.py``."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "fac.py").write_text(FACTORY)
    assert main(["-q", "export", "small-cnn", "--out", str(root / "model.onnx"),
                 "--external-data", "always"]) == 0
    assert main(["-q", "compile", str(root / "model.onnx"), "--target", "ort-cpu",
                 "--out", str(root / "pkg")]) == 0
    from edgestack.package import Package

    with Package.open(root / "pkg") as pkg:
        np.savez(root / "in.npz", **pkg.golden()[0])
    return root


@pytest.fixture
def ws(base, tmp_path, monkeypatch) -> Path:
    """A fresh copy of :func:`base` as the current folder."""
    work = tmp_path / "ws"
    shutil.copytree(base, work, symlinks=True)
    monkeypatch.chdir(work)
    return work


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, a folder's marker, a link's target."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def cli(capsys, argv: list[str]) -> tuple[int, str, float]:
    """Run ``edgestack -q ARGV`` here: exit code, stderr, seconds."""
    capsys.readouterr()
    t0 = time.perf_counter()
    try:
        code = main(["-q", *argv])
    except SystemExit as exc:  # argparse: usage errors
        code = int(exc.code or 0)
    seconds = time.perf_counter() - t0
    return code, capsys.readouterr().err, seconds


def refused(capsys, ws: Path, argv: list[str], *needles: str, seconds: float = 30.0) -> str:
    """Run ``argv``; assert exit 2, one error line naming every needle, no traceback, and no
    change under ``ws``. Returns the line."""
    before = snapshot(ws)
    code, err, took = cli(capsys, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert len(lines) == 1 and ": error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(ws) == before, "the command changed files it does not own"
    assert took < seconds, f"took {took:.1f} s"
    return lines[0]


# ---- 1. output paths x the commands that write ---------------------------------------------
# Each command with its input and the flag naming its output; {out} is replaced by the path.
WRITERS: dict[str, tuple[list[str], str]] = {
    "export": (["export", "fac.py:build", "--out", "{out}"], "onnx"),
    "compile": (["compile", "model.onnx", "--target", "ort-cpu", "--out", "{out}"], "package"),
    "pack": (["pack", "model.onnx", "--out", "{out}"], "package"),
    "pack-tar": (["pack", "model.onnx", "--out", "{out}.tar"], "file"),
    "run": (["run", "pkg", "--input", "in.npz", "--output", "{out}"], "file"),
    "quality": (["quality", "fac.py:build", "--method", "shift", "--out", "{out}"], "file"),
    "bench": (["bench", "model.onnx", "--out", "{out}"], "folder"),
    "demo": (["demo", "--out", "{out}"], "folder"),
}


def _argv(cmd: str, out: str, *extra: str) -> list[str]:
    return [a.replace("{out}", out) for a in WRITERS[cmd][0]] + list(extra)


# (class, output path, commands it applies to, text the message holds)
OUTPUT_CLASSES = [
    ("under-a-file", "fac.py/out", list(WRITERS), "is a file, not a folder"),
    ("in-proc", "/proc/edgestack-out", list(WRITERS), "cannot write in /proc"),
    ("existing-file", "notes.txt", ["export", "run", "quality"], "already exists; pass "
     "--overwrite"),
    ("existing-file-for-a-folder", "notes.txt", ["compile", "pack", "bench", "demo"],
     "is a file, not"),
    ("existing-folder", "folder", ["export", "run", "quality"], "is a folder; expected the "
     "path of a file"),
    ("foreign-folder-with-overwrite", "folder", ["compile", "pack", "bench", "demo"],
     "nor empty; refusing to replace it even with --overwrite"),
    ("proc-itself", "/proc", ["export", "run", "quality"], "is a folder"),
    ("proc-itself-folder", "/proc", ["compile", "pack", "bench", "demo"],
     "refusing to replace it even with --overwrite"),
    ("empty", "", ["export", "compile", "pack", "run", "quality", "bench", "demo"],
     "is empty; expected a path"),
]


@pytest.mark.parametrize("cls,out,cmd,needle", [
    pytest.param(cls, out, cmd, needle, id=f"{cls}-{cmd}")
    for cls, out, cmds, needle in OUTPUT_CLASSES for cmd in cmds])
def test_output_path_refused(capsys, ws, cls, out, cmd, needle):
    (ws / "notes.txt").write_text("the user's notes\n")
    (ws / "folder").mkdir()
    (ws / "folder" / "keep.txt").write_text("keep\n")
    extra = ["--overwrite"] if cls.startswith("foreign") or cls == "proc-itself-folder" else []
    refused(capsys, ws, _argv(cmd, out, *extra), needle, seconds=5)


# an output that is an input, inside one, or a folder that holds one
INPUT_CLASSES = [
    ("export", ["export", "fac.py:build", "--out", "fac.py"], "is the input fac.py"),
    ("export-calib", ["export", "fac.py:build", "--method", "shift", "--calib", "in.npz",
                      "--out", "in.npz"], "is the input in.npz"),
    ("export-into-source-folder", ["export", "pkg", "--out", "pkg/x.onnx"],
     "inside the input pkg"),
    ("compile", ["compile", "model.onnx", "--target", "ort-cpu", "--out", "model.onnx",
                 "--overwrite"], "is the input model.onnx"),
    ("compile-holds-input", ["compile", "model.onnx", "--target", "ort-cpu", "--out", ".",
                             "--overwrite"], "holds the input"),
    ("pack", ["pack", "model.onnx", "--out", "model.onnx", "--overwrite"], "is the input"),
    ("pack-into-package", ["pack", "pkg/model.onnx", "--out", "pkg", "--overwrite"],
     "holds the input pkg/model.onnx"),
    ("run-input", ["run", "pkg", "--input", "in.npz", "--output", "in.npz", "--overwrite"],
     "is the input in.npz"),
    ("run-into-package", ["run", "pkg", "--output", "pkg/golden/outputs.npz", "--overwrite"],
     "inside the input pkg"),
    ("run-package-file", ["run", "pkg", "--output", "pkg/manifest.json", "--overwrite"],
     "inside the input pkg"),
    ("run-link-to-input", ["run", "pkg", "--input", "in.npz", "--output", "link.npz",
                           "--overwrite"], "is the input in.npz"),
    ("quality", ["quality", "fac.py:build", "--method", "shift", "--out", "fac.py",
                 "--overwrite"], "is the input fac.py"),
    ("bench", ["bench", "pkg", "--out", "pkg", "--overwrite"], "is the input pkg"),
    ("bench-inside", ["bench", "pkg", "--out", "pkg/bench"], "inside the input pkg"),
    ("bench-holds", ["bench", "model.onnx", "--out", ".", "--overwrite"], "holds the input"),
]


@pytest.mark.parametrize("argv,needle", [pytest.param(a, n, id=i) for i, a, n in INPUT_CLASSES])
def test_output_is_never_an_input(capsys, ws, argv, needle):
    (ws / "link.npz").symlink_to("in.npz")
    refused(capsys, ws, argv, needle, "choose", seconds=5)


def test_compile_of_broken_onnx_leaves_no_output_folder(capsys, ws):
    (ws / "text.onnx").write_text("not a model\n")
    refused(capsys, ws, ["compile", "text.onnx", "--target", "ort-cpu", "--out",
                         "new/sub/pkg"], "cannot read text.onnx as ONNX", "DecodeError")
    assert not (ws / "new").exists()


# ---- 2. bad numbers x the options that take them -------------------------------------------
BAD_NUMBERS = [
    ("run", "--threads", "100000"), ("run", "--threads", "-4"), ("run", "--threads", "0"),
    ("run", "--repeat", "0"), ("run", "--repeat", "-1"), ("run", "--tier", "-1"),
    ("plan", "--threads", "100000"), ("plan", "--tier", "-3"),
    ("pack", "--steps-per-level", "0"), ("pack", "--blocks", "0"), ("pack", "--k", "0"),
    ("pack", "--factor-bits", "0"), ("pack", "--factor-bits", "nan"),
    ("pack", "--extra-texts", "-1"),
    ("export", "--atol", "-1"), ("export", "--rtol", "-1"), ("export", "--atol", "nan"),
    ("export", "--atol", "inf"), ("export", "--batch", "0"), ("export", "--seq", "0"),
    ("export", "--calib-n", "-1"),
    ("bench", "--iterations", "0"), ("bench", "--warmup", "-1"), ("bench", "--batch", "0"),
    ("bench", "--seq", "0"), ("bench", "--threads", "100000"), ("bench", "--seconds", "0"),
    ("demo", "--seq", "0"), ("demo", "--threads", "100000"), ("demo", "--iterations", "0"),
    ("quality", "--calib-seq", "0"), ("quality", "--finetune-lr", "-1"),
    ("parity", "--batch", "0"),
]
BASE_ARGV = {
    "run": ["run", "pkg"], "plan": ["plan", "pkg"], "pack": ["pack", "model.onnx", "--out", "p"],
    "export": ["export", "fac.py:build", "--out", "x.onnx"],
    "bench": ["bench", "model.onnx", "--out", "b"], "demo": ["demo", "--out", "d"],
    "quality": ["quality", "fac.py:build", "--method", "shift"],
    "parity": ["parity", "model.onnx"],
}


@pytest.mark.parametrize("cmd,flag,value", [pytest.param(*c, id=f"{c[0]}{c[1]}={c[2]}")
                                            for c in BAD_NUMBERS])
def test_bad_number_refused_at_once(capsys, ws, cmd, flag, value):
    line = refused(capsys, ws, [*BASE_ARGV[cmd], flag, value], f"bad {flag} ", "expected",
                   seconds=2)
    assert "pass a value in the range" in line


@pytest.mark.parametrize("argv,needle", [
    (["run", "pkg", "--repeat", "x"], "argument --repeat: invalid int value: 'x'"),
    (["run", "pkg", "--threads"], "argument --threads: expected one argument"),
    (["pack", "model.onnx"], "the following arguments are required: --out"),
])
def test_usage_errors_are_one_line(capsys, ws, argv, needle):
    refused(capsys, ws, argv, needle, "--help", seconds=2)


# ---- 3. broken and tampered inputs x their kinds -------------------------------------------
def _rehash(pkg: Path, name: str) -> None:
    """Record ``pkg/name``'s new size and sha256 in the manifest (a tamperer's fix-up; the
    tiers' byte totals are derived from the file sizes, schema 2)."""
    man = json.loads((pkg / "manifest.json").read_text())
    entry = man["files"][name]
    data = (pkg / name).read_bytes()
    entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)
    (pkg / "manifest.json").write_text(json.dumps(man))


def _offset(value: str) -> Callable[[Path], None]:
    def tamper(pkg: Path) -> None:
        model = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
        entry = next(e for t in model.graph.initializer for e in t.external_data
                     if e.key == "offset" and t.data_location == onnx.TensorProto.EXTERNAL)
        entry.value = value
        onnx.save(model, str(pkg / "model.onnx"))
        _rehash(pkg, "model.onnx")
    return tamper


def _golden(which: str, how: str) -> Callable[[Path], None]:
    def tamper(pkg: Path) -> None:
        path = pkg / "golden" / f"{which}.npz"
        arrays = dict(np.load(path))
        key = next(iter(arrays))
        if how == "shape":
            arrays[key] = np.zeros((3, 7), arrays[key].dtype)
        elif how == "string":
            arrays[key] = np.full(arrays[key].shape, "a")
        elif how == "renamed":
            arrays = {"other": arrays[key]}
        np.savez(path, **arrays)
        _rehash(pkg, f"golden/{which}.npz")
    return tamper


TAMPERED = [
    ("offset-negative", _offset("-100"), ["run"], "ONNX Runtime"),
    ("offset-text", _offset("abc"), ["run"], "ONNX Runtime"),
    # verify's graph check reads the graph first (onnx-ir) and names the field
    ("offset-negative", _offset("-100"), ["verify"], "offset must be non-negative, got -100"),
    ("offset-text", _offset("abc"), ["verify"], "invalid literal for int() with base 10: 'abc'"),
    ("offset-huge", _offset("99999999999"), ["run", "verify"], "ONNX Runtime"),
    ("golden-output-shape", _golden("outputs", "shape"), ["verify"], "has shape (3, 7)"),
    ("golden-output-string", _golden("outputs", "string"), ["verify"], "has dtype <U1"),
    ("golden-output-renamed", _golden("outputs", "renamed"), ["verify"],
     "'other' is not an output"),
    ("golden-input-string", _golden("inputs", "string"), ["run", "verify"], "has dtype <U1"),
    ("golden-input-shape", _golden("inputs", "shape"), ["run", "verify"],
     "the package's golden inputs do not run"),
]


@pytest.mark.parametrize("tamper,cmd,needle", [
    pytest.param(t, c, n, id=f"{i}-{c}") for i, t, cmds, n in TAMPERED for c in cmds])
def test_tampered_package_refused(capsys, ws, tamper, cmd, needle):
    tamper(ws / "pkg")
    refused(capsys, ws, [cmd, "pkg"], needle, "pkg")


@pytest.mark.parametrize("content", [b"", b"hello\n", b"\x08\x07" + bytes(range(256)) * 4],
                         ids=["empty", "text", "garbage"])
@pytest.mark.parametrize("cmd", ["compile", "pack"])
def test_broken_onnx_refused(capsys, ws, cmd, content):
    (ws / "bad.onnx").write_bytes(content)
    extra = ["--target", "ort-cpu"] if cmd == "compile" else []
    refused(capsys, ws, [cmd, "bad.onnx", *extra, "--out", "out/pkg"], "bad.onnx",
            "export the model again")


@pytest.mark.parametrize("cmd", ["compile", "pack"])
def test_truncated_onnx_and_missing_data_refused(capsys, ws, cmd):
    (ws / "cut.onnx").write_bytes((ws / "model.onnx").read_bytes()[:-40])
    extra = ["--target", "ort-cpu"] if cmd == "compile" else []
    refused(capsys, ws, [cmd, "cut.onnx", *extra, "--out", "o1"], "cut.onnx")
    for data in ws.glob("model.onnx.*.data"):
        data.rename(ws / "moved.bin")
    refused(capsys, ws, [cmd, "model.onnx", *extra, "--out", "o2"], "model.onnx")


@pytest.mark.parametrize("cmd", ["plan", "run"])
@pytest.mark.parametrize("budget", ["10000000000000000000000000000MB", "-5MB", "12XB", "0"])
def test_bad_budget_refused(capsys, ws, cmd, budget):
    refused(capsys, ws, [cmd, "pkg", f"--budget={budget}"], "budget", budget, seconds=5)


@pytest.mark.parametrize("spec,needle", [
    ("fac.py:boom", "factory 'fac.py:boom' raised: RuntimeError: factory exploded"),
    ("fac.py:not_a_model", "must return (model, example_inputs) with a torch.nn.Module"),
    ("fac.py:missing", "has no callable 'missing'"),
    ("broken.py:build", "factory file 'broken.py' failed to load: SyntaxError"),
    ("raising.py:build", "failed to load: ValueError: at import"),
])
def test_user_factory_failures_are_the_users(capsys, ws, spec, needle):
    (ws / "broken.py").write_text("def build(:\n")
    (ws / "raising.py").write_text("raise ValueError('at import')\n")
    line = refused(capsys, ws, ["export", spec, "--out", "x.onnx"], needle)
    assert "a bug in edgestack" not in line


# ---- 4. what may be written is written, and only that --------------------------------------
def test_export_replaces_only_its_own_files(capsys, ws):
    """A stray ``v2.onnx.data`` is the user's; an existing export is replaced only with
    --overwrite, its data file with it."""
    (ws / "v2.onnx.data").write_text("notes\n")
    argv = ["export", "fac.py:build", "--out", "v2.onnx", "--external-data", "always"]
    code, err, _ = cli(capsys, argv)
    assert code == 0, err
    first = {p.name for p in ws.glob("v2.onnx*")}
    assert (ws / "v2.onnx.data").read_text() == "notes\n" and len(first) == 3

    refused(capsys, ws, argv, "v2.onnx already exists; pass --overwrite")
    code, err, _ = cli(capsys, [*argv, "--external-data", "never", "--overwrite"])
    assert code == 0, err
    assert {p.name for p in ws.glob("v2.onnx*")} == {"v2.onnx", "v2.onnx.data"}
    assert (ws / "v2.onnx.data").read_text() == "notes\n"
    onnx.checker.check_model(str(ws / "v2.onnx"), full_check=True)

    (ws / "notes.onnx").write_text("not an export\n")
    refused(capsys, ws, ["export", "fac.py:build", "--out", "notes.onnx", "--overwrite"],
            "is not an ONNX file; refusing to replace it even with --overwrite")


def test_export_replaces_the_data_file_of_an_earlier_version(capsys, ws):
    """An export of an earlier edgestack (data in ``OUT.data``) is replaced with its data."""
    argv = ["export", "fac.py:build", "--out", "old.onnx", "--external-data", "always"]
    assert cli(capsys, argv)[0] == 0
    model = onnx.load(str(ws / "old.onnx"), load_external_data=False)
    (data,) = ws.glob("old.onnx.*.data")
    data.rename(ws / "old.onnx.data")
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "old.onnx.data"
    onnx.save(model, str(ws / "old.onnx"))
    assert cli(capsys, [*argv, "--overwrite"])[0] == 0
    left = sorted(p.name for p in ws.glob("old.onnx*"))
    assert len(left) == 2 and "old.onnx.data" not in left


def test_package_and_file_outputs_replaced_only_with_overwrite(capsys, ws):
    refused(capsys, ws, ["compile", "model.onnx", "--target", "ort-cpu", "--out", "pkg"],
            "pkg already exists; pass --overwrite")
    old = (ws / "pkg" / "manifest.json").stat().st_ino
    code, err, _ = cli(capsys, ["pack", "model.onnx", "--out", "pkg", "--overwrite"])
    assert code == 0, err
    assert (ws / "pkg" / "manifest.json").stat().st_ino != old  # a new package, swapped in
    assert not [p for p in ws.iterdir() if p.name.startswith(atomic.PREFIX)]

    code, err, _ = cli(capsys, ["run", "pkg", "--output", "new/dir/out.npz"])
    assert code == 0, err
    assert set(np.load(ws / "new/dir/out.npz").files) == {"output"}
    refused(capsys, ws, ["run", "pkg", "--output", "new/dir/out.npz"], "--overwrite")
    code, err, _ = cli(capsys, ["run", "pkg", "--output", "new/dir/out.npz", "--overwrite"])
    assert code == 0, err
    assert sorted(p.name for p in (ws / "new/dir").iterdir()) == ["out.npz"]


def test_leftovers_of_killed_runs_are_swept(ws):
    """Temporary names of dead processes are removed (a moved-aside package put back where
    its destination is missing); those of live processes are kept."""
    dead = 2**22 + 12345  # above the default pid_max: no such process
    assert not atomic.pid_alive(dead)
    tmp = ws / f".edgestack-tmp-{dead}-0123abcd-pkg2"
    tmp.mkdir()
    (tmp / "blocks.bin").write_bytes(b"half a package")
    scratch = ws / f".edgestack-pack-{dead}-0123abcd"
    scratch.mkdir()
    old = ws / f".edgestack-old-{dead}-0123abcd-pkg3"
    shutil.copytree(ws / "pkg", old)
    live = ws / f".edgestack-tmp-{os.getpid()}-0123abcd-pkg4"
    live.mkdir()
    done = atomic.sweep(ws, again=True)
    assert not tmp.exists() and not scratch.exists() and live.exists()
    assert (ws / "pkg3" / "manifest.json").is_file() and not old.exists()
    assert len(done) == 3


def test_the_cli_knows_the_manifest_name():
    from edgestack.cli import outputs
    from edgestack.package.format import MANIFEST_NAME

    assert outputs.MANIFEST == MANIFEST_NAME
