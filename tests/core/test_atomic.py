"""edgestack.core.atomic: swaps that leave the old output or the new one, the fault hook,
and the sweep of killed runs' leftovers (the kill -9 runs are in tests/cli/test_kill.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from edgestack.core import atomic
from edgestack.errors import EdgestackError

DEAD = 2**22 + 4321  # above Linux's largest pid_max: never a running process


def files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() if p.is_file() else "dir" for p in sorted(folder.iterdir())}


def stage(folder: Path, main: str, text: str, companions: dict[str, str], pid: int) -> Path:
    staging = folder / f".edgestack-swap-{pid}-0a0b0c0d-{main}"
    staging.mkdir()
    (staging / main).write_text(text)
    for name, body in companions.items():
        (staging / name).write_text(body)
    return staging


@pytest.fixture
def pair(tmp_path: Path) -> Path:
    """An installed pair ``m.onnx`` -> ``m.onnx.old.data`` and a stray user file."""
    (tmp_path / "m.onnx").write_text("old graph")
    (tmp_path / "m.onnx.old.data").write_text("old data")
    (tmp_path / "notes.txt").write_text("the user's")
    return tmp_path


OLD = {"m.onnx": "old graph", "m.onnx.old.data": "old data", "notes.txt": "the user's"}
NEW = {"m.onnx": "new graph", "m.onnx.new.data": "new data", "notes.txt": "the user's"}


def test_install_replaces_the_pair(pair):
    staging = stage(pair, "m.onnx", "new graph", {"m.onnx.new.data": "new data"}, os.getpid())
    atomic.install(staging, "m.onnx", ["m.onnx.new.data"], ["m.onnx.old.data"])
    assert files(pair) == NEW


@pytest.mark.parametrize("fault,want", [("rename:1", OLD), ("rename:2", OLD),
                                        ("remove:1", NEW)])
def test_install_failing_at_each_step_leaves_one_whole_pair(pair, monkeypatch, fault, want):
    monkeypatch.setattr(atomic, "_faults", {})
    monkeypatch.setenv(atomic.FAULT_ENV, f"{fault}:raise")
    staging = stage(pair, "m.onnx", "new graph", {"m.onnx.new.data": "new data"}, os.getpid())
    with pytest.raises(OSError, match="injected fault"):
        atomic.install(staging, "m.onnx", ["m.onnx.new.data"], ["m.onnx.old.data"])
    assert files(pair) == want  # settled at once: no staging folder, no stray file


@pytest.mark.parametrize("moved,done", [((), False), (("m.onnx.new.data",), False),
                                        (("m.onnx.new.data", "m.onnx"), True)])
def test_sweep_settles_a_killed_install_from_its_journal(pair, moved, done):
    staging = stage(pair, "m.onnx", "new graph", {"m.onnx.new.data": "new data"}, DEAD)
    (staging / atomic.JOURNAL).write_text(json.dumps(
        {"main": "m.onnx", "created": ["m.onnx.new.data"], "old": ["m.onnx.old.data"]}))
    for name in moved:  # the renames the killed process made
        os.replace(staging / name, pair / name)
    assert len(atomic.sweep(pair, again=True)) == 1
    assert files(pair) == (NEW if done else OLD)


def test_sweep_keeps_live_and_young_legacy_entries(tmp_path):
    live = tmp_path / f".edgestack-swap-{os.getpid()}-0a0b0c0d-m.onnx"
    live.mkdir()
    young = tmp_path / ".pkg.tmp-0123abcd"
    young.mkdir()
    aged = tmp_path / ".edgestack-pack-abc_1234"
    aged.mkdir()
    old_pkg = tmp_path / ".pkg2.old-0123abcd"  # an old writer killed between its renames
    (old_pkg / "x").mkdir(parents=True)
    day_ago = time.time() - 2 * atomic.LEGACY_AGE_S
    for path in (aged, old_pkg):
        os.utime(path, (day_ago, day_ago))
    atomic.sweep(tmp_path, again=True)
    assert live.exists() and young.exists() and not aged.exists()
    assert (tmp_path / "pkg2" / "x").is_dir() and not old_pkg.exists()


def test_replace_dir_swaps_in_one_step(tmp_path):
    dest = tmp_path / "pkg"
    dest.mkdir()
    (dest / "v").write_text("old")
    new = atomic.sibling(dest)
    new.mkdir()
    (new / "v").write_text("new")
    atomic.replace_dir(new, dest)
    assert files(tmp_path) == {"pkg": "dir"} and (dest / "v").read_text() == "new"


def test_replace_dir_killed_after_the_exchange_leaves_the_new_folder(tmp_path, monkeypatch):
    dest = tmp_path / "pkg"
    dest.mkdir()
    (dest / "v").write_text("old")
    new = tmp_path / f".edgestack-tmp-{os.getpid()}-0a0b0c0d-pkg"
    new.mkdir()
    (new / "v").write_text("new")
    monkeypatch.setattr(atomic, "_faults", {})
    monkeypatch.setenv(atomic.FAULT_ENV, "remove:1:raise")
    with pytest.raises(OSError):
        atomic.replace_dir(new, dest)
    assert (dest / "v").read_text() == "new" and (new / "v").read_text() == "old"
    dead = tmp_path / f".edgestack-tmp-{DEAD}-0a0b0c0d-pkg"
    new.rename(dead)  # as if its process had been killed there
    atomic.sweep(tmp_path, again=True)
    assert files(tmp_path) == {"pkg": "dir"}


def test_write_file_is_whole_or_absent(tmp_path):
    out = tmp_path / "a" / "b.bin"

    def half(f):
        f.write(b"half")
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        atomic.write_file(out, half)
    assert not out.exists() and list((tmp_path / "a").iterdir()) == []
    atomic.write_file(out, lambda f: f.write(b"whole"))
    assert out.read_bytes() == b"whole" and len(list((tmp_path / "a").iterdir())) == 1


@pytest.mark.parametrize("spec", ["rename", "rename:x", "move:1", "rename:1:explode"])
def test_a_bad_fault_spec_is_refused(tmp_path, monkeypatch, spec):
    monkeypatch.setenv(atomic.FAULT_ENV, spec)
    with pytest.raises(EdgestackError, match="EDGESTACK_FAULT"):
        atomic.rename(tmp_path / "a", tmp_path / "b")


def test_temp_dir_names_its_process_and_check_writable(tmp_path):
    path = atomic.temp_dir("pack", tmp_path)
    assert path.name.startswith(f".edgestack-pack-{os.getpid()}-") and path.is_dir()
    atomic.check_writable(tmp_path)
    with pytest.raises(OSError):
        atomic.check_writable("/proc")
