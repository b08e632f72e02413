"""Shift (power-of-two) weight codes, as in DeepShift and DenseShift.

Layout (op ``edgestack.ShiftWeight`` reads exactly this):

- The weight has shape ``[out, ...]``; it is flattened in C order to ``numel`` values.
- Each value is one ``bits``-wide code (2 <= bits <= 5), packed MSB-first into ``codes``
  (uint8, ``ceil(numel*bits/8)`` bytes; see :mod:`edgestack.formats.bitpack`).
- A code's most significant bit is the sign (1 = negative); the other ``bits-1`` bits are
  the exponent field ``e``.
- ``scale`` is float32 ``[out]``, one per output channel.
- Zero-free codes (DenseShift, ``zero=False``): ``w = (-1)^sign * 2^-e * scale[o]`` with
  ``e`` in ``[0, 2^(bits-1))``: ``2^(bits-1)`` magnitude levels.
- Codes with zero (DeepShift, ``zero=True``): the all-ones exponent field
  ``e = 2^(bits-1) - 1`` means 0 (its sign bit is 0); the other fields are decoded as above,
  giving ``2^(bits-1) - 1`` magnitude levels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgestack.errors import FormatError
from edgestack.formats.base import WeightFormat, check_array, check_finite
from edgestack.formats.bitpack import pack_uint, packed_size, unpack_uint

MIN_BITS = 2
MAX_BITS = 5


def levels(bits: int, zero: bool) -> int:
    """Number of non-zero magnitude levels of a shift code."""
    return (1 << (bits - 1)) - (1 if zero else 0)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise FormatError(
            f"shift codes: bits must be an integer in {MIN_BITS}..{MAX_BITS}, found {bits!r}; "
            f"pass e.g. --bits 4"
        )


class ShiftCodes(WeightFormat, name="shift"):
    """Packed sign+exponent codes with a per-output-channel scale.

    Args:
        codes: packed codes, uint8 ``[ceil(numel*bits/8)]``.
        scale: float32 ``[out]``.
        shape: shape of the dense weight, ``[out, ...]``.
        bits: code width, 2..5.
        zero: whether the all-ones exponent field means zero (DeepShift).
    """

    def __init__(
        self, codes: np.ndarray, scale: np.ndarray, shape: tuple[int, ...], bits: int, zero: bool
    ) -> None:
        _check_bits(bits)
        self.shape = tuple(int(d) for d in shape)
        if len(self.shape) < 1 or min(self.shape) < 1:
            raise FormatError(f"shift codes: shape must be non-empty and positive, found {shape}")
        self.bits = int(bits)
        self.zero = bool(zero)
        self.codes = check_array("shift codes", codes, np.uint8, 1)
        self.scale = check_array("shift scale", scale, np.float32, 1)
        numel = int(np.prod(self.shape))
        if self.codes.size != packed_size(numel, self.bits):
            raise FormatError(
                f"shift codes: {numel} weights of {self.bits} bits need "
                f"{packed_size(numel, self.bits)} bytes, found {self.codes.size}"
            )
        if self.scale.size != self.shape[0]:
            raise FormatError(
                f"shift scale: expected one per output channel ({self.shape[0]}), "
                f"found {self.scale.size}"
            )

    @property
    def levels(self) -> int:
        """Number of non-zero magnitude levels."""
        return levels(self.bits, self.zero)

    @classmethod
    def encode(
        cls,
        weight: np.ndarray,
        bits: int = 4,
        zero: bool = False,
        scale: np.ndarray | None = None,
    ) -> ShiftCodes:
        """Round a dense weight to the nearest shift code (nearest in the linear domain).

        Args:
            weight: float array ``[out, ...]``.
            bits: code width, 2..5.
            zero: use DeepShift codes with zero instead of zero-free DenseShift codes.
            scale: float32 ``[out]``; default: the per-channel max-abs value, so the
                largest weight of each channel maps to level ``2^0``.
        """
        _check_bits(bits)
        w = np.asarray(weight, dtype=np.float32)
        if w.ndim < 1 or w.size == 0:
            raise FormatError(f"shift codes: expected a non-empty weight, found shape {w.shape}")
        check_finite("shift codes", w)
        out = w.shape[0]
        w2 = w.reshape(out, -1)
        if scale is None:
            scale = np.abs(w2).max(axis=1)
        scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        if scale.size != out or not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise FormatError(
                f"shift scale: expected {out} finite non-negative values, found {scale.size} "
                f"values in [{scale.min() if scale.size else 'n/a'}, "
                f"{scale.max() if scale.size else 'n/a'}]"
            )
        codes = cls.quantize(w2, scale, bits, zero)
        return cls(pack_uint(codes, bits), scale, w.shape, bits, zero)

    @staticmethod
    def quantize(w2: np.ndarray, scale: np.ndarray, bits: int, zero: bool) -> np.ndarray:
        """Return unpacked codes (uint8, shape of ``w2``) for ``w2 [out, n]`` and ``scale``."""
        n_levels = levels(bits, zero)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        r = np.abs(w2) / safe[:, None]
        with np.errstate(divide="ignore"):
            e = np.floor(-np.log2(np.maximum(r, 1e-38)))
        # 2^-e >= r > 2^-(e+1): take e+1 when r is below the linear midpoint 0.75 * 2^-e.
        e = np.where(r < 0.75 * np.exp2(-e), e + 1, e)
        e = np.clip(e, 0, n_levels - 1).astype(np.int64)
        sign = (w2 < 0).astype(np.int64)
        if zero:
            smallest = 2.0 ** -(n_levels - 1)
            is_zero = (r < 0.5 * smallest) | (scale[:, None] <= 0)
            e = np.where(is_zero, n_levels, e)
            sign = np.where(is_zero, 0, sign)
        return ((sign << (bits - 1)) | e).astype(np.uint8)

    def unpacked_codes(self) -> np.ndarray:
        """Codes as uint8 ``[numel]``, one per weight."""
        return unpack_uint(self.codes, self.bits, int(np.prod(self.shape)))

    def decode(self) -> np.ndarray:
        """Dense float32 weight."""
        c = self.unpacked_codes().astype(np.int64)
        sign = c >> (self.bits - 1)
        e = c & ((1 << (self.bits - 1)) - 1)
        mag = np.exp2(-e.astype(np.float32))
        if self.zero:
            mag = np.where(e == self.levels, np.float32(0), mag)
        val = np.where(sign == 1, -mag, mag).astype(np.float32)
        out = self.shape[0]
        return (val.reshape(out, -1) * self.scale[:, None]).reshape(self.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"codes": self.codes, "scale": self.scale}

    def attrs(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "bits": self.bits, "zero": self.zero}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> ShiftCodes:
        try:
            return cls(arrays["codes"], arrays["scale"], tuple(attrs["shape"]), attrs["bits"],
                       attrs["zero"])
        except KeyError as exc:
            raise FormatError(f"shift codes: missing {exc.args[0]!r} in arrays/attrs") from None

    @staticmethod
    def theoretical_nbytes(shape: tuple[int, ...], bits: int) -> float:
        """Bytes of an ideal packing: ``numel*bits/8`` plus fp32 scales."""
        return int(np.prod(shape)) * bits / 8 + 4 * shape[0]
