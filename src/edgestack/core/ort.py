"""ONNX Runtime CPU sessions, built one way everywhere (export parity, targets, the runtime,
the bench): intra-op ``threads``, one inter-op thread, sequential execution, a graph
``optimization`` level, optional thread ``spinning`` and disabled graph optimizers.

The aarch64 runner (:mod:`edgestack.targets._arm_runner`) is a standalone script run by the
emulated interpreter; it receives the level as ORT's member name (:data:`LEVELS` value).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgestack.errors import TargetError

#: Graph optimization levels -> ``onnxruntime.GraphOptimizationLevel`` member names.
LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
          "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def check_level(optimization: str) -> str:
    """``optimization`` if it is a :data:`LEVELS` key, else :class:`TargetError`."""
    if optimization not in LEVELS:
        raise TargetError(f"graph optimization must be one of {', '.join(LEVELS)}, found "
                          f"{optimization!r}")
    return optimization


def disabled_optimizers(value: Any) -> list[str]:
    """The ``disabled_optimizers`` option as a list of ORT optimizer names (a list/tuple, or a
    comma-separated string; ``""``/``None``/``[]``: none)."""
    if value is None or value == "":
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    out = [str(n).strip() for n in names if str(n).strip()]
    bad = [n for n in out if not n.replace("_", "").isalnum()]
    if bad:
        raise TargetError(f"disabled_optimizers: expected ORT optimizer names such as "
                          f"SkipLayerNormFusion, found {bad}")
    return out


def session_options(threads: int, optimization: str, spinning: str = "on") -> Any:
    """ORT session options: ``threads`` intra-op threads (0: ORT's default), one inter-op
    thread, sequential, graph ``optimization`` level (a :data:`LEVELS` key), and ``spinning``
    (``on``: ORT's default, idle pool threads spin for the next parallel op; ``off``: they
    sleep, which costs a wake-up per op but no CPU that other processes need)."""
    import onnxruntime as ort

    check_level(optimization)
    if spinning not in ("on", "off"):
        raise TargetError(f"spinning must be 'on' or 'off', found {spinning!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[optimization])
    if spinning == "off":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def cpu_session(path: str | Path | bytes, threads: int = 1, optimization: str = "all",
                spinning: str = "on", disabled: Any = None, profile: str | None = None) -> Any:
    """An ONNX Runtime CPU session on ``path`` (or a serialized model) with
    :func:`session_options` and the ``disabled`` graph optimizers (see
    :func:`disabled_optimizers`); with ``profile`` (a file prefix) ORT's profiler is on
    (``session.end_profiling()`` returns the JSON file)."""
    import onnxruntime as ort

    so = session_options(threads, optimization, spinning)
    if profile is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile)
    names = disabled_optimizers(disabled)
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"],
                                **({"disabled_optimizers": names} if names else {}))
