"""What ONNX Runtime's prepacking of a tied LM head costs and buys (GPT-2-small shape).

A decoder whose head is tied to its word embedding reads one float32 table ``W`` ``[50257,
768]`` (147 MiB) twice: ``Gather(W, ids)`` for the embedding and ``Gemm(x, W, transB=1)`` for
the head. With prepacking on (the runtime's dense graphs), ONNX Runtime packs the Gemm's
``B`` into a copy of its own; a table the graph reads only through the Gemm is released after
packing, but one the Gather also reads stays: two copies. This measures, in a fresh process
per case (2 threads), the peak RSS above the imports and the head's latency for one row
(a decode step) and 16 rows (a prefill chunk):

- ``W`` an external-data initializer, prepacking on / off;
- ``W`` handed over with ``SessionOptions.add_initializer`` (how the runtime hands over the
  lookup tables it maps), prepacking on;
- ``W`` a graph input fed on every call (a memory map: never prepacked);
- ``W`` an overridable initializer (a graph input too, with the external initializer as its
  default; not fed), prepacking on: how ``edgestack pack`` writes a tied table
  (:func:`edgestack.packer.pack.share_tables`).

Run:  .venv/bin/python bench/prepack_head.py [--out bench/results/prepack_head.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save

VOCAB, HIDDEN, THREADS = 50257, 768, 2

PROBE = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort

path, data, mode, gather = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
base = hwm()
opts = ort.SessionOptions()
opts.intra_op_num_threads = int(sys.argv[5])
opts.log_severity_level = 3   # the overridable initializer's warning
opts.add_session_config_entry("session.disable_prepacking", "1" if mode == "off" else "0")
table = np.memmap(data, np.float32, "r", shape=(int(sys.argv[6]), int(sys.argv[7])))
if mode == "add_initializer":  # the OrtValue must outlive the session (ORT keeps no reference)
    value = ort.OrtValue.ortvalue_from_numpy(np.asarray(table))
    opts.add_initializer("W", value)
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
ms = {}
for rows in (1, 16):
    feeds = {"x": np.ones((rows, table.shape[1]), np.float32)}
    if gather:
        feeds["ids"] = np.arange(rows, dtype=np.int64)
    if mode == "input":
        feeds["W"] = table
    for _ in range(3):
        sess.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(20):
        sess.run(None, feeds)
    ms[rows] = round(1000 * (time.perf_counter() - t0) / 20, 2)
print(json.dumps({"peak_mib": round((hwm() - base) / 2**20, 1), "ms": ms}))
"""


def _model(folder: Path, name: str, mode: str, gather: bool) -> Path:
    """``y = Gemm(x, W, transB=1)`` (and ``e = Gather(W, ids)`` with ``gather``); ``W`` an
    initializer in ``table.data``, a graph input (``mode`` "input") or both ("overridable")."""
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", HIDDEN])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", VOCAB])]
    if gather:
        nodes.append(helper.make_node("Gather", ["W", "ids"], ["e"]))
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["rows"]))
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, ["rows", HIDDEN]))
    inits = []
    if mode in ("input", "overridable"):
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [VOCAB, HIDDEN]))
    if mode != "input":
        w = numpy_helper.from_array(np.zeros((1, 1), np.float32), "W")
        w.ClearField("raw_data")
        w.dims[:] = [VOCAB, HIDDEN]
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "table.data"), ("offset", "0"),
                           ("length", str(VOCAB * HIDDEN * 4))):
            w.external_data.add(key=key, value=value)
        inits.append(w)
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    path = folder / f"{name}.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/prepack_head.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "table.data"
        rng = np.random.default_rng(0)
        (rng.standard_normal((VOCAB, HIDDEN)) * 0.02).astype(np.float32).tofile(data)
        cases = [("Gemm only", False, "on"), ("Gemm only", False, "off"),
                 ("Gather + Gemm", True, "on"), ("Gather + Gemm", True, "off"),
                 ("Gather + Gemm", True, "add_initializer"), ("Gather + Gemm", True, "input"),
                 ("Gather + Gemm", True, "overridable")]
        for reader, gather, mode in cases:
            path = _model(folder, f"head_{len(rows)}", mode, gather)
            done = subprocess.run(
                [sys.executable, "-c", PROBE, str(path), str(data), mode, str(int(gather)),
                 str(THREADS), str(VOCAB), str(HIDDEN)],
                capture_output=True, text=True, check=True)
            got = json.loads(done.stdout)
            rows.append({"table read by": reader, "W": mode, **got})
            print(f"{reader:14s} W {mode:16s} peak +{got['peak_mib']:6.1f} MiB   "
                  f"1 row {got['ms']['1']:6.2f} ms   16 rows {got['ms']['16']:6.2f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"vocab": VOCAB, "hidden": HIDDEN, "threads": THREADS,
                                    "table_mib": round(VOCAB * HIDDEN * 4 / 2**20, 1),
                                    "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
