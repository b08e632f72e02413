"""Pre-gathered lookup tables: the packer-runtime contract for the tables that
``metadata.runtime.tables`` / ``gathered`` describe (offset, bytes, dtype, shape inside the
weights file), and the checked row lookup both sides use (the packer for its golden run, the
runtime for every call)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgestack.errors import PackageError, TargetError

_FIX_REPACK = "copy the package again or repack the model"


def table_spec(spec: Any, file_size: int,
               what: str) -> tuple[int, int, np.dtype, tuple[int, ...]]:
    """``(offset, bytes, dtype, shape)`` of a table entry of ``metadata.runtime.tables`` or
    ``gathered`` (written by the packer), checked to describe bytes inside a weights file of
    ``file_size`` bytes.

    Raises:
        PackageError: a missing or malformed field, or bytes outside the file.
    """
    try:
        off, size = int(spec["offset"]), int(spec["bytes"])
        dtype, shape = np.dtype(str(spec["dtype"])), tuple(int(d) for d in spec["shape"])
        ok = (dtype.kind in "biuf" and len(shape) >= 1 and off >= 0 and off + size <= file_size
              and size == int(np.prod(shape)) * dtype.itemsize)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise PackageError(f"{what}: {str(spec)[:200]} does not describe a table inside the "
                           f"{file_size}-byte weights file; {_FIX_REPACK}")
    return off, size, dtype, shape


def lookup_table(data: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """The table ``spec`` (see :func:`table_spec`) as a view of ``data``, the weights file's
    bytes (uint8)."""
    off, size, dtype, shape = table_spec(spec, data.size, "table")
    return data[off:off + size].view(dtype).reshape(shape)


def check_ids(ids: Any, rows: int, what: str) -> np.ndarray:
    """``ids`` as an integer array with every value in ``[0, rows)``, else TargetError."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TargetError(f"infer: {what}: expected integer ids, found dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        raise TargetError(f"infer: {what}: ids must be in [0, {rows}), found "
                          f"{int(ids.min())}..{int(ids.max())}; check the tokenizer matches "
                          "the model")
    return ids


def gather_rows(table: np.ndarray, ids: Any, what: str) -> np.ndarray:
    """``table[ids]`` after :func:`check_ids` (the packer's golden run)."""
    return table[check_ids(ids, table.shape[0], what)]
