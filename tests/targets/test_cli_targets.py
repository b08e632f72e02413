"""``edgestack compile / verify / parity`` and the bad-input errors of the targets."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgestack.cli as cli
from edgestack.cli import compile as compile_cmd
from edgestack.cli import parity as parity_cmd
from edgestack.cli import verify as verify_cmd
from edgestack.errors import TargetError
from edgestack.formats import ShiftCodes
from edgestack.targets import get_target
from edgestack.targets.ort_arm import OrtArmRunner
from edgestack.targets.ort_cpu import OrtCpuRunner

from targets_cases import linear_case

RNG = np.random.default_rng(11)


@pytest.fixture
def main(monkeypatch):
    monkeypatch.setattr(cli, "_commands", lambda: [compile_cmd, verify_cmd, parity_cmd])
    return cli.main


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    shift = ShiftCodes.encode(RNG.standard_normal((11, 13)).astype(np.float32), 4, True)
    path = tmp_path_factory.mktemp("cli") / "linear.onnx"
    onnx.save(linear_case(shift, 2, 3, rng=RNG)[0], path)
    return path


def test_compile_writes_a_package_verified_under_emulation(main, model, tmp_path,
                                                            capsys) -> None:
    from edgestack.package import Package

    out = tmp_path / "arm"
    assert main(["compile", str(model), "--target", "ort-arm", "--profile", "arm64-phone-2gb",
                 "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["target"] == "ort-arm" and data["compile"]["arch"] == "aarch64"
    assert data["compile"]["precision"] == "int8" and data["compile"]["parity"]["passed"]
    assert data["compile"]["report"]["passes"]["DynamicInt8MatMulPass"]["rewritten"] == 1
    with Package.open(out) as pkg:   # the device package format, the same as `pack` writes
        assert pkg.manifest.target == "ort-arm" and len(pkg.tiers) == 1
        assert {"model.onnx", "golden/inputs.npz", "golden/outputs.npz"} <= set(pkg.files)
        assert pkg.golden_info.rtol == pytest.approx(0.08)     # the int8 tolerance
        assert pkg.manifest.metadata["compile"]["options"]["int8"] == "dynamic"
    assert main(["verify", str(out), "--emulate", "aarch64", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["emulated"] == "aarch64" and rep["self_test"]["passed"]
    # an existing package is kept unless --overwrite
    assert main(["compile", str(model), "--target", "ort-cpu", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["compile", str(model), "--target", "ort-cpu", "--out", str(out),
                 "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == "ort-cpu"


def test_verify_refuses_an_old_artifact_folder(main, tmp_path, capsys) -> None:
    (tmp_path / "artifact.json").write_text("{}")
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "older edgestack" in err and "edgestack compile" in err


def test_parity_all_targets_table(main, model, capsys) -> None:
    assert main(["parity", str(model), "--targets", "all"]) == 0
    text = capsys.readouterr().out
    for name in ("ort-cpu", "ort-arm", "openvino-cpu"):
        assert f"  {name}" in text
    assert "tensorrt-gpu" in text and ("SKIPPED" in text or "ok" in text)
    assert text.strip().endswith("PASS")


def test_parity_failure_exits_1(main, model, capsys) -> None:
    # int8 dynamic judged against fp32-only tolerances cannot pass on this layer
    from edgestack.targets import parity

    tight = parity.Tolerance(1e-9, 1e-9, 1.0, 1.0)
    orig = dict(parity.TOLERANCES)
    try:
        parity.TOLERANCES["int8"] = tight
        code = main(["parity", str(model), "--targets", "ort-cpu", "--int8", "dynamic",
                     "--json"])
    finally:
        parity.TOLERANCES.update(orig)
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and data["ok"] is False
    assert data["targets"][0]["precision"] == "int8"


def test_unknown_target_lists_valid_ones(main, model, tmp_path, capsys) -> None:
    assert main(["compile", str(model), "--target", "coreml", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'coreml'" in err
    assert "ort-cpu, ort-arm, openvino-cpu, tensorrt-gpu" in err
    with pytest.raises(TargetError, match="expected one of ort-cpu"):
        get_target("nope")


def test_op_the_target_cannot_run_names_op_and_node(tmp_path) -> None:
    graph = helper.make_graph(
        [helper.make_node("FancyOp", ["x"], ["y"], name="my_fancy_node", domain="acme")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                helper.make_opsetid("acme", 1)])
    onnx.save(m, tmp_path / "fancy.onnx")
    for target in ("ort-cpu", "ort-arm", "openvino-cpu"):
        with pytest.raises(TargetError, match=r"node 'my_fancy_node': op acme\.FancyOp"):
            get_target(target).lower(tmp_path / "fancy.onnx", tmp_path / target)
    with pytest.raises(TargetError, match=r"'my_fancy_node' op acme\.FancyOp"):
        get_target("tensorrt-gpu").lower(tmp_path / "fancy.onnx", tmp_path / "trt")


@pytest.mark.parametrize(("target", "module", "extra"), [
    ("openvino-cpu", "openvino", "edgestack[openvino]"),
    ("tensorrt-gpu", "tensorrt", "edgestack[tensorrt]"),
])
def test_missing_backend_names_the_extra(monkeypatch, main, model, tmp_path, capsys,
                                         target, module, extra) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named '{module}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    ok, why = get_target(target).available()
    assert not ok and extra in why
    code = main(["compile", str(model), "--target", target, "--out", str(tmp_path / "o")])
    out = capsys.readouterr()
    if target == "openvino-cpu":
        # skipped (exit 4): lowering needs openvino itself, nothing is written without it
        assert code == 4 and extra in out.err and not (tmp_path / "o").exists()
        return
    # TensorRT: the package holds the lowered graph and the engine build settings; the engine
    # is built on the device on first use, so `verify` checks the files and exits 4 here
    from edgestack.package import Package

    assert code == 0 and extra in out.out
    with Package.open(tmp_path / "o") as pkg:
        build = pkg.manifest.metadata["compile"]["build"]
        assert pkg.manifest.target == "tensorrt-gpu" and build["onnx"] == "model.onnx"
        assert build["precision"] == "fp32" and "workspace_bytes" in build
    assert main(["verify", str(tmp_path / "o"), "--json"]) == 4
    rep = json.loads(capsys.readouterr().out)
    assert rep["hashes"] == "ok" and rep["ok"] is None and "tensorrt" in rep["self_test"]["reason"]


def test_artifact_for_another_architecture(model, tmp_path) -> None:
    arm = get_target("ort-arm").lower(model, tmp_path / "arm")
    x86 = get_target("ort-cpu").lower(model, tmp_path / "x86")
    with pytest.raises(TargetError, match="runs x86_64 artifacts.*compiled for aarch64"):
        OrtCpuRunner(arm).activate()
    with pytest.raises(TargetError, match="runs aarch64 artifacts.*compiled for x86_64"):
        OrtArmRunner(x86, emulate=True).activate()
    with pytest.raises(TargetError, match="runs x86_64 artifacts.*compiled for aarch64"):
        OrtArmRunner(arm).activate()        # no emulation on an x86 host
    with pytest.raises(TargetError, match="compiled for ort-arm, not ort-cpu"):
        get_target("ort-cpu").runner(arm)


def test_runner_checks_feeds_and_lifecycle(model, tmp_path) -> None:
    t = get_target("ort-cpu")
    art = t.lower(model, tmp_path / "a", "ci-x86")
    assert art.options["threads"] == 2
    runner = t.runner(art)
    with pytest.raises(TargetError, match="activate"):
        runner.infer({"x": np.zeros((2, 3, 13), np.float32)})
    with runner:
        with pytest.raises(TargetError, match="expected shape"):
            runner.infer({"x": np.zeros((2, 3, 12), np.float32)})
        with pytest.raises(TargetError, match="missing"):
            runner.infer({})
        runner.infer({"x": np.zeros((2, 3, 13), np.float32)})
        assert runner.last_ms is not None and runner.last_ms > 0
    with pytest.raises(TargetError, match="unknown option"):
        t.lower(model, tmp_path / "b", bogus=1)
    from edgestack.profiles import load_profile

    jetson = load_profile("jetson-orin-nano-8gb")
    with pytest.raises(TargetError, match=f"cannot run precision {jetson.precision}"):
        t.lower(model, tmp_path / "c", jetson)
