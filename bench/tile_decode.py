"""A candidate for on-the-fly BitStack layers: decode tile by tile inside the matmul, numpy.

For MiniLM's BitStack layer shapes (24 of 384x384 at rank 1, 6 of 1536x384 and 6 of 384x1536 at
rank 2; ``factor_bits=0.125``) with random blocks, computes ``Y = X @ W^T`` for ``X`` of 128
rows, rebuilding ``W`` 128 rows at a time (signs unpacked for those rows only, ``u @ v`` per
block), so the temporaries are a few tiles instead of the function body's float32
``[nb, m*n]`` passes. Prints the time of the 36 layers per call at 1, 4 and 12 blocks.
Measured 2026-12-06 (AMD EPYC, avx512_vnni, 2 threads): 101 / 343 / 967 ms, no faster than
ONNX Runtime running the exporter's function body (docs/runtime.md: 130 ms at tier 2 and
500 ms at the top of a 6-block package); a compiled kernel is what would make it pay.

Run:  OMP_NUM_THREADS=2 .venv/bin/python bench/tile_decode.py
"""

from __future__ import annotations

import time

import numpy as np

LAYERS = ((384, 384, 1, 24), (1536, 384, 2, 6), (384, 1536, 2, 6))  # m, n, rank, count


def layer_ms(m: int, n: int, k: int, nb: int, tile: int = 128, rows: int = 128,
             repeats: int = 10, seed: int = 0) -> float:
    """Milliseconds for one tile-wise decode + matmul of an ``[m, n]`` layer at ``nb``
    blocks of rank ``k``."""
    rng = np.random.default_rng(seed)
    signs = np.packbits(rng.integers(0, 2, (nb, m * n)).astype(np.uint8), axis=1)
    u = rng.standard_normal((nb, m, k)).astype(np.float16).astype(np.float32)
    v = rng.standard_normal((nb, k, n)).astype(np.float16).astype(np.float32)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    y = np.empty((rows, m), np.float32)
    w = np.empty((tile, n), np.float32)
    mag = np.empty((tile, n), np.float32)

    def run() -> None:
        for r0 in range(0, m, tile):
            t = min(m, r0 + tile) - r0
            w[:t] = 0
            for b in range(nb):
                np.matmul(u[b, r0:r0 + t], v[b], out=mag[:t])
                bits = np.unpackbits(signs[b, r0 * n // 8:(r0 + t) * n // 8]).reshape(t, n)
                np.negative(mag[:t], out=mag[:t], where=bits == 0)
                w[:t] += mag[:t]
            np.matmul(x, w[:t].T, out=y[:, r0:r0 + t])

    run()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> int:
    for nb in (1, 4, 12):
        total = sum(count * layer_ms(m, n, k, nb) for m, n, k, count in LAYERS)
        print(f"{nb:2d} blocks: 36 MiniLM layers, tile-wise decode + matmul {total:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
