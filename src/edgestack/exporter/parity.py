"""Parity of an exported ONNX model against its torch model: ONNX Runtime vs torch.

Both run on the same inputs; each output is compared element-wise with ``a`` = ONNX Runtime
and ``ref`` = torch:

- ``max_abs = max |a - ref|``
- ``max_rel = max |a - ref| / max |ref|``: the largest error relative to the output's largest
  magnitude (not element-wise, which blows up near zeros); 0 when both are all zero, inf when
  only ``ref`` is;
- ``cosine`` of the two flattened outputs (1.0 when both are all zero).

An output passes when ``max_abs <= atol`` **or** ``max_rel <= rtol`` (and shapes match); the
report passes when every output does. A failed check is a report, not an exception: the
caller (the CLI) decides what it means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgestack.core.compare import Agreement, agree
from edgestack.errors import ExportError
from edgestack.exporter.signature import flatten_outputs, normalize_inputs

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4


@dataclass(frozen=True)
class OutputParity(Agreement):
    """Comparison of one output (:class:`edgestack.core.compare.Agreement`: ``shape`` is the
    ONNX Runtime output's, ``ref_shape`` the torch output's; ``passed`` is
    ``shape == ref_shape and (max_abs <= atol or max_rel <= rtol)``), with its ONNX output
    ``name``."""

    name: str = ""


@dataclass
class ParityReport:
    """Per-output parity of ONNX Runtime (CPU EP) against torch.

    Attributes:
        outputs: one :class:`OutputParity` per output, in graph order.
        atol, rtol: the tolerances used.
        provider: the ONNX Runtime execution provider.
    """

    outputs: list[OutputParity]
    atol: float
    rtol: float
    provider: str = "CPUExecutionProvider"
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every output passed (and there is at least one)."""
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def max_abs(self) -> float:
        """Largest ``max_abs`` over the outputs."""
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        """Largest ``max_rel`` over the outputs."""
        return max((o.max_rel for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (inf/NaN become strings)."""
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, tuple):
                return list(v)
            return v

        return {
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
            "rule": "max_abs <= atol or max_rel <= rtol; max_rel = max|a-ref| / max|ref|",
            "provider": self.provider,
            "outputs": [{k: clean(v) for k, v in asdict(o).items()} for o in self.outputs],
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """A plain-text table, one row per output."""
        rows = [("output", "shape", "max_abs", "max_rel", "cosine", "ok")]
        for o in self.outputs:
            rows.append((o.name, "x".join(map(str, o.shape)) or "scalar", f"{o.max_abs:.3g}",
                         f"{o.max_rel:.3g}", f"{o.cosine:.6f}", "yes" if o.passed else "NO"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        verdict = "passed" if self.passed else "FAILED"
        lines.append(f"parity {verdict} (atol={self.atol:g}, rtol={self.rtol:g}, "
                     f"{self.provider})")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def compare(name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float
            ) -> OutputParity:
    """Compare one output (``got`` from ONNX, ``ref`` from torch) by
    :func:`edgestack.core.compare.agree`."""
    r = agree(got, ref, atol, rtol)
    return OutputParity(**vars(r), name=name)


def ort_session(model: str | Path | onnx.ModelProto | Any) -> Any:
    """An ONNX Runtime CPU session for a path, ``ModelProto`` or onnx-ir ``Model``.

    Raises:
        ExportError: ONNX Runtime cannot load the model.
    """
    import onnxruntime as ort

    if not isinstance(model, (str, Path, onnx.ModelProto)):
        import onnx_ir as ir

        model = ir.serde.serialize_model(model)
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        head = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"ONNX Runtime cannot load the exported model: {head}; expected a model that "
            "onnx.checker accepts to load; report this with the model if the checker passed"
        ) from exc


def check_parity(
    onnx_model: str | Path | onnx.ModelProto | Any,
    torch_model: Any,
    inputs: Any,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    *,
    reference: Sequence[Any] | None = None,
) -> ParityReport:
    """Run ONNX Runtime (CPU EP) and torch on the same inputs and compare every output.

    Args:
        onnx_model: path of an ONNX file (external data next to it), a ``ModelProto`` or an
            onnx-ir ``Model``.
        torch_model: the torch model that was exported (already compressed).
        inputs: dict of keyword tensors or tuple of positional tensors, as given to export.
        atol: absolute tolerance on ``max_abs``.
        rtol: tolerance on ``max_rel = max|a-ref| / max|ref|``.
        reference: torch outputs already computed (flattened, in graph output order); when
            None, ``torch_model`` is run under ``torch.no_grad()``.

    Returns:
        The report; ``report.passed`` is False when an output is out of tolerance.

    Raises:
        ExportError: ONNX Runtime cannot load or run the model, an ONNX input has no matching
            torch input, or the output counts differ.
    """
    import torch

    norm = normalize_inputs(torch_model, inputs)
    sess = ort_session(onnx_model)
    feeds_all = norm.numpy()
    feeds = {}
    positional = list(feeds_all.values())
    for i, meta in enumerate(sess.get_inputs()):
        if meta.name in feeds_all:
            feeds[meta.name] = feeds_all[meta.name]
        elif not norm.kwargs and i < len(positional):
            feeds[meta.name] = positional[i]
        else:
            raise ExportError(
                f"parity: ONNX input {meta.name!r} has no matching torch input; given "
                f"{', '.join(feeds_all) or 'none'}; pass inputs named like the graph inputs"
            )
    try:
        got = sess.run(None, feeds)
    except Exception as exc:
        raise ExportError(
            f"ONNX Runtime failed to run the exported model: {str(exc).strip()[:500]}"
        ) from exc
    if reference is None:
        with torch.no_grad():
            out = torch_model(*norm.args, **norm.kwargs)
        reference = [t for _, t in flatten_outputs(out)]
    names = [o.name for o in sess.get_outputs()]
    if len(reference) != len(got):
        raise ExportError(
            f"parity: the ONNX model has {len(got)} outputs ({', '.join(names)}), the torch "
            f"model {len(reference)}; expected the same flattened outputs"
        )
    rows = [
        compare(name, g, r.detach().cpu().numpy() if hasattr(r, "detach") else np.asarray(r),
                atol, rtol)
        for name, g, r in zip(names, got, reference, strict=True)
    ]
    return ParityReport(rows, atol, rtol)


__all__ = ["OutputParity", "ParityReport", "check_parity", "compare", "ort_session",
           "DEFAULT_ATOL", "DEFAULT_RTOL"]
