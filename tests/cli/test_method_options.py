"""One set of compression options on every command that compresses (issue 13 item 3):
``export``, ``pack``, ``quality``, ``parity`` and ``sensitivity`` take the same flags, refuse
the ones a method does not take and bad values before loading anything, and ``pack`` builds
what the flags say."""

from __future__ import annotations

import json
import time

import pytest

from edgestack.cli import main
from edgestack.package import Package

COMMANDS = ("export", "pack", "quality", "parity", "sensitivity")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_compressing_command_has_the_same_flags(command, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for flag in ("--bits", "--rounding", "--blocks", "--factor-bits", "--signs", "--rank",
                 "--ratio", "--energy", "--metric", "--skip", "--finetune-steps"):
        assert flag in text, (command, flag)


@pytest.mark.parametrize(("command", "extra"), [
    ("export", ["--out", "{tmp}/m.onnx"]), ("pack", ["--out", "{tmp}/m.pkg"]),
    ("parity", []), ("quality", []), ("sensitivity", [])])
def test_a_flag_the_method_does_not_take_fails_fast(command, extra, tmp_path, capsys) -> None:
    args = [command, "small-cnn", "--method", "prune", "--bits", "3",
            *[a.format(tmp=tmp_path) for a in extra]]
    t0 = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - t0 < 2.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bits do not apply to --method prune" in err[0], err
    assert not list(tmp_path.iterdir())


def test_pack_builds_what_the_flags_say(tmp_path, capsys) -> None:
    out = tmp_path / "cnn.pkg"
    assert main(["pack", "small-cnn", "--method", "shift", "--bits", "3", "--rounding",
                 "nearest", "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["compile"]["precision"] == "int8"     # a shift model's compiled package
    with Package.open(out) as pkg:
        assert pkg.manifest.model.method == "shift"
        assert pkg.manifest.model.source == "small-cnn"   # not the scratch file it went via
    assert main(["pack", str(tmp_path / "x.onnx"), "--blocks", "3", "--out",
                 str(tmp_path / "y.pkg")]) == 2
    assert "apply to a model source only" in capsys.readouterr().err


def test_finetune_act_quant_flag_is_a_shift_option() -> None:
    import argparse

    from edgestack.cli.options import add_method_options, method_options
    from edgestack.errors import CompressError

    p = argparse.ArgumentParser()
    p.add_argument("--method")
    add_method_options(p)
    args = p.parse_args(["--method", "shift", "--zero", "--finetune-steps", "5",
                         "--finetune-act-quant"])
    assert method_options(args) == {"zero": True, "finetune_steps": 5,
                                    "finetune_act_quant": True}
    assert "finetune_act_quant" not in method_options(p.parse_args(["--method", "shift"]))
    with pytest.raises(CompressError, match="--finetune-act-quant do not apply"):
        method_options(p.parse_args(["--method", "bitstack", "--finetune-act-quant"]))
