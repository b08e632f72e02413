"""MSB-first bit packing.

``pack_bits`` packs a sequence of 0/1 values into bytes, the first value in the most
significant bit of the first byte; the last byte is zero-padded. ``pack_uint`` packs
fixed-width unsigned fields (``bits`` wide, MSB first) the same way: field ``i`` occupies bits
``[i*bits, (i+1)*bits)`` of the stream. The ONNX function bodies unpack the same layout.
"""

from __future__ import annotations

import numpy as np

from edgestack.errors import FormatError


def packed_size(count: int, bits: int = 1) -> int:
    """Bytes needed for ``count`` fields of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack 0/1 (or bool) values, in C order, into a flat uint8 array, MSB first."""
    flat = np.asarray(bits).reshape(-1)
    if flat.size and flat.dtype != np.bool_ and ((flat != 0) & (flat != 1)).any():
        raise FormatError("pack_bits: expected only 0/1 values, found others")
    return np.packbits(flat.astype(np.uint8), bitorder="big")


def unpack_bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Unpack ``count`` bits (uint8 0/1) from a flat uint8 array, MSB first."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise FormatError(f"unpack_bits: expected uint8 bytes, found {packed.dtype}")
    need = packed_size(count)
    if packed.size < need:
        raise FormatError(
            f"unpack_bits: {count} bits need {need} bytes, found {packed.size}"
        )
    return np.unpackbits(packed.reshape(-1)[:need], count=count, bitorder="big")


def pack_uint(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2**bits as ``bits``-wide MSB-first fields."""
    if not 1 <= bits <= 8:
        raise FormatError(f"pack_uint: bits must be in 1..8, found {bits}")
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise FormatError(
            f"pack_uint: values must be in [0, {1 << bits}), found [{flat.min()}, {flat.max()}]"
        )
    planes = np.unpackbits(flat.astype(np.uint8)[:, None], axis=1, bitorder="big")
    return np.packbits(planes[:, 8 - bits:].reshape(-1), bitorder="big")


def unpack_uint(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unpack ``count`` ``bits``-wide MSB-first fields into a uint8 array."""
    if not 1 <= bits <= 8:
        raise FormatError(f"unpack_uint: bits must be in 1..8, found {bits}")
    planes = unpack_bits(packed, count * bits).reshape(count, bits).astype(np.uint16)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint16)
    return (planes @ weights).astype(np.uint8)
