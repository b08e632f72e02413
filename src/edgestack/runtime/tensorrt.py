"""Serving a package with TensorRT (the ``tensorrt-gpu`` target).

A ``tensorrt-gpu`` package holds the compiled ONNX graph (every edgestack op materialised,
shift codes as int8 ``DequantizeLinear``) and the engine build settings the compile chose
(``metadata.compile.build``: builder flags, optimization-profile shapes, workspace and
weight-streaming budgets; see :func:`edgestack.targets.tensorrt_gpu.build_settings`). An
engine is specific to the GPU and the TensorRT version, so it is built **on the device, on
first use**, and cached beside the package (``<package>.engines/<key>.engine``; the key hashes
the graph's sha256, the settings, the TensorRT version and the GPU's name), so later loads
deserialize it in well under a second.

Buffers live in GPU memory through ``cuda-python`` (``cuda.bindings.runtime``), so the runtime
stays free of torch. Where ``tensorrt`` or ``cuda-python`` cannot be imported, or no GPU is
visible, :class:`TensorRTSession` raises :class:`~edgestack.errors.BackendUnavailable` (the
command line exits 4): the package itself is fine, this machine cannot run it.

Not exercised by this project's tests: none of its machines has TensorRT (the tests check the
package, its settings and the exit-4 path).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgestack.errors import BackendUnavailable, TargetError


class _Port:
    def __init__(self, name: str) -> None:
        self.name = name


def _import_backend() -> tuple[Any, Any]:
    """``(tensorrt, cudart)``, or BackendUnavailable saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f"the package targets tensorrt-gpu, and tensorrt cannot be imported ({exc}). "
            "To fix: run it on a machine with an NVIDIA GPU, its driver and "
            "`pip install 'edgestack[tensorrt]'`") from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python before 12.6
        except ImportError as exc:
            raise BackendUnavailable(
                f"serving with TensorRT needs cuda-python for GPU buffers ({exc}). To fix: "
                "pip install cuda-python") from None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise BackendUnavailable(f"tensorrt imports but no CUDA GPU is visible ({err})")
    return trt, cudart


def _check(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise TargetError(f"CUDA: {what} failed ({err})")
    return rest[0] if len(rest) == 1 else rest


def engine_key(graph_sha256: str, settings: dict[str, Any], trt_version: str, gpu: str) -> str:
    """The cache key of an engine: what makes two builds differ."""
    blob = json.dumps([graph_sha256, settings, trt_version, gpu], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class TensorRTSession:
    """A TensorRT engine with the part of ONNX Runtime's ``InferenceSession`` interface the
    runtime uses (``get_inputs``, ``get_outputs``, ``run(None, feeds)``).

    Args:
        graph: the package's ONNX bytes; ``graph_sha256``: its hash (the cache key).
        settings: ``metadata.compile.build`` of the package.
        cache: the engine cache folder (created).

    Raises:
        BackendUnavailable: no TensorRT, cuda-python or GPU here.
        TargetError: the engine cannot be built or run.
    """

    def __init__(self, graph: bytes, graph_sha256: str, settings: dict[str, Any],
                 cache: Path) -> None:
        trt, self.cudart = _import_backend()
        self.trt = trt
        props = _check(self.cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
        gpu = props.name.decode(errors="replace") if isinstance(props.name, bytes) \
            else str(props.name)
        key = engine_key(graph_sha256, settings, trt.__version__, gpu)
        path = cache / f"{key}.engine"
        logger = trt.Logger(trt.Logger.WARNING)
        if not path.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            plan = self._build(graph, settings, logger)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(plan)
            os.replace(tmp, path)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise TargetError(f"TensorRT cannot deserialize {path}; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [_Port(n) for n in names if is_in[n]]
        self._outputs = [_Port(n) for n in names if not is_in[n]]
        self.stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.engine_path = path

    def _build(self, graph: bytes, settings: dict[str, Any], logger: Any) -> bytes:
        trt = self.trt
        builder = trt.Builder(logger)
        flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
                 if settings.get("strongly_typed") else 0)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(graph):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TargetError(f"TensorRT cannot parse the package's graph: {errors[:500]}")
        config = builder.create_builder_config()
        for flag in settings.get("flags", []):
            config.set_flag(getattr(trt.BuilderFlag, flag))
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                     int(settings.get("workspace_bytes", 1 << 30)))
        shapes = settings.get("profile") or {}
        if shapes:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise TargetError("TensorRT could not build an engine from the package's graph "
                              "(see TensorRT's log above)")
        return bytes(plan)

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs

    def run(self, names: Any, feeds: dict[str, Any]) -> list[np.ndarray]:
        """The outputs in :meth:`get_outputs` order (host copies)."""
        rt, trt = self.cudart, self.trt
        kind = rt.cudaMemcpyKind
        owned = []
        try:
            for port in self._inputs:
                arr = np.ascontiguousarray(feeds[port.name])
                self.context.set_input_shape(port.name, tuple(arr.shape))
                ptr = _check(rt.cudaMalloc(max(arr.nbytes, 1)), "cudaMalloc")
                owned.append(ptr)
                _check(rt.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes,
                                     kind.cudaMemcpyHostToDevice), "cudaMemcpy")
                self.context.set_tensor_address(port.name, ptr)
            outs = []
            for port in self._outputs:
                shape = tuple(self.context.get_tensor_shape(port.name))
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(port.name)))
                host = np.empty(shape, dtype)
                ptr = _check(rt.cudaMalloc(max(host.nbytes, 1)), "cudaMalloc")
                owned.append(ptr)
                self.context.set_tensor_address(port.name, ptr)
                outs.append((host, ptr))
            if not self.context.execute_async_v3(self.stream):
                raise TargetError("TensorRT: execute_async_v3 failed")
            _check(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            for host, ptr in outs:
                _check(rt.cudaMemcpy(host.ctypes.data, ptr, host.nbytes,
                                     kind.cudaMemcpyDeviceToHost), "cudaMemcpy")
            return [host for host, _ptr in outs]
        finally:
            for ptr in owned:
                rt.cudaFree(ptr)


__all__ = ["TensorRTSession", "engine_key"]
