"""The packer (host side): an exported ONNX model -> a device package.

- :func:`edgestack.packer.pack.pack`: the graph, its weights, BitStack blocks in importance
  order with their tiers, the graph variants the runtime serves (:mod:`~.variants`: the mixed
  graph and the int8, nbits8 and fp32 dense graphs) and golden data, written through
  :class:`edgestack.package.PackageWriter`. A model source is compressed and exported first
  by :func:`edgestack.pipeline.pack_model` (``edgestack pack``).
- :func:`edgestack.packer.graphcheck.check_graphs`: the packaged graphs agree with the
  manifest (``edgestack verify``).
- :mod:`edgestack.packer.decoder`: a text-generation export's ``runtime.decoder`` entry (its
  I/O contract, ``max_context``, ``max_batch``, prefill chunk, tokenizer files).

Graph edits and reads use onnx-ir; ONNX Runtime computes golden outputs. Never torch or the
exporter. The device side (:mod:`edgestack.package`, :mod:`edgestack.runtime`) does not
import this layer.
"""
