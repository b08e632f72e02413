"""Shared builders for the exporter tests: random containers and compressed zoo models."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from edgestack.formats import BitStackStack, ShiftCodes, pack_bits

# Options that keep the passes fast on 2 cores (no calibration, small blocks).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "shift": {"bits": 4, "scale": "maxabs"},
    "bitstack": {"n_blocks": 2, "k": 2},
    "lowrank": {"ratio": 0.5},
    "prune": {"ratio": 0.25},
}


def random_shift(rng: np.random.Generator, shape: tuple[int, ...], bits: int,
                 zero: bool) -> ShiftCodes:
    """Shift codes with uniformly random bytes (every code value occurs) and scales."""
    numel = int(np.prod(shape))
    codes = rng.integers(0, 256, (numel * bits + 7) // 8, dtype=np.uint8)
    scale = (rng.random(shape[0]) * 2 + 0.05).astype(np.float32)
    return ShiftCodes(codes, scale, shape, bits, zero)


def random_stack(rng: np.random.Generator, shape: tuple[int, ...], n_blocks: int,
                 k: int) -> BitStackStack:
    """A BitStack stack with random signs and fp16 factors."""
    m, n = shape[0], int(np.prod(shape[1:]))
    signs = np.stack([pack_bits(rng.integers(0, 2, m * n)) for _ in range(n_blocks)])
    u = rng.standard_normal((n_blocks, m, k)).astype(np.float16)
    v = rng.standard_normal((n_blocks, k, n)).astype(np.float16)
    return BitStackStack(signs, u, v, shape)


def compressed(factory: Any, method: str, **options: Any) -> tuple[Any, dict[str, Any], Any]:
    """``(model, inputs, report)``: a zoo model compressed in place with ``method``."""
    from edgestack.compress import compress

    model, inputs = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress(model, method, **{**METHOD_OPTIONS[method], **options})
    return model, inputs, report
