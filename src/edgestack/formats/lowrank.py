"""Low-rank factors: ``W ~= U @ V`` with ``U [out, k]`` and ``V [k, in]``.

Exported as a standard MatMul chain (``x @ V^T @ U^T``); no custom op. A weight of more than
two dimensions (a convolution ``[out, in, *kernel]``) is viewed as ``[out, in*prod(kernel)]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgestack.errors import FormatError
from edgestack.formats.base import WeightFormat, check_array, check_finite


class LowRankFactors(WeightFormat, name="lowrank"):
    """Rank-``k`` factors of one weight.

    Args:
        u: ``[out, k]``; v: ``[k, n]``, float32 or float16.
        shape: dense weight shape ``[out, ...]`` with ``prod(shape[1:]) == n``.
    """

    def __init__(self, u: np.ndarray, v: np.ndarray, shape: tuple[int, ...]) -> None:
        for name, arr in (("u", u), ("v", v)):
            if not isinstance(arr, np.ndarray) or arr.dtype not in (np.float32, np.float16):
                raise FormatError(
                    f"lowrank {name}: expected a float32 or float16 array, found "
                    f"{getattr(arr, 'dtype', type(arr).__name__)}"
                )
        self.u = check_array("lowrank u", u, u.dtype, 2)
        self.v = check_array("lowrank v", v, v.dtype, 2)
        self.shape = tuple(int(d) for d in shape)
        m, n = self.shape[0], int(np.prod(self.shape[1:]))
        if self.u.shape[0] != m or self.v.shape[1] != n or self.u.shape[1] != self.v.shape[0]:
            raise FormatError(
                f"lowrank: expected u [{m}, k] and v [k, {n}] for weight {self.shape}, "
                f"found u {self.u.shape} and v {self.v.shape}"
            )

    @property
    def rank(self) -> int:
        """The rank ``k``."""
        return int(self.u.shape[1])

    @classmethod
    def encode(cls, weight: np.ndarray, rank: int) -> LowRankFactors:
        """Truncated SVD of ``weight`` viewed as a matrix; singular values split evenly."""
        w = np.asarray(weight, dtype=np.float32)
        check_finite("lowrank", w)
        m = w.shape[0]
        w2 = w.reshape(m, -1)
        max_rank = min(w2.shape)
        if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= max_rank:
            raise FormatError(
                f"lowrank: rank must be an integer in 1..{max_rank} for weight {w.shape}, "
                f"found {rank!r}"
            )
        uu, s, vt = np.linalg.svd(w2.astype(np.float64), full_matrices=False)
        root = np.sqrt(s[:rank])
        u = (uu[:, :rank] * root[None, :]).astype(np.float32)
        v = (root[:, None] * vt[:rank]).astype(np.float32)
        return cls(u, v, w.shape)

    def decode(self) -> np.ndarray:
        return (self.u.astype(np.float32) @ self.v.astype(np.float32)).reshape(self.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"u": self.u, "v": self.v}

    def attrs(self) -> dict[str, Any]:
        return {"shape": list(self.shape)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> LowRankFactors:
        try:
            return cls(arrays["u"], arrays["v"], tuple(attrs["shape"]))
        except KeyError as exc:
            raise FormatError(f"lowrank: missing {exc.args[0]!r} in arrays/attrs") from None
