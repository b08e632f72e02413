"""Random compressed-weight containers shared by the format, exporter and target tests."""

from __future__ import annotations

import numpy as np

from edgestack.formats import BitStackStack, ShiftCodes, pack_bits


def random_shift(rng: np.random.Generator, shape: tuple[int, ...], bits: int,
                 zero: bool) -> ShiftCodes:
    """Shift codes with uniformly random bytes (every code value occurs) and scales."""
    numel = int(np.prod(shape))
    codes = rng.integers(0, 256, (numel * bits + 7) // 8, dtype=np.uint8)
    scale = (rng.random(shape[0]) * 2 + 0.05).astype(np.float32)
    return ShiftCodes(codes, scale, shape, bits, zero)


def random_stack(rng: np.random.Generator, shape: tuple[int, ...], n_blocks: int,
                 k: int, factor_scale: float = 1.0) -> BitStackStack:
    """A BitStack stack with random signs and fp16 factors (times ``factor_scale``)."""
    m, n = shape[0], int(np.prod(shape[1:]))
    signs = np.stack([pack_bits(rng.integers(0, 2, m * n)) for _ in range(n_blocks)])
    u = (rng.standard_normal((n_blocks, m, k)) * factor_scale).astype(np.float16)
    v = (rng.standard_normal((n_blocks, k, n)) * factor_scale).astype(np.float16)
    return BitStackStack(signs, u, v, shape)
