"""Issue 11's compiled tile-decode candidate, measured and dropped: a numba kernel that decodes
a BitStack layer 128 rows at a time inside the matmul (no full weight ever exists).

Measures, in a process that has imported the runtime and onnxruntime: the peak RSS that
``import numba`` adds, the peak after compiling the kernel, and one MiniLM FFN layer
``[1536 x 384]`` at 12 blocks of rank 2, seq 128 (decode tiles + BLAS matmul), 2 threads.
numba is not an edgestack dependency: install it first.

Run:  .venv/bin/pip install numba && NUMBA_NUM_THREADS=2 .venv/bin/python bench/numba_decode.py
"""
import json
import sys
import time

import numpy as np
import onnxruntime  # noqa: F401

import edgestack.runtime  # noqa: F401 - the baseline: a process serving packages


def hwm() -> int:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmHWM")).split()[1]) * 1024


base = hwm()
try:
    from numba import njit, prange
except ImportError:
    sys.exit("numba is not installed: .venv/bin/pip install numba")
imp = hwm() - base
@njit(parallel=True, cache=False)
def decode_rows(signs, u, v, r0, r1, n, out):
    # out[r - r0, :] = sum_b (u[b, r] @ v[b]) * sign_b[r, :]
    nb, m, k = u.shape
    for r in prange(r0, r1):
        for c in range(n):
            acc = 0.0
            for b in range(nb):
                mag = 0.0
                for j in range(k):
                    mag += u[b, r, j] * v[b, j, c]
                bit = (signs[b, (r * n + c) >> 3] >> (7 - ((r * n + c) & 7))) & 1
                acc += mag if bit else -mag
            out[r - r0, c] = acc
m, n, k, nb = 1536, 384, 2, 12
rng = np.random.default_rng(0)
signs = rng.integers(0, 256, (nb, m * n // 8)).astype(np.uint8)
u = rng.standard_normal((nb, m, k)).astype(np.float32)
v = rng.standard_normal((nb, k, n)).astype(np.float32)
x = rng.standard_normal((128, n)).astype(np.float32)
tile = np.empty((128, n), np.float32)
decode_rows(signs, u, v, 0, 128, n, tile)   # compile
jit = hwm() - base
def layer():
    y = np.empty((128, m), np.float32)
    for r0 in range(0, m, 128):
        decode_rows(signs, u, v, r0, r0 + 128, n, tile)
        y[:, r0:r0 + 128] = x @ tile.T
    return y
layer()
ts = []
for _ in range(20):
    t = time.perf_counter()
    layer()
    ts.append(time.perf_counter() - t)
print(json.dumps({"numba_import_mb": imp / 1e6, "after_jit_mb": jit / 1e6,
                  "layer_ms_12_blocks": 1e3 * float(np.median(ts))}))
