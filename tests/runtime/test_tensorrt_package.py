"""tensorrt-gpu device packages: the compiled graph and the engine build settings; the runtime
builds the engine on the device on first use. No machine here has TensorRT (its absence is
made certain below, so these run the same everywhere): the hashes are checked, then exit 4."""

from __future__ import annotations

import builtins

import pytest

from edgestack.errors import BackendUnavailable, PackageError, TargetError
from edgestack.pipeline import pack_model
from edgestack.runtime import Runtime
from edgestack.runtime.openvino import check_engine
from edgestack.runtime.tensorrt import TensorRTSession, engine_key

from runtime_helpers import small_model  # noqa: F401 - fixture


def _no_tensorrt(real_import):
    def fake(name, *args, **kwargs):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)
    return fake


def test_tensorrt_package_holds_the_build_settings_and_exits_4_here(tmp_path, monkeypatch,
                                                                   small_model) -> None:  # noqa: F811
    # a BitStack model for tensorrt-gpu: no tiers there, so it is compiled (materialised)
    out = tmp_path / "trt"
    result = pack_model(small_model[0], out, target="tensorrt-gpu", log=lambda m: None)
    build = result.compile["build"]
    assert result.n_layers == 0 and build["onnx"] == "model.onnx"
    from edgestack.package import Package

    with Package.open(out) as pkg:   # typed where the runtime reads it
        assert dict(pkg.manifest.runtime.engine_build) == build
    assert build["precision"] == "fp32" and build["workspace_bytes"] == 1 << 30
    monkeypatch.setattr(builtins, "__import__", _no_tensorrt(builtins.__import__))
    with pytest.raises(BackendUnavailable, match="tensorrt cannot be imported"):
        Runtime(out)
    from edgestack.cli import main

    assert main(["verify", str(out)]) == 4


def test_the_packer_refuses_bitstack_tiers_for_tensorrt(small_model, tmp_path) -> None:  # noqa: F811
    from edgestack.packer.pack import pack

    with pytest.raises(PackageError, match="serves no BitStack tiers.*edgestack compile"):
        pack(small_model[0], tmp_path / "x", target="tensorrt-gpu")
    assert not (tmp_path / "x").exists()


def test_engine_choice_and_cache_key() -> None:
    assert check_engine("auto", None, "tensorrt-gpu") == "tensorrt"
    with pytest.raises(TargetError, match="TensorRT serves tensorrt-gpu packages only"):
        check_engine("tensorrt", None, "ort-cpu")
    with pytest.raises(TargetError, match="served with tensorrt"):
        check_engine("onnxruntime", None, "tensorrt-gpu")
    settings = {"flags": ["FP16"], "profile": {}}
    key = engine_key("ab" * 32, settings, "10.13", "NVIDIA H100")
    assert key == engine_key("ab" * 32, dict(settings), "10.13", "NVIDIA H100")
    for other in (engine_key("cd" * 32, settings, "10.13", "NVIDIA H100"),
                  engine_key("ab" * 32, {"flags": [], "profile": {}}, "10.13", "NVIDIA H100"),
                  engine_key("ab" * 32, settings, "10.14", "NVIDIA H100"),
                  engine_key("ab" * 32, settings, "10.13", "Jetson Orin")):
        assert other != key


def test_tensorrt_session_says_what_is_missing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(builtins, "__import__", _no_tensorrt(builtins.__import__))
    with pytest.raises(BackendUnavailable, match="pip install 'edgestack\\[tensorrt\\]'"):
        TensorRTSession(b"", "0" * 64, {}, tmp_path)
    assert not any(tmp_path.iterdir())      # nothing cached, nothing built
