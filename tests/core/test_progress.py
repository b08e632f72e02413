"""Progress bars (:mod:`edgestack.core.progress`): on stderr, only when asked for, optional."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgestack.core import progress as P


def test_off_and_auto_without_a_terminal_give_the_items_back(capsys) -> None:
    items = [1, 2, 3]
    assert P.progress_iter(items, False, "x") is items
    assert P.progress_iter(items, None, "x") is items        # pytest's stderr is no terminal
    with P.progress_bar(3, False, "x") as bar:
        bar.update(3)
    with P.Stages(["a", "b"], None, "job") as st:
        st.start("a")
        st.start("b")
        assert not st.shown
    assert st.done == 2
    assert capsys.readouterr() == ("", "")


def test_forced_bars_go_to_stderr_only(capsys) -> None:
    assert list(P.progress_iter(range(3), True, "counting")) == [0, 1, 2]
    with P.Stages(["load", "run"], True, "job") as st:
        assert st.shown
        st.start("load")
        st.start("run")
    out, err = capsys.readouterr()
    assert out == ""
    assert "counting" in err and "job: load" in err and "job: run" in err and "\r" in err


def test_auto_shows_bars_on_a_terminal(capsys, monkeypatch) -> None:
    monkeypatch.setattr(P, "stderr_is_tty", lambda: True)
    assert P.bars_enabled(None) and not P.bars_enabled(False)
    list(P.progress_iter(range(2), None, "tty"))
    assert "tty" in capsys.readouterr().err


def test_a_failed_stage_is_not_counted(capsys) -> None:
    with pytest.raises(RuntimeError), P.Stages(["a", "b"], True, "job") as st:
        st.start("a")
        st.start("b")
        raise RuntimeError("b failed")
    assert st.done == 1 and not st.shown


def test_without_tqdm_the_work_is_the_same(monkeypatch, capsys) -> None:
    monkeypatch.setattr(P, "_tqdm", lambda: None)
    items = [4, 5]
    assert P.progress_iter(items, True, "x") is items
    with P.Stages(["a"], True, "job") as st:
        st.start("a")
    assert st.done == 1 and capsys.readouterr().err == ""


def test_the_device_side_imports_without_tqdm() -> None:
    code = ("import sys; sys.modules['tqdm'] = None\n"
            "import edgestack.core.progress as p, edgestack.runtime, edgestack.package\n"
            "assert p.progress_iter([1], True, 'x') == [1]\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
