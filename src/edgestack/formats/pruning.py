"""Structured-pruning maps: which slices of a layer's dimension survive.

A :class:`PruneMap` records, for one layer and one dimension (0 = output rows, 1 = input
columns), the sorted indices kept out of the original size. Pruned layers are exported as
physically smaller dense layers; the map is what lets a tool put a pruned weight back in its
original coordinates (``decode``) or prune a dense one (``apply``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgestack.errors import FormatError
from edgestack.formats.base import WeightFormat, check_array


class PruneMap(WeightFormat, name="pruning"):
    """Kept indices along one dimension of a weight.

    Args:
        keep: int64 sorted unique indices in ``[0, size)``.
        size: the original length of the dimension.
        dim: which dimension of the weight the map applies to.
        shape: the original (unpruned) weight shape; only used by :meth:`decode`.
        weight: the pruned weight (optional) that :meth:`decode` scatters back.
    """

    def __init__(
        self,
        keep: np.ndarray,
        size: int,
        dim: int = 0,
        shape: tuple[int, ...] | None = None,
        weight: np.ndarray | None = None,
    ) -> None:
        self.keep = check_array("prune keep", np.asarray(keep).astype(np.int64, copy=False),
                                np.int64, 1)
        self.size = int(size)
        self.dim = int(dim)
        if self.keep.size and (
            self.keep.min() < 0 or self.keep.max() >= self.size
            or np.any(np.diff(self.keep) <= 0)
        ):
            raise FormatError(
                f"prune map: keep must be sorted unique indices in [0, {self.size}), found "
                f"{self.keep.size} values in [{self.keep.min()}, {self.keep.max()}]"
            )
        self.shape = tuple(shape) if shape is not None else None
        self.weight = weight

    @classmethod
    def from_mask(cls, mask: np.ndarray, dim: int = 0, shape: tuple[int, ...] | None = None
                  ) -> PruneMap:
        """Build from a boolean keep-mask."""
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        return cls(np.nonzero(mask)[0].astype(np.int64), mask.size, dim, shape)

    @property
    def mask(self) -> np.ndarray:
        """Boolean keep-mask of length ``size``."""
        m = np.zeros(self.size, dtype=bool)
        m[self.keep] = True
        return m

    def apply(self, weight: np.ndarray) -> np.ndarray:
        """Return ``weight`` with only the kept slices along ``dim``."""
        if weight.shape[self.dim] != self.size:
            raise FormatError(
                f"prune map: weight dim {self.dim} must be {self.size}, found shape {weight.shape}"
            )
        return np.take(weight, self.keep, axis=self.dim)

    def decode(self) -> np.ndarray:
        """Scatter the pruned weight back into its original shape (zeros elsewhere)."""
        if self.weight is None or self.shape is None:
            raise FormatError("prune map: decode needs the pruned weight and original shape")
        full = np.zeros(self.shape, dtype=np.float32)
        idx = [slice(None)] * len(self.shape)
        idx[self.dim] = self.keep
        full[tuple(idx)] = self.weight
        return full

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"keep": self.keep}
        if self.weight is not None:
            out["weight"] = np.asarray(self.weight, dtype=np.float32)
        return out

    def attrs(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "dim": self.dim,
            "shape": list(self.shape) if self.shape is not None else None,
        }

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else self.size

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> PruneMap:
        try:
            shape = attrs.get("shape")
            return cls(arrays["keep"], attrs["size"], attrs.get("dim", 0),
                       tuple(shape) if shape else None, arrays.get("weight"))
        except KeyError as exc:
            raise FormatError(f"prune map: missing {exc.args[0]!r} in arrays/attrs") from None
