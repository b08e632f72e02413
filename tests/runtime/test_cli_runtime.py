"""`edgestack pack / plan / run / verify PKG`: exit codes, --json, messages."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgestack.cli import main

from runtime_helpers import flip_byte


def run_json(capsys, argv):
    code = main(argv + ["--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_pack_a_model_source_with_bitstack_options(tmp_path, capsys):
    """`pack SOURCE` compresses with the BitStack options given (the rest: the packer's
    defaults) and writes a package whose layers hold that many blocks."""
    pkg = tmp_path / "cnn.pkg"
    code, out = run_json(capsys, ["pack", "small-cnn", "--out", str(pkg), "--blocks", "2",
                                  "--signs", "plain", "--factor-bits", "0.25"])
    assert code == 0 and out["ok"] and out["layers"] >= 1 and out["blocks"] == 2 * out["layers"]
    from edgestack.package import Package

    assert Package.open(pkg).manifest.model.name == "small-cnn-bitstack"   # not "exported"
    with pytest.raises(SystemExit):
        main(["pack", "small-cnn", "--out", str(tmp_path / "x"), "--signs", "bogus"])


def test_pack_plan_run_verify(tmp_path, capsys, small_model):
    pkg = tmp_path / "m.pkg"
    code, out = run_json(capsys, ["pack", str(small_model[0]), "--out", str(pkg)])
    assert code == 0 and out["ok"] and out["layers"] == 3 and len(out["tiers"]) >= 3

    code, out = run_json(capsys, ["plan", str(pkg), "--budget", "1GB"])
    plan = out["plan"]
    assert code == 0 and plan["tier"] == plan["n_tiers"] - 1 and plan["fits"]
    assert {"layers", "arena", "overhead_bytes", "total", "budget"} <= set(plan)
    assert all(lp["mode"] in ("int8", "fp32", "on-the-fly") for lp in plan["layers"])
    assert plan["costs"]["source"].startswith("calibrated")    # measured here, then cached
    assert plan["margin_bytes"] >= 3 * 2**20 and plan["total"] == (plan["expected_bytes"]
                                                                   + plan["margin_bytes"])
    code, out = run_json(capsys, ["plan", str(pkg), "--budget", "1GB", "--no-calibrate"])
    assert code == 0 and out["plan"]["costs"]["source"] == "documented constants"
    assert out["plan"]["graph"] == "fp32"         # auto: the most exact form that fits
    for form in ("int8", "nbits8"):
        code, out = run_json(capsys, ["plan", str(pkg), "--budget", "1GB", "--no-calibrate",
                                      "--form", form])
        assert code == 0 and {lp["mode"] for lp in out["plan"]["layers"]} == {form}
        code, out = run_json(capsys, ["run", str(pkg), "--budget", "1GB", "--no-calibrate",
                                      "--form", form])
        assert code == 0 and out["ok"] and out["plan"]["graph"] == form

    assert main(["plan", str(pkg), "--budget", "1MB"]) == 2
    err = capsys.readouterr().err
    assert "at least" in err and "MiB" in err

    code, out = run_json(capsys, ["plan", str(pkg), "--auto"])
    assert code == 0 and out["plan"]["budget_source"].startswith("auto")
    code, out = run_json(capsys, ["plan", str(pkg), "--profile", "ci-x86"])
    assert code == 0 and out["plan"]["budget"] == 4 * 2**30

    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    code, out = run_json(capsys, ["run", str(pkg), "--budget", "1GB", "--input",
                                  str(tmp_path / "in.npz"), "--output",
                                  str(tmp_path / "out.npz")])
    assert code == 0 and out["outputs"]["output"]["shape"] == [2, 32]
    assert np.load(tmp_path / "out.npz")["output"].shape == (2, 32)

    code, out = run_json(capsys, ["verify", str(pkg)])
    assert code == 0 and out["ok"] and out["self_test"]["passed"]

    bad = tmp_path / "bad.pkg"
    shutil.copytree(pkg, bad)
    flip_byte(bad / "blocks.bin", 7)
    code, out = run_json(capsys, ["verify", str(bad)])
    assert code == 2 and "blocks.bin" in out["error"] and "sha256" in out["error"]


def test_pack_archive_and_refusals(tmp_path, capsys, small_model):
    tar = tmp_path / "m.tar"
    assert main(["pack", str(small_model[0]), "--out", str(tar)]) == 0
    capsys.readouterr()
    code, out = run_json(capsys, ["verify", str(tar)])
    assert code == 0 and out["ok"]
    assert main(["pack", str(small_model[0]), "--out", str(tar)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["pack", str(small_model[0]), "--out", str(tmp_path / "x.pkg"),
                 "--target", "coreml"]) == 2
    err = capsys.readouterr().err
    assert "coreml" in err and "ort-cpu, ort-arm, openvino-cpu, tensorrt-gpu" in err


@pytest.mark.parametrize("cmd", ["pack", "plan", "run"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert "--json" in capsys.readouterr().out
