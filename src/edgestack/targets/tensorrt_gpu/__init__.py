"""``tensorrt-gpu``: a TensorRT engine for NVIDIA GPUs.

Lowering passes: shift codes -> exact symmetric ``DequantizeLinear(int8, 2^k scale)`` (no
zero point: TensorRT 10 runs weight-only int8 DQ into MatMul/Gemm/Conv), every other
``edgestack`` node materialized (TensorRT has no uint8 bit ops: ``BitShift`` is not in its
matrix, so the function bodies cannot run), then a check of every node against TensorRT 10's
documented operator support (:mod:`.support`); rejected nodes are listed in the artifact
report and fail the compile.

Build settings from the profile: precision ``fp16``/``bf16`` -> builder flags (``int8`` keeps
the Q/DQ graph strongly typed: explicit quantization, no calibrator); static input shapes,
or an optimization profile (min = 1, opt = max = the example size) for symbolic dims;
``memory_budget`` -> the weight-streaming budget (``WEIGHT_STREAMING`` flag) when weights
exceed it, else the workspace pool limit.

When ``tensorrt`` imports and a GPU is present the engine (``model.engine``) is built here;
otherwise the artifact holds ``model.onnx``, ``build_engine.py`` (the same build through the
tensorrt Python API, to run on the device) and ``report.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgestack.errors import TargetError
from edgestack.targets.base import Artifact, Runner, Target, import_package, io_spec
from edgestack.targets.tensorrt_gpu.support import check_graph

BUILD_SCRIPT = '''#!/usr/bin/env python3
"""Build {engine} from {onnx} with the TensorRT Python API (written by edgestack compile)."""
import json, sys
import tensorrt as trt

SETTINGS = json.loads({settings!r})
logger = trt.Logger(trt.Logger.WARNING)
builder = trt.Builder(logger)
flags = 0
if SETTINGS["strongly_typed"]:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
network = builder.create_network(flags)
parser = trt.OnnxParser(network, logger)
if not parser.parse_from_file(SETTINGS["onnx"]):
    for i in range(parser.num_errors):
        print(parser.get_error(i), file=sys.stderr)
    sys.exit(1)
config = builder.create_builder_config()
for flag in SETTINGS["flags"]:
    config.set_flag(getattr(trt.BuilderFlag, flag))
config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, SETTINGS["workspace_bytes"])
if SETTINGS["profile"]:
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in SETTINGS["profile"].items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
plan = builder.build_serialized_network(network, config)
if plan is None:
    sys.exit("engine build failed")
with open(SETTINGS["engine"], "wb") as f:
    f.write(plan)
print("wrote", SETTINGS["engine"])
'''


def _import_tensorrt() -> Any:
    return import_package("tensorrt", "tensorrt-gpu", "tensorrt",
                          " on a machine with an NVIDIA GPU and driver")


def build_settings(model: Any, profile: Any | None, out_dir: Path) -> dict[str, Any]:
    """The engine build settings (flags, shapes, memory) for a lowered onnx-ir model."""
    precision = profile.precision if profile is not None else "fp32"
    flags = {"fp16": ["FP16"], "bf16": ["BF16"]}.get(precision, [])
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                       if v.const_value is not None)
    budget = profile.memory_budget if profile is not None else None
    streaming = budget is not None and weight_bytes > budget // 2
    if streaming:
        flags.append("WEIGHT_STREAMING")
    shapes: dict[str, list] = {}
    for v in model.graph.inputs:
        dims = list(v.shape or [])
        if any(not isinstance(d, int) for d in dims):
            opt = [d if isinstance(d, int) else 1 for d in dims]
            shapes[v.name] = [[d if isinstance(d, int) else 1 for d in dims], opt, opt]
    return {
        "onnx": str(out_dir / "model.onnx"), "engine": str(out_dir / "model.engine"),
        "precision": precision, "flags": flags,
        "strongly_typed": precision == "int8",
        "workspace_bytes": int(min(budget, 1 << 30)) if budget else 1 << 30,
        "weight_streaming_budget": int(budget // 2) if streaming else None,
        "weight_bytes": int(weight_bytes), "profile": shapes,
    }


class TensorRtGpuRunner(Runner):
    """Runs a built engine (needs tensorrt and a GPU; torch's CUDA tensors as buffers)."""

    def activate_impl(self) -> None:
        trt = _import_tensorrt()
        if "engine" not in self.artifact.files:
            raise TargetError(f"{self.artifact.folder} holds no engine: it was compiled "
                              f"without TensorRT. Run its build_engine.py on the device, then "
                              f"recompile there.")
        import torch

        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.artifact.path("engine").read_bytes())
        self.context = self.engine.create_execution_context()

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        bufs = {}
        for name, arr in feeds.items():
            t = torch.from_numpy(np.ascontiguousarray(arr)).cuda()
            self.context.set_input_shape(name, tuple(arr.shape))
            bufs[name] = t
        for name in self.artifact.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            bufs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
        for name, t in bufs.items():
            self.context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return {n: bufs[n].cpu().numpy() for n in self.artifact.outputs}


