"""ONNX Runtime on aarch64 (under qemu) against ONNX Runtime on x86, same models and inputs.

These tests need the environment that `make arm-env` builds; `make test` builds it first.
They deliberately do not skip when it is missing: a missing environment fails with the
TargetError that says how to build it. Each emulated run starts an interpreter (seconds), so
the tests keep the number of runs small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgestack.errors import TargetError
from edgestack.targets.emulate import ENV_VAR, AArch64Emulator

RNG = np.random.default_rng(20260527)


@pytest.fixture(scope="module")
def emulator() -> AArch64Emulator:
    return AArch64Emulator.find()


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def _x86(path: Path, feeds: dict[str, np.ndarray], level: str = "all") -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _dense_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """MatMul + Add + Relu with odd shapes, then a wider MatMul so SGEMM kernels are used."""
    w1 = RNG.standard_normal((13, 11)).astype(np.float32)
    b1 = RNG.standard_normal(11).astype(np.float32)
    w2 = RNG.standard_normal((11, 67)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["mm"]),
            helper.make_node("Add", ["mm", "b1"], ["biased"]),
            helper.make_node("Relu", ["biased"], ["hidden"]),
            helper.make_node("MatMul", ["hidden", "w2"], ["/out/MatMul_output_0"]),
        ],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 7, 13])],
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [3, 7, 11]),
            # A slash-led name, as torch exports them, must survive the .npz round trip.
            helper.make_tensor_value_info("/out/MatMul_output_0", TensorProto.FLOAT,
                                          [3, 7, 67]),
        ],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
         numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model, {"x": RNG.standard_normal((3, 7, 13)).astype(np.float32)}


def _unpack_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """2-bit weight unpack (BitShift + BitwiseAnd on uint8, 3-D broadcast on a constant).

    The shape of edgestack's custom-op function bodies: packed[K/4, N] -> codes[K, N] ->
    dequantized weight -> MatMul.
    """
    k, n = 24, 5
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["packed", "axis1"], ["p3"]),
            helper.make_node("BitShift", ["p3", "shifts"], ["shifted"], direction="RIGHT"),
            helper.make_node("BitwiseAnd", ["shifted", "mask"], ["masked"]),
            helper.make_node("Reshape", ["masked", "kn"], ["codes"]),
            helper.make_node("Cast", ["codes"], ["codes_f"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["codes_f", "zero"], ["centred"]),
            helper.make_node("Mul", ["centred", "scale"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "unpack",
        [helper.make_tensor_value_info("packed", TensorProto.UINT8, [k // 4, n]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("codes", TensorProto.UINT8, [k, n]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
         numpy_helper.from_array(shifts, "shifts"),
         numpy_helper.from_array(np.array(3, np.uint8), "mask"),
         numpy_helper.from_array(np.array([k, n], np.int64), "kn"),
         numpy_helper.from_array(np.array(1.5, np.float32), "zero"),
         numpy_helper.from_array(RNG.uniform(0.01, 0.1, n).astype(np.float32), "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    feeds = {
        "packed": RNG.integers(0, 256, (k // 4, n), dtype=np.uint8),
        "x": RNG.standard_normal((3, k)).astype(np.float32),
    }
    return model, feeds


def test_versions_report_aarch64(emulator: AArch64Emulator) -> None:
    found = emulator.versions()
    assert found["machine"] == "aarch64"
    assert found["python"].startswith("3.")
    assert found["numpy"] and found["onnxruntime"]


@pytest.mark.parametrize(("threads", "level"), [(1, "all"), (2, "disable")])
def test_dense_matches_x86(emulator: AArch64Emulator, tmp_path: Path, threads: int,
                           level: str) -> None:
    model, feeds = _dense_model()
    path = _save(model, tmp_path / "dense.onnx")
    want = _x86(path, feeds, level)
    got = emulator.run_onnx(path, feeds, threads=threads, optimization=level)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        # Kernels differ (NEON vs AVX): summation order may move the last bits.
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_uint8_unpack_matches_x86(emulator: AArch64Emulator, tmp_path: Path) -> None:
    model, feeds = _unpack_model()
    path = _save(model, tmp_path / "unpack.onnx")
    want = _x86(path, feeds)
    got = emulator.run_onnx(path, feeds)

    packed = feeds["packed"]
    reference = ((packed[:, None, :] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]) & 3)
    np.testing.assert_array_equal(want["codes"], reference.reshape(24, 5))
    assert got["codes"].dtype == np.uint8
    np.testing.assert_array_equal(got["codes"], want["codes"])
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6, atol=1e-6)


def test_ort_format_model_matches_x86(emulator: AArch64Emulator, tmp_path: Path) -> None:
    model, feeds = _unpack_model()
    path = _save(model, tmp_path / "unpack.onnx")
    # Basic optimizations only: "all" would bake x86-specific layouts into the file.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "unpack.ort")
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    got = emulator.run_onnx(tmp_path / "unpack.ort", feeds)
    want = _x86(path, feeds)
    np.testing.assert_array_equal(got["codes"], want["codes"])
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6, atol=1e-6)


def test_load_failure_is_target_error(emulator: AArch64Emulator, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(TargetError, match="aarch64 failed at stage 'load-model'"):
        emulator.run_onnx(bad, {})


def test_timeout_is_target_error(emulator: AArch64Emulator) -> None:
    with pytest.raises(TargetError, match="timed out"):
        emulator.run_python("import time; time.sleep(60)", timeout=2)


def test_bad_arguments_fail_before_emulating(emulator: AArch64Emulator, tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="no such file"):
        emulator.run_onnx(tmp_path / "missing.onnx", {})
    model, feeds = _dense_model()
    path = _save(model, tmp_path / "dense.onnx")
    with pytest.raises(TargetError, match="expected one of disable, basic, extended, all"):
        emulator.run_onnx(path, feeds, optimization="O3")


def test_find_on_empty_folder_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="make arm-env") as info:
        AArch64Emulator.find(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_env_var_pointing_nowhere_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nothing-here"))
    with pytest.raises(TargetError, match="make arm-env"):
        AArch64Emulator.find()
    assert AArch64Emulator.available() is False
