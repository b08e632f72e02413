"""Pre-gathered lookup tables: the row lookup of a :class:`~edgestack.package.format.Table`
(``runtime.tables`` / ``gathered``, checked to lie inside the weights file when the manifest is
read), checked the same way on both sides (the packer for its golden run, the runtime for
every call)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgestack.errors import TargetError
from edgestack.package.format import Table


def lookup_table(data: np.ndarray, table: Table) -> np.ndarray:
    """``table`` as a view of ``data``, the weights file's bytes (uint8)."""
    return data[table.offset:table.offset + table.bytes].view(table.dtype).reshape(table.shape)


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
