"""BitStack residual blocks.

A weight ``W`` of shape ``[m, ...]`` is viewed as a matrix ``[m, n]`` (``n`` = product of
the other dimensions) and approximated by a stack of blocks::

    W ~= sum_{i < n_blocks} S_i * (u_i @ v_i)

where ``S_i`` is a ``{-1, +1}`` sign matrix and ``u_i @ v_i`` a rank-``k`` approximation of
the residual's absolute value. Layout (op ``edgestack.BitStackWeight`` reads exactly this):

- ``signs``: uint8 ``[n_blocks, ceil(m*n/8)]``, each row the C-order ``[m, n]`` sign
  matrix packed MSB-first, bit 1 = +1, bit 0 = -1.
- ``u``: float16 ``[n_blocks, m, k]``; ``v``: float16 ``[n_blocks, k, n]``.
- Blocks are stored in the order they were fitted: a prefix of ``b`` blocks is the
  ``b``-block approximation. ``k`` is not stored: it is read from the shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgestack.errors import FormatError
from edgestack.formats.base import WeightFormat, check_array
from edgestack.formats.bitpack import packed_size, unpack_bits

META_BITSTACK_ORDER = "edgestack.bitstack_order"
"""ONNX model metadata key: JSON list of ``[layer, block]``, the BitStack importance order
(torch layer names, as in the nodes' :data:`NODE_LAYER_KEY` tag). The exporter writes it; the
packer stores blocks in this order."""

NODE_LAYER_KEY = "edgestack.layer"
"""ONNX node metadata key: the torch layer an ``edgestack`` node decodes the weight of."""


class BitStackStack(WeightFormat, name="bitstack"):
    """A stack of BitStack residual blocks for one weight.

    Args:
        signs: uint8 ``[n_blocks, ceil(m*n/8)]``.
        u: float16 ``[n_blocks, m, k]``.
        v: float16 ``[n_blocks, k, n]``.
        shape: dense weight shape ``[m, ...]`` with ``prod(shape[1:]) == n``.
    """

    def __init__(
        self, signs: np.ndarray, u: np.ndarray, v: np.ndarray, shape: tuple[int, ...]
    ) -> None:
        self.signs = check_array("bitstack signs", signs, np.uint8, 2)
        self.u = check_array("bitstack u", u, np.float16, 3)
        self.v = check_array("bitstack v", v, np.float16, 3)
        self.shape = tuple(int(d) for d in shape)
        if len(self.shape) < 2:
            raise FormatError(f"bitstack: expected a weight of >= 2 dims, found shape {shape}")
        m, n = self.shape[0], int(np.prod(self.shape[1:]))
        nb = self.signs.shape[0]
        if nb < 1:
            raise FormatError("bitstack: expected at least one block, found 0")
        k = self.u.shape[2]
        expected = {
            "signs": (nb, packed_size(m * n)),
            "u": (nb, m, k),
            "v": (nb, k, n),
        }
        found = {"signs": self.signs.shape, "u": self.u.shape, "v": self.v.shape}
        for key, exp in expected.items():
            if tuple(found[key]) != exp:
                raise FormatError(
                    f"bitstack {key}: expected shape {exp} for weight {self.shape} with "
                    f"{nb} blocks of rank {k}, found {tuple(found[key])}"
                )

    @property
    def n_blocks(self) -> int:
        """Number of stored blocks."""
        return int(self.signs.shape[0])

    @property
    def rank(self) -> int:
        """Rank ``k`` of each block's magnitude factors."""
        return int(self.u.shape[2])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)``: the weight viewed as a matrix."""
        return self.shape[0], int(np.prod(self.shape[1:]))

    def sign_matrix(self, block: int) -> np.ndarray:
        """Block ``block``'s sign matrix as float32 ``{-1, +1}`` ``[m, n]``."""
        m, n = self.matrix_shape
        bits = unpack_bits(self.signs[block], m * n).reshape(m, n)
        return bits.astype(np.float32) * 2 - 1

    def block(self, i: int) -> np.ndarray:
        """Block ``i`` as a dense float32 ``[m, n]`` matrix."""
        mag = self.u[i].astype(np.float32) @ self.v[i].astype(np.float32)
        return self.sign_matrix(i) * mag

    def decode(self, n_blocks: int | None = None) -> np.ndarray:
        """Dense float32 weight from the first ``n_blocks`` blocks (default: all)."""
        nb = self.n_blocks if n_blocks is None else int(n_blocks)
        if not 0 <= nb <= self.n_blocks:
            raise FormatError(
                f"bitstack: asked for {nb} blocks, the stack holds 0..{self.n_blocks}"
            )
        blocks = ((self.signs[i], self.u[i], self.v[i]) for i in range(nb))
        return decode_blocks(self.shape, blocks)

    def prefix(self, n_blocks: int) -> BitStackStack:
        """The stack of the first ``n_blocks`` blocks (views, no copy)."""
        if not 1 <= n_blocks <= self.n_blocks:
            raise FormatError(
                f"bitstack: a prefix needs 1..{self.n_blocks} blocks, found {n_blocks}"
            )
        return BitStackStack(
            self.signs[:n_blocks], self.u[:n_blocks], self.v[:n_blocks], self.shape
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {"signs": self.signs, "u": self.u, "v": self.v}

    def attrs(self) -> dict[str, Any]:
        return {"shape": list(self.shape)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> BitStackStack:
        try:
            return cls(arrays["signs"], arrays["u"], arrays["v"], tuple(attrs["shape"]))
        except KeyError as exc:
            raise FormatError(f"bitstack: missing {exc.args[0]!r} in arrays/attrs") from None

    @staticmethod
    def bytes_per_block(m: int, n: int, k: int) -> int:
        """Stored bytes of one block of an ``[m, n]`` weight with rank ``k``."""
        return packed_size(m * n) + 2 * k * (m + n)

    @staticmethod
    def theoretical_bits_per_weight(m: int, n: int, k: int, n_blocks: int) -> float:
        """``n_blocks * (1 + 16k(m+n)/(mn))`` bits per weight."""
        return n_blocks * (1 + 16 * k * (m + n) / (m * n))


def decode_blocks(shape: tuple[int, ...], blocks: Any, transposed: bool = False,
                  flat: bool = False) -> np.ndarray:
    """The dense float32 weight of shape ``shape`` from its blocks ``(signs, u, v)`` (in block
    order, one at a time: two ``[m, n]`` float32 temporaries, whatever the block count);
    ``flat``: as the ``[m, n]`` matrix; ``transposed``: its ``[n, m]`` transpose,
    C-contiguous. The one BitStack decoder: :meth:`BitStackStack.decode` and the on-device
    runtime's materialised tiers use it."""
    m, n = shape[0], int(np.prod(shape[1:]))
    out_shape = (n, m) if transposed else (m, n)
    out = np.zeros(out_shape, dtype=np.float32)
    mag = np.empty(out_shape, dtype=np.float32)
    for signs, u16, v16 in blocks:
        u, v = u16.astype(np.float32), v16.astype(np.float32)
        bits = unpack_bits(signs, m * n).reshape(m, n)
        if transposed:
            np.matmul(v.T, u.T, out=mag)
            bits = bits.T
        else:
            np.matmul(u, v, out=mag)
        np.negative(mag, out=mag, where=bits == 0)
        out += mag
    return out if transposed or flat else out.reshape(shape)
