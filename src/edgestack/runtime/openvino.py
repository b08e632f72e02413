"""Serving a package with OpenVINO (the ``openvino-cpu`` target).

OpenVINO serves the **dense graphs** (``model.fp32.onnx``, ``model.nbits8.onnx``,
``model.int8.onnx``): the runtime decodes the plan's tier into the graph's data file exactly
as for ONNX Runtime (:meth:`edgestack.runtime.Runtime._dense_session`), then OpenVINO reads
that ONNX file and compiles it (``MatMulNBits`` and ``DynamicQuantizeMatMul`` stay
compressed: OpenVINO's ONNX front end turns them into its own compressed-weight matmuls).
For the fp32 graph, unless the precision is ``f32``, its weights are first compressed to
float16 the way
``openvino.save_model(compress_to_fp16=True)`` does (``compress_model_transformation``): a
bf16 or f16 inference rounds them further anyway. Measured on the 12-block MiniLM package,
fp32 graph in bf16: 172 MB peak RSS increase without it, 130 MB with it (a float16 weight
with a ``Cast`` in the ONNX graph did not help: OpenVINO's ONNX front end folds the cast).
The graphs that decode BitStack blocks on every call (plain and mixed) need ONNX Runtime, so
an OpenVINO plan has every layer materialised, and its memory does not depend on the tier.

``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT`` (``f32``, ``bf16``, ``f16``; None:
OpenVINO's default for the CPU). Measured on the 12-block MiniLM package (seq 128, 2 threads,
avx512_bf16 and avx512_vnni; bench/runtime_latency.py, docs/measured.md): the nbits8 plan in
bf16 8.85 ms, 0.89x OpenVINO's own bf16 model of the fp32 export and 0.83x ONNX Runtime's
per-channel int8 model, at +124 MB peak RSS (that bf16 model: +170 MB).
"""

from __future__ import annotations

from typing import Any

from edgestack.errors import TargetError

ENGINES = ("onnxruntime", "openvino", "tensorrt")
"""What can run a package's graphs."""

TARGET_ENGINES = {"ort-cpu": "onnxruntime", "ort-arm": "onnxruntime", "openvino-cpu": "openvino",
                  "tensorrt-gpu": "tensorrt"}
"""The engine a package of each target is served with by default."""

PRECISIONS = ("f32", "bf16", "f16")
"""OpenVINO inference precisions (``INFERENCE_PRECISION_HINT``)."""

PROFILE_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
"""A device profile's (or a baseline's) precision -> OpenVINO's inference precision."""


class _Port:
    """An input or output as ONNX Runtime's session lists them (``.name``)."""

    def __init__(self, name: str) -> None:
        self.name = name


class OpenVINOSession:
    """An OpenVINO compiled model with the part of ONNX Runtime's ``InferenceSession``
    interface the runtime uses (``get_inputs``, ``get_outputs``, ``run(None, feeds)``);
    ``compress``: float32 constants to float16 first (:func:`compress_to_f16`), unless the
    precision is ``f32`` (the fp32 graph; the quantized graphs' float32 scales stay).

    Raises:
        TargetError: OpenVINO is not installed, or cannot read or compile the graph.
    """

    def __init__(self, path: str, *, threads: int | None = None,
                 precision: str | None = None, compress: bool = False) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise TargetError(f"the package is served with OpenVINO, which cannot be imported "
                              f"({exc}); pip install openvino, or serve it with "
                              "engine='onnxruntime'") from None
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        try:
            core = ov.Core()
            model = core.read_model(path)
            if compress and precision != "f32":
                compress_to_f16(model)
            self.compiled = core.compile_model(model, "CPU", config)
            del model
        except Exception as exc:  # OpenVINO raises its own types
            raise TargetError(f"OpenVINO cannot compile {path} ({str(exc)[:300]}); repack "
                              "the model, or serve it with engine='onnxruntime'") from None
        self.request = self.compiled.create_infer_request()
        self._inputs = [_Port(p.get_any_name()) for p in self.compiled.inputs]
        self._outputs = [_Port(p.get_any_name()) for p in self.compiled.outputs]

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs

    def run(self, names: Any, feeds: dict[str, Any]) -> list[Any]:
        """The outputs, in :meth:`get_outputs` order (copies of the request's buffers:
        ``share_outputs`` is off)."""
        result = self.request.infer(feeds, share_outputs=False)
        return [result[port] for port in self.compiled.outputs]


def compress_to_f16(model: Any) -> bool:
    """Compress ``model``'s float32 constants to float16 in place, as
    ``openvino.save_model(..., compress_to_fp16=True)`` does; False where this OpenVINO has no
    such transformation (the model is then compiled as it is: more memory, which the
    calibration measures)."""
    try:
        from openvino._offline_transformations import compress_model_transformation
    except ImportError:
        return False
    compress_model_transformation(model)
    return True


def check_engine(engine: str, precision: str | None, target: str) -> str:
    """The engine to serve a package of ``target`` with (``engine`` ``"auto"``: the
    target's), checked with ``precision``; TargetError on a bad combination."""
    if engine == "auto":
        engine = TARGET_ENGINES.get(target, "onnxruntime")
    if engine not in ENGINES:
        raise TargetError(f"engine must be 'auto' or one of {', '.join(ENGINES)}, found "
                          f"{engine!r}")
    if precision is not None and (engine != "openvino" or precision not in PRECISIONS):
        raise TargetError(f"precision is OpenVINO's inference precision, one of "
                          f"{', '.join(PRECISIONS)}, with engine='openvino'; found "
                          f"precision={precision!r} with engine={engine!r}")
    if (engine == "tensorrt") != (target == "tensorrt-gpu"):
        raise TargetError(f"a {target} package is served with "
                          f"{TARGET_ENGINES.get(target, 'onnxruntime')}, found engine="
                          f"{engine!r} (TensorRT serves tensorrt-gpu packages only, and they "
                          "need it)")
    return engine


__all__ = ["OpenVINOSession", "check_engine", "ENGINES", "TARGET_ENGINES", "PRECISIONS",
           "PROFILE_PRECISIONS"]
