"""Progress bars of ``edgestack export`` and ``edgestack bench``: on stderr, off with ``-q``,
never in ``--json`` output, forced with ``--progress``; the library calls take
``progress=False``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgestack.cli import main
from edgestack.core import progress as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "targets"))
from targets_cases import linear_case, random_shift

BAR = "\r"
"""tqdm redraws its line with a carriage return; log lines never hold one."""


@pytest.fixture
def terminal(monkeypatch):
    """stderr counts as a terminal (pytest's is not), so the default shows bars."""
    monkeypatch.setattr(P, "stderr_is_tty", lambda: True)


@pytest.fixture(scope="module")
def shift_model(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    model, _, _ = linear_case(random_shift(rng, (64, 96), 4, False), 1, 16, rng=rng)
    path = tmp_path_factory.mktemp("bars") / "shift.onnx"
    onnx.save(model, str(path))
    return path


def export(tmp_path: Path, *flags: str, json_out: bool = False) -> int:
    out = tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx"
    return main([*flags, "export", "small-cnn", "--method", "shift", "--out", str(out),
                 *(["--json"] if json_out else [])])


def test_export_bars_on_a_terminal_and_none_with_quiet_or_in_json(tmp_path, capsys,
                                                                   terminal) -> None:
    assert export(tmp_path) == 0
    err = capsys.readouterr().err
    assert BAR in err and "export: parity" in err and "shift" in err   # compress bar too
    assert export(tmp_path, "-q") == 0
    out, err = capsys.readouterr()
    assert BAR not in out + err and err == ""
    assert export(tmp_path, "-q", json_out=True) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] and BAR not in out + err
    assert export(tmp_path, json_out=True) == 0           # bars on stderr, stdout pure JSON
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] and BAR not in out and "export: parity" in err
    assert export(tmp_path, "--no-progress") == 0
    assert BAR not in capsys.readouterr().err


def test_progress_forces_bars_off_a_terminal(tmp_path, capsys) -> None:
    assert export(tmp_path) == 0                          # pytest's stderr: no terminal
    assert BAR not in capsys.readouterr().err
    assert export(tmp_path, "--progress", json_out=True) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] and BAR in err and "export: onnx.checker" in err


def test_bench_bars_and_quiet(shift_model, tmp_path, capsys, terminal) -> None:
    argv = ["bench", str(shift_model), "--iterations", "4", "--no-memory", "--no-plots"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] and BAR not in out
    assert "bench: timing" in err and "bench: quality" in err and "bench: compile" in err
    assert main(["-q", *argv, "--out", str(tmp_path / "b"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] and BAR not in out + err and err == ""


def test_library_calls_take_progress(shift_model, tmp_path, capsys) -> None:
    from edgestack import zoo
    from edgestack.compress import compress
    from edgestack.exporter import export as export_model
    from edgestack.profiler.bench import run_bench

    model, inputs = zoo.small_cnn()
    compress(model, "shift", calib=[inputs], progress=False)
    export_model(model, inputs, tmp_path / "a.onnx", progress=False, log=lambda m: None)
    run_bench(shift_model, tmp_path / "b", iterations=2, warmup=0, memory=False, plots=False,
              log=lambda m: None, progress=False)
    assert capsys.readouterr() == ("", "")
    export_model(model, inputs, tmp_path / "c.onnx", progress=True, log=lambda m: None)
    run_bench(shift_model, tmp_path / "d", iterations=2, warmup=0, memory=False, plots=False,
              log=lambda m: None, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "export: parity" in err and "bench: timing" in err
