"""Torch -> ONNX export that keeps compressed weights compressed.

Public API:
    export(model, inputs, out, ...) -> ExportResult    (export.py)
    export_decoder(causal_lm, out, ...) -> ExportResult: logits + KV cache, the I/O contract
        of edgestack.core.decoding in the metadata (decoder.py)
    check_parity(onnx, torch_model, inputs, ...) -> ParityReport    (parity.py)
    layer_sizes(onnx) -> SizeReport    (sizes.py)
    compact_embeddings(onnx model) / CompactEmbeddingsPass: int8 per-row embedding tables
        (passes/; export() runs it on compressed models)
    the ``edgestack`` op domain: DOMAIN, DOMAIN_VERSION, OPS, get_op, register_schemas (ops.py)

Importing this package imports onnx and onnx-ir; torch is imported when a function needs it.
"""

from edgestack.exporter.decoder import export_decoder
from edgestack.exporter.export import ExportResult, export
from edgestack.exporter.ops import (
    DOMAIN,
    DOMAIN_VERSION,
    OPS,
    EdgestackOp,
    get_op,
    register_schemas,
)
from edgestack.exporter.parity import OutputParity, ParityReport, check_parity
from edgestack.exporter.sizes import LayerSize, SizeReport, layer_sizes

__all__ = [
    "export",
    "export_decoder",
    "ExportResult",
    "check_parity",
    "ParityReport",
    "OutputParity",
    "layer_sizes",
    "SizeReport",
    "LayerSize",
    "DOMAIN",
    "DOMAIN_VERSION",
    "OPS",
    "EdgestackOp",
    "get_op",
    "register_schemas",
]
