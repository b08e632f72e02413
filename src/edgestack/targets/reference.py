"""The x86 reference: the source ONNX model on ONNX Runtime CPU (functions run natively)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgestack.core.ort import cpu_session


def reference_outputs(model_path: str | Path, feeds: Mapping[str, np.ndarray],
                      threads: int = 1) -> dict[str, np.ndarray]:
    """Outputs of ``model_path`` on x86 ONNX Runtime (all optimizations), in graph order."""
    s = cpu_session(model_path, threads, "all")
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, {k: np.asarray(v) for k, v in feeds.items()}), strict=True))
