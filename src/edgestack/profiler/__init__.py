"""Measuring and looking inside: latency, memory and quality (the demo and ``edgestack
bench``), per-layer sensitivity to a compression method (``edgestack sensitivity``:
:mod:`~edgestack.profiler.sensitivity`) the layer-by-layer diff of two models
(``edgestack diff``: :mod:`~edgestack.profiler.diff`) and what is inside an ONNX file or a
package (``edgestack inspect``: :mod:`~edgestack.profiler.inspect`)."""