class TensorRtGpuTarget(Target):
    """TensorRT 10 on an NVIDIA GPU (engine when tensorrt is present; else build script)."""

    name = "tensorrt-gpu"
    arch = "any"
    extra = "tensorrt"
    precisions = ("fp32", "fp16", "bf16", "int8")

    def import_backend(self) -> Any:
        return _import_tensorrt()

    def available(self) -> tuple[bool, str]:
        ok, why = super().available()
        if not ok:
            return ok, why
        try:
            import torch

            if not torch.cuda.is_available():
                return False, "tensorrt imports but no CUDA GPU is visible"
        except ImportError:
            pass
        return True, ""

    def default_options(self, profile: Any | None) -> dict[str, Any]:
        return {"build": "auto"}

    def lower_impl(self, model_path: Path, out_dir: Path, profile: Any | None,
                   options: dict[str, Any]) -> Artifact:
        import onnx_ir as ir

        from edgestack.targets import passes as P  # lazy: onnx at import

        model = ir.load(model_path)
        report = P.run_passes(model, [P.ShiftToInt8Pass(), P.MaterializePass(),
                                      P.InlineFunctionsPass()])
        rejected = check_graph(model)
        ir.save(model, out_dir / "model.onnx")
        settings = build_settings(model, profile, out_dir)
        script = out_dir / "build_engine.py"
        script.write_text(BUILD_SCRIPT.format(engine="model.engine", onnx="model.onnx",
                                              settings=json.dumps(settings)), encoding="utf-8")
        full = {"passes": report, "rejected": rejected, "build": settings}
        (out_dir / "report.json").write_text(json.dumps(full, indent=2), encoding="utf-8")
        if rejected:
            first = rejected[0]
            raise TargetError(
                f"TensorRT 10 would reject {len(rejected)} node(s) of {model_path}: first "
                f"node {first['node']!r} op {first['op']}: {first['reason']} "
                f"(all in {out_dir / 'report.json'})")
        files = {"model": "model.onnx", "build_script": "build_engine.py",
                 "report": "report.json"}
        ok, why = self.available()
        built = False
        if ok and options["build"] != "never":
            import subprocess
            import sys

            subprocess.run([sys.executable, str(script)], check=True)
            files["engine"] = "model.engine"
            built = True
        elif options["build"] == "always":
            raise TargetError(f"cannot build a TensorRT engine here: {why}")
        inputs, outputs = io_spec(model)
        return Artifact(out_dir, self.name, self.arch, settings["precision"], files, inputs,
                        outputs, options, dict(full, engine_built=built,
                                               engine_skipped_reason=None if built else why))

    def runner_class(self) -> type[Runner]:
        return TensorRtGpuRunner


__all__ = ["TensorRtGpuTarget", "TensorRtGpuRunner", "build_settings"]
