"""``openvino-cpu``: OpenVINO IR (``model.xml`` + ``model.bin``) on the CPU plugin.

Lowering passes: with ``int8=weights`` (``auto``: for int8 profiles) shift codes that fit
int8 -> exact ``DequantizeLinear(int8, 2^k scale)`` (OpenVINO keeps them as compressed int8
weights and decompresses exactly: 4x smaller, but measured ~2x slower than materialized f32
on MiniLM here, hence not the default for fp32/bf16), every other ``edgestack`` node
materialized to float32, then ``ov.convert_model`` and ``ov.save_model`` (no fp16 weight
compression).

``weights=keep`` is refused: inlined decode bodies (OpenVINO's ONNX frontend does not read
model-local functions, so they must be inlined) gave WRONG values on OpenVINO 2026.4 CPU
when the packed codes are a constant and the decoded weight feeds a MatMul (both the
2-D-broadcast edgestack bodies and a 3-D-broadcast BitShift unpack; correct when the codes
are a graph input), see tests/targets/test_openvino_bitshift.py. The lowered graph therefore
holds no BitShift at all; the lowering checks that.

Precision: the runner sets ``INFERENCE_PRECISION_HINT`` from the artifact precision
(``f32`` for fp32 profiles and parity runs; ``bf16``/``f16`` where the profile asks; int8
profiles keep f32 activations with int8 weights). OpenVINO's own default on this CPU is
bf16, so the hint is always set explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgestack.errors import TargetError
from edgestack.targets.base import Artifact, Runner, Target, import_package, io_spec
from edgestack.targets.ort_cpu import check_domains

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


def _import_openvino() -> Any:
    return import_package("openvino", "openvino-cpu", "openvino")


class OpenVinoCpuRunner(Runner):
    """An OpenVINO compiled model on device CPU."""

    def __init__(self, artifact: Artifact, precision: str | None = None) -> None:
        super().__init__(artifact)
        self.precision = precision or artifact.precision

    def activate_impl(self) -> None:
        ov = _import_openvino()
        core = ov.Core()
        cfg = {"INFERENCE_PRECISION_HINT": HINTS[self.precision],
               "INFERENCE_NUM_THREADS": int(self.artifact.options.get("threads", 1))}
        self.compiled = core.compile_model(str(self.artifact.path()), "CPU", cfg)
        self.request = self.compiled.create_infer_request()
        # What OpenVINO actually runs (a CPU without bf16 runs a bf16 hint in f32).
        self.effective_precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.names = [o.get_any_name() for o in self.compiled.outputs]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.request.infer(feeds)
        return {n: np.array(res[o]) for n, o in zip(self.names, self.compiled.outputs, strict=True)}

    def release_impl(self) -> None:
        self.request = self.compiled = None


class OpenVinoCpuTarget(Target):
    """OpenVINO CPU (options: ``int8`` on/off, ``weights``, ``threads``)."""

    name = "openvino-cpu"
    arch = "any"
    extra = "openvino"
    precisions = ("fp32", "fp16", "bf16", "int8")

    def import_backend(self) -> Any:
        return _import_openvino()

    def default_options(self, profile: Any | None) -> dict[str, Any]:
        return {"int8": "auto", "weights": "materialize",
                "threads": profile.threads if profile else 1}

    def lower_impl(self, model_path: Path, out_dir: Path, profile: Any | None,
                   options: dict[str, Any]) -> Artifact:
        import onnx_ir as ir

        from edgestack.targets import passes as P  # lazy: onnx at import

        ov = _import_openvino()
        if options["int8"] == "auto":
            options["int8"] = ("weights" if profile is not None and profile.precision == "int8"
                               else "off")
        if options["int8"] not in ("weights", "off"):
            raise TargetError(f"openvino-cpu: int8 must be 'auto', 'weights' or 'off', found "
                              f"{options['int8']!r}")
        if options["weights"] != "materialize":
            raise TargetError(
                f"openvino-cpu: weights={options['weights']!r} is not supported: OpenVINO "
                f"2026.4 computed inlined decode bodies on constant codes wrongly when the "
                f"weight feeds a MatMul (docs/targets.md). Use weights='materialize' (the "
                f"default) or int8='weights' for small exact int8 weights.")
        model = ir.load(model_path)
        chain: list = [P.ShiftToInt8Pass()] if options["int8"] == "weights" else []
        chain += [P.MaterializePass(), P.InlineFunctionsPass()]
        report = P.run_passes(model, chain)
        check_domains(model, self.name, ("", "ai.onnx"))
        shifts = [n.name for n in model.graph if n.op_type == "BitShift"]
        if shifts:
            raise TargetError(
                f"openvino-cpu: the lowered graph still holds BitShift node(s) {shifts[:3]} "
                f"(a decode whose inputs are not constant); OpenVINO miscomputes such "
                f"unpack subgraphs on constants. Export with constant (initializer) weights.")
        onnx_path = out_dir / "model.onnx"
        ir.save(model, onnx_path)
        try:
            ov_model = ov.convert_model(str(onnx_path))
        except Exception as exc:
            raise TargetError(f"OpenVINO could not convert {onnx_path}: {exc}") from exc
        ov.save_model(ov_model, str(out_dir / "model.xml"), compress_to_fp16=False)
        inputs, outputs = io_spec(model)
        precision = profile.precision if profile is not None else "fp32"
        return Artifact(out_dir, self.name, self.arch, precision,
                        {"model": "model.xml", "weights": "model.bin", "onnx": "model.onnx"},
                        inputs, outputs, options, {"passes": report})

    def runner_class(self) -> type[Runner]:
        return OpenVinoCpuRunner


__all__ = ["OpenVinoCpuTarget", "OpenVinoCpuRunner"]
