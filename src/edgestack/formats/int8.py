"""Symmetric int8 codes of a float32 matrix in the layouts ONNX Runtime's integer kernels
read: per output channel for ``DynamicQuantizeMatMul`` (:func:`quantize_int8`) and blockwise
8-bit for ``com.microsoft.MatMulNBits`` (:func:`quantize_nbits8`). The runtime materialises a
tier's BitStack weights with them (:mod:`edgestack.runtime.runtime`)."""

from __future__ import annotations

import numpy as np

NBITS_BLOCK = 32
"""Weights per scale of the ``nbits8`` form (``MatMulNBits`` ``block_size``, as the weight-only
baselines)."""

QUANT_CHUNK_ROWS = 256
"""Rows quantized at a time by :func:`quantize_int8` (bounds its float temporaries)."""


def quantize_int8(wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 of a ``[K, N]`` float32 matrix (the ``B`` of
    ``DynamicQuantizeMatMul``, i.e. ``W^T``): ``(q int8 [K, N], scale float32 [N])`` with
    ``wt ~= q * scale``; a zero column gets scale 1."""
    scale = np.maximum(wt.max(axis=0), -wt.min(axis=0)).astype(np.float32) / np.float32(127)
    scale[scale == 0] = 1.0
    inv = (np.float32(1) / scale).astype(np.float32)
    q = np.empty(wt.shape, np.int8)
    for r in range(0, wt.shape[0], QUANT_CHUNK_ROWS):
        part = wt[r:r + QUANT_CHUNK_ROWS] * inv
        np.rint(part, out=part)
        np.clip(part, -127, 127, out=part)
        q[r:r + QUANT_CHUNK_ROWS] = part
    return q, scale


def quantize_nbits8(w: np.ndarray, block: int = NBITS_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit blockwise quantization of an ``[N, K]`` float32 matrix (a layer's
    ``[m, n]`` weight) in ``com.microsoft.MatMulNBits`` layout: ``(codes uint8 [N, K/block,
    block], scales float32 [N, K/block])`` with ``w ~= (codes - 128) * scale`` (the default
    zero point of 8 bits); ``K`` is zero-padded to a multiple of ``block``; an all-zero block
    gets scale 1."""
    n_rows, k = w.shape
    kb = -(-k // block)
    codes = np.empty((n_rows, kb, block), np.uint8)
    scales = np.empty((n_rows, kb), np.float32)
    step = QUANT_CHUNK_ROWS
    for r in range(0, n_rows, step):
        part = np.zeros((min(step, n_rows - r), kb * block), np.float32)
        part[:, :k] = w[r:r + step]
        part = part.reshape(-1, kb, block)
        sc = np.abs(part).max(axis=2) / np.float32(127)
        sc[sc == 0] = 1.0
        part /= sc[:, :, None]
        np.rint(part, out=part)
        np.clip(part, -127, 127, out=part)
        part += 128
        codes[r:r + step] = part
        scales[r:r + step] = sc
    return codes, scales


__all__ = ["NBITS_BLOCK", "QUANT_CHUNK_ROWS", "quantize_int8", "quantize_nbits8"]
