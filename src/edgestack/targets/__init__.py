"""Compile targets: one sub-package per backend behind one small interface.

::

    from edgestack.targets import get_target
    t = get_target("ort-cpu")
    ok, why = t.available()
    art = t.lower("model.onnx", "out/", profile="ci-x86")     # writes out/artifact.json
    with t.runner(art) as r:
        outputs = r.infer(feeds)

Targets: ``ort-cpu`` (ONNX Runtime x86), ``ort-arm`` (ONNX Runtime aarch64, ORT format;
verified under qemu emulation on x86), ``openvino-cpu`` (OpenVINO IR), ``tensorrt-gpu``
(TensorRT engine, or the lowered ONNX + build script without TensorRT). Backends import
their heavy packages lazily. docs/targets.md has the support matrix and tolerances.
"""

from __future__ import annotations

from edgestack.errors import TargetError
from edgestack.targets.base import Artifact, Runner, Target, host_arch

TARGET_NAMES = ("ort-cpu", "ort-arm", "openvino-cpu", "tensorrt-gpu")


def _classes() -> dict[str, type[Target]]:
    from edgestack.targets.openvino_cpu import OpenVinoCpuTarget  # lazy: keeps CLI start light
    from edgestack.targets.ort_arm import OrtArmTarget  # lazy: keeps CLI start light
    from edgestack.targets.ort_cpu import OrtCpuTarget  # lazy: keeps CLI start light
    from edgestack.targets.tensorrt_gpu import TensorRtGpuTarget  # lazy: keeps CLI start light

    return {"ort-cpu": OrtCpuTarget, "ort-arm": OrtArmTarget,
            "openvino-cpu": OpenVinoCpuTarget, "tensorrt-gpu": TensorRtGpuTarget}


def get_target(name: str) -> Target:
    """The target called ``name``.

    Raises:
        TargetError: unknown name; the message lists the valid ones.
    """
    classes = _classes()
    if name not in classes:
        raise TargetError(f"unknown target {name!r}: expected one of "
                          f"{', '.join(TARGET_NAMES)}")
    return classes[name]()


def load_runner(artifact: str | Artifact, **kwargs) -> Runner:
    """A runner for a compiled artifact folder, picked by its ``target``."""
    if not isinstance(artifact, Artifact):
        artifact = Artifact.load(artifact)
    return get_target(artifact.target).runner(artifact, **kwargs)


__all__ = ["Artifact", "Runner", "Target", "TARGET_NAMES", "get_target", "load_runner",
           "host_arch"]
