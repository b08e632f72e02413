"""Graph passes the exporter runs on the exported model (one pass per module).

Each pass is an onnx-ir :class:`~onnx_ir.passes.InPlacePass` whose docstring lists its
rewrites and whose :attr:`report` says what it did (as in :mod:`edgestack.targets.passes`,
which lowers for a target; these passes are target-independent and their output is the
exported file).

:func:`compact_embeddings` runs :class:`CompactEmbeddingsPass` on a model of any form (an
onnx-ir model, an ``onnx.ModelProto``) and returns the same form: the packer calls it on an
ONNX file exported without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import onnx
import onnx_ir as ir

from edgestack.exporter.passes.compact_embeddings import (
    BITS,
    DEFAULT_MIN_BYTES,
    META_COMPACT_EMBEDDINGS,
    CompactEmbeddingsPass,
    dequantize_rows,
    quantize_rows,
)
from edgestack.exporter.passes.retie import RetiePass, tensor_relation

logger = logging.getLogger("edgestack.exporter")

M = TypeVar("M", ir.Model, onnx.ModelProto)


def describe(report: dict[str, Any]) -> list[str]:
    """Log lines for a :class:`CompactEmbeddingsPass` report: one per table and skip."""
    lines = [f"compact embeddings: {t['name']} [{t['rows']}x{t['cols']}] -> int8 per row "
             f"({t['bytes_before'] / 2**20:.2f} -> {t['bytes_after'] / 2**20:.2f} MiB)"
             for t in report.get("tables", [])]
    lines += [f"compact embeddings: {name} left float: {why}"
              for name, why in report.get("skipped", {}).items()]
    return lines


def compact_embeddings(model: M, *, min_bytes: int = DEFAULT_MIN_BYTES,
                       log: Callable[[str], None] | None = None) -> M:
    """Quantize the large Gather-only embedding tables of ``model`` to int8 per row.

    Args:
        model: an onnx-ir ``Model`` (changed in place) or an ``onnx.ModelProto`` (a new proto
            is returned; initializers must be loaded, as ``onnx.load`` does by default).
        min_bytes: smallest table to quantize (default 256 KiB).
        log: callback for one line per table quantized or left alone (default: the
            ``edgestack.exporter`` logger).

    Returns:
        The model in the form given. Running it again changes nothing: the tables are int8.
    """
    say = log or logger.info
    p = CompactEmbeddingsPass(min_bytes)
    if isinstance(model, onnx.ModelProto):
        model_ir = ir.serde.deserialize_model(model)
        p(model_ir)
        for line in describe(p.report):
            say(line)
        return ir.serde.serialize_model(model_ir) if p.report["tables"] else model
    p(model)
    for line in describe(p.report):
        say(line)
    return model


__all__ = ["CompactEmbeddingsPass", "RetiePass", "tensor_relation", "compact_embeddings",
           "describe", "quantize_rows", "dequantize_rows", "META_COMPACT_EMBEDDINGS",
           "DEFAULT_MIN_BYTES", "BITS"]
