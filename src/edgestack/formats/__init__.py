"""Numpy-only codecs for compressed weights: one module per format.

Every format is a :class:`~edgestack.formats.base.WeightFormat` subclass that registers
itself under a name (``class ShiftCodes(WeightFormat, name="shift")``). A format holds the
compressed arrays, decodes them to a dense float32 weight (the numpy reference that the torch
layers and the ONNX function bodies are tested against), reports its stored size, and
serialises to a flat ``{name: ndarray}`` dict plus JSON-able attributes.

Formats:
    bitpack   MSB-first packing of bits and of fixed-width unsigned fields.
    shift     Power-of-two weights: sign + exponent codes, per-output-channel scale.
    bitstack  BitStack residual blocks: packed signs and fp16 rank-k factors per block.
    lowrank   Low-rank factors U [out, k] and V [k, in].
    pruning   Structured-pruning maps: which rows/columns of a layer are kept.
"""

from edgestack.formats.base import WeightFormat, get_format, registered_formats
from edgestack.formats.bitpack import pack_bits, pack_uint, unpack_bits, unpack_uint
from edgestack.formats.bitstack import BitStackStack
from edgestack.formats.lowrank import LowRankFactors
from edgestack.formats.pruning import PruneMap
from edgestack.formats.shift import ShiftCodes

__all__ = [
    "WeightFormat",
    "get_format",
    "registered_formats",
    "pack_bits",
    "unpack_bits",
    "pack_uint",
    "unpack_uint",
    "ShiftCodes",
    "BitStackStack",
    "LowRankFactors",
    "PruneMap",
]
