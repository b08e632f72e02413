"""What a compression pass did: :class:`CompressReport`.

Every pass returns one report listing each layer it replaced (:class:`LayerReport`: original
shape, fp32 bytes before, stored bytes after, method details) and each layer it left dense
with the reason (:class:`SkippedLayer`). ``to_dict()`` is what the CLI prints with ``--json``
and what the exporter stores in the ONNX metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _jsonable(value: Any) -> Any:
    """Convert tuples, numpy/torch scalars and nested containers to plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        return _jsonable(value.item())
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return str(value)


@dataclass
class LayerReport:
    """One layer replaced by a pass.

    Attributes:
        name: qualified module name.
        kind: ``"linear"`` (also GPT-2 Conv1D), ``"conv1d"`` or ``"conv2d"``.
        shape: original dense weight shape, ``[out, in, *kernel]``.
        dense_bytes: fp32 bytes of the original weight.
        compressed_bytes: stored bytes of the new weight representation (bias excluded).
        details: method-specific facts (bits, rank, per-block errors, kept channels...).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dense_bytes: int
    compressed_bytes: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Number of weights of the original layer."""
        return self.dense_bytes // 4

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per original weight."""
        return 8.0 * self.compressed_bytes / max(1, self.numel)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "dense_bytes": int(self.dense_bytes),
            "compressed_bytes": int(self.compressed_bytes),
            "bits_per_weight": round(self.bits_per_weight, 4),
            "details": _jsonable(self.details),
        }


@dataclass
class SkippedLayer:
    """A layer left dense, and why."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON-serialisable form."""
        return {"name": self.name, "reason": self.reason}


@dataclass
class CompressReport:
    """The result of :func:`edgestack.compress.compress`.

    Attributes:
        method: the method name.
        options: the resolved options (defaults filled in).
        layers: the layers replaced, in model order.
        skipped: the layers left dense, with reasons.
        warnings: notes for the user (also raised as Python warnings).
        details: pass-wide facts (e.g. the shift fine-tune's steps and losses).
        importance_order: BitStack only: the global block order ``[(layer name, block), ...]``
            (see :func:`edgestack.compress.bitstack.importance_order`); a runtime tier is a
            prefix of it. Empty for other methods.
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    importance_order: list[tuple[str, int]] = field(default_factory=list)

    @property
    def dense_bytes(self) -> int:
        """fp32 bytes of the compressed layers' original weights."""
        return int(sum(layer.dense_bytes for layer in self.layers))

    @property
    def compressed_bytes(self) -> int:
        """Stored bytes of the compressed layers' new weights (biases excluded)."""
        return int(sum(layer.compressed_bytes for layer in self.layers))

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per original weight over the compressed layers (32.0 if none)."""
        numel = sum(layer.numel for layer in self.layers)
        if numel == 0:
            return 32.0
        return 8.0 * self.compressed_bytes / numel

    @property
    def ratio(self) -> float:
        """Dense bytes over compressed bytes of the compressed layers (1.0 if none)."""
        if not self.layers or self.compressed_bytes == 0:
            return 1.0
        return self.dense_bytes / self.compressed_bytes

    def layer(self, name: str) -> LayerReport:
        """The report of the layer named ``name``.

        Raises:
            KeyError: no compressed layer has that name.
        """
        for rep in self.layers:
            if rep.name == name:
                return rep
        raise KeyError(f"no compressed layer named {name!r} in this report")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what ``--json`` prints)."""
        return {
            "method": self.method,
            "options": _jsonable(self.options),
            "dense_bytes": self.dense_bytes,
            "compressed_bytes": self.compressed_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": [s.to_dict() for s in self.skipped],
            "warnings": list(self.warnings),
            **({"details": _jsonable(self.details)} if self.details else {}),
            **({"importance_order": [[n, int(b)] for n, b in self.importance_order]}
               if self.importance_order else {}),
        }

    def summary(self, max_skipped: int = 5) -> str:
        """A short multi-line human-readable summary."""
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        lines = [f"compress {self.method}" + (f" ({opts})" if opts else "") + ":"]
        if self.layers:
            lines.append(
                f"  {len(self.layers)} layer(s) compressed: {self.dense_bytes / 1e6:.3f} MB fp32 "
                f"-> {self.compressed_bytes / 1e6:.3f} MB ({self.bits_per_weight:.2f} bits/weight, "
                f"{self.ratio:.1f}x smaller)"
            )
        else:
            lines.append("  no layer compressed")
        if self.skipped:
            shown = ", ".join(f"{s.name} ({s.reason})" for s in self.skipped[:max_skipped])
            more = len(self.skipped) - max_skipped
            lines.append(f"  {len(self.skipped)} left dense: {shown}"
                         + (f", and {more} more" if more > 0 else ""))
        for note in self.warnings:
            lines.append(f"  warning: {note}")
        return "\n".join(lines)


__all__ = ["CompressReport", "LayerReport", "SkippedLayer"]
