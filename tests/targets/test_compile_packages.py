"""One container: ``compile`` and ``pack`` write the same device package for every CPU target,
and the runtime serves it (tensorrt-gpu: tests/runtime/test_tensorrt_package.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgestack.formats import ShiftCodes
from edgestack.package import Package
from edgestack.pipeline import compile_model, pack_model
from edgestack.runtime import Runtime

from targets_cases import linear_case

RNG = np.random.default_rng(5)


@pytest.fixture(scope="module")
def shift_model(tmp_path_factory):
    """A shift-coded linear layer (exact int8), its inputs and the decoded reference."""
    shift = ShiftCodes.encode(RNG.standard_normal((48, 64)).astype(np.float32), 4, True)
    model, feeds, ref = linear_case(shift, 2, 5, rng=RNG)
    path = tmp_path_factory.mktemp("shift") / "linear.onnx"
    onnx.save(model, path)
    return path, feeds, ref


@pytest.mark.parametrize("target", ["ort-cpu", "ort-arm", "openvino-cpu"])
def test_every_cpu_target_compiles_to_a_package_the_runtime_serves(shift_model, tmp_path,
                                                                    target) -> None:
    path, feeds, ref = shift_model
    out = tmp_path / target
    result = compile_model(path, target, out, golden_inputs=feeds, log=lambda m: None)
    info = result.compile
    # without a profile, ort-cpu lowers shift codes to the integer kernels (ort-arm: when
    # its profile says int8)
    assert info["precision"] == ("int8" if target == "ort-cpu" else "fp32")
    assert info["parity"]["passed"] and result.n_layers == 0 and len(result.tiers) == 1
    with Package.open(out) as pkg:
        assert pkg.manifest.target == target and pkg.manifest.metadata["compile"] == info
        # what the runtime's session needs is typed in the manifest's runtime section
        assert pkg.manifest.runtime.disabled_optimizers == (
            ("SkipLayerNormFusion",) if target == "ort-cpu" else ())
        assert pkg.manifest.runtime.engine_build is None
        pkg.verify()
    exact = {"precision": "f32"} if target == "openvino-cpu" else {}
    with Runtime(out, **exact) as rt:
        assert rt.engine == ("openvino" if target == "openvino-cpu" else "onnxruntime")
        test = rt.self_test()
        assert test["passed"] is True, test
        got = rt.infer(feeds)["y"]
    # the compiled graph computes the model: exact for fp32, the int8 tolerance for int8
    err = float(np.abs(got - ref["y"]).max() / np.abs(ref["y"]).max())
    assert err < (0.08 if info["precision"] == "int8" else 1e-5), err


def test_pack_compiles_a_model_it_cannot_tier(shift_model, tmp_path) -> None:
    path, feeds, _ref = shift_model
    result = pack_model(path, tmp_path / "p", golden_inputs=feeds, log=lambda m: None)
    assert result.compile is not None and result.compile["precision"] == "int8"
    with Package.open(tmp_path / "p") as pkg:
        ops = {n.op_type for n in onnx.load_from_string(pkg.read_file("model.onnx")).graph.node}
    assert "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops, ops
