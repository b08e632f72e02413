"""Synthetic BitStack ONNX models (no torch) for the packer and runtime tests.

``synthetic_onnx`` writes what ``edgestack export --method bitstack`` writes for an MLP: a
dense input projection (a plain initializer, so the package has a weights file), then per
layer an ``edgestack.BitStackWeight`` node over ``signs/u/v`` initializers feeding a ``Gemm``
(``transB=1``), ``Relu`` between layers, the node tag ``edgestack.layer`` and the model
metadata ``edgestack.bitstack_order``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgestack.formats import BitStackStack, pack_bits

CREATED = "2026-01-01T00:00:00Z"
"""Creation time of the test packages (fixed, so packing is byte-reproducible)."""


def make_stacks(dims: tuple[int, ...], n_blocks: int, k: int, seed: int = 0
                ) -> dict[str, BitStackStack]:
    rng = np.random.default_rng(seed)
    stacks = {}
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:], strict=False)):
        m, n = d_out, d_in
        signs = np.stack([pack_bits(rng.integers(0, 2, m * n)) for _ in range(n_blocks)])
        scale = 0.5 ** np.arange(n_blocks)[:, None, None]
        u = (np.abs(rng.standard_normal((n_blocks, m, k))) * scale / np.sqrt(n * k)
             ).astype(np.float16)
        v = np.abs(rng.standard_normal((n_blocks, k, n))).astype(np.float16)
        stacks[f"fc{i}"] = BitStackStack(signs, u, v, (m, n))
    return stacks


def importance_order(stacks: dict[str, BitStackStack]) -> list[tuple[str, int]]:
    """Level-major, and within a level the layers in reverse (so not graph order)."""
    top = max(s.n_blocks for s in stacks.values())
    names = list(stacks)[::-1]
    return [(n, b) for b in range(top) for n in names if b < stacks[n].n_blocks]


def synthetic_onnx(path: str | os.PathLike[str], dims: tuple[int, ...] = (64, 96, 64, 32),
                   n_blocks: int = 3, k: int = 2, seed: int = 0, order: bool = True,
                   batch: int = 2) -> dict[str, BitStackStack]:
    """Write the model; return its stacks (layer name -> BitStackStack)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgestack.exporter import ops as es_ops

    es_ops.register_schemas()
    rng = np.random.default_rng(seed + 1)
    stacks = make_stacks(dims, n_blocks, k, seed)
    d0 = dims[0]
    proj = (rng.standard_normal((d0, d0)) / np.sqrt(d0)).astype(np.float32)
    inits = [numpy_helper.from_array(proj, "proj.weight")]
    nodes = [helper.make_node("MatMul", ["x", "proj.weight"], ["h0"], name="node_proj")]
    h = "h0"
    for i, (name, st) in enumerate(stacks.items()):
        for part, arr in (("signs", st.signs), ("u", st.u), ("v", st.v)):
            inits.append(numpy_helper.from_array(arr, f"{name}.weight_module.{part}"))
        node = helper.make_node(
            "BitStackWeight", [f"{name}.weight_module.{p}" for p in ("signs", "u", "v")],
            [f"w_{name}"], domain="edgestack", name=f"node_bitstack_weight_{i}",
            shape=list(st.shape))
        entry = node.metadata_props.add()
        entry.key, entry.value = "edgestack.layer", name
        nodes.append(node)
        bias = (rng.standard_normal(st.shape[0]) * 0.1).astype(np.float32)
        inits.append(numpy_helper.from_array(bias, f"{name}.bias"))
        out = "output" if i == len(stacks) - 1 else f"g{i}"
        nodes.append(helper.make_node("Gemm", [h, f"w_{name}", f"{name}.bias"], [out],
                                      transB=1, name=f"node_gemm_{i}"))
        if out != "output":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"node_relu_{i}"))
            h = f"r{i}"
    graph = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, d0])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, dims[-1]])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid("edgestack", 1)])
    model.functions.append(es_ops.get_op("BitStackWeight").function_proto(20))
    if order:
        entry = model.metadata_props.add()
        entry.key = "edgestack.bitstack_order"
        entry.value = json.dumps([[n, b] for n, b in importance_order(stacks)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return stacks


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """``(onnx path, stacks)`` of a 3-layer MLP 64-96-64-32, 3 blocks of rank 2."""
    path = tmp_path_factory.mktemp("small") / "mlp.onnx"
    return path, synthetic_onnx(path)


@pytest.fixture(scope="session")
def small_pkg(tmp_path_factory, small_model):
    """The directory package of ``small_model`` (fixed creation time)."""
    from edgestack.packer.pack import pack

    out = tmp_path_factory.mktemp("small_pkg") / "mlp.pkg"
    pack(small_model[0], out, created=CREATED)
    return out


def reference_output(stacks: dict[str, BitStackStack], blocks: dict[str, int], x: np.ndarray,
                     model_path: str | os.PathLike[str]) -> np.ndarray:
    """numpy forward pass with each layer decoded from its first ``blocks[layer]`` blocks."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    h = x.astype(np.float64) @ inits["proj.weight"].astype(np.float64)
    names = list(stacks)
    for i, name in enumerate(names):
        w = stacks[name].decode(blocks[name]).astype(np.float64)
        h = h @ w.T + inits[f"{name}.bias"]
        if i < len(names) - 1:
            h = np.maximum(h, 0)
    return h


PEAK_SCRIPT = r"""
import edgestack.runtime as R   # before onnxruntime: the smaller baseline (the stricter test)
import json, sys, time
from edgestack.profiler.probe import peak_rss as hwm
mode, engine = sys.argv[1], sys.argv[-1]   # the last argument: the engine
import numpy as np
if engine == 'openvino':
    import openvino
else:
    import onnxruntime
if mode == 'base':
    print(json.dumps({'hwm': hwm(), 'torch': 'torch' in sys.modules}))
    sys.exit(0)
pkg, budget = sys.argv[2], int(sys.argv[3])
before = hwm()
rt = R.Runtime(pkg, budget, engine=engine)
from edgestack.package import Package
inputs = rt.package.golden()[0]
for _ in range(3):
    rt.infer(inputs)
print(json.dumps({'hwm': hwm(), 'before': before, 'tier': rt.tier, 'plan': rt.plan.total,
                  'torch': 'torch' in sys.modules}))
"""


def peak_rss(*args: str, engine: str = "onnxruntime") -> dict[str, Any]:
    """Run :data:`PEAK_SCRIPT` in a fresh interpreter (serving with ``engine``); its JSON
    line."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *args, engine], capture_output=True,
                         text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def resident_bytes(buf: Any) -> int:
    """Bytes of a page-aligned buffer (an anonymous ``mmap``) resident in RAM now, from the
    kernel's page table (``mincore``): exact, unlike the RSS of a busy test process."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = len(buf)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    addr = np.frombuffer(buf, np.uint8).ctypes.data
    if libc.mincore(addr, size, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
