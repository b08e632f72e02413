"""Run one ONNX Runtime session inside the emulated aarch64 Python.

This file is executed by the aarch64 interpreter that ``scripts/setup-arm-env.sh`` builds, not
imported by edgestack. It must stay self-contained: standard library, numpy and onnxruntime
only. :class:`edgestack.targets.emulate.AArch64Emulator` drives it.

Protocol (all paths are on the host file system, which the emulated process shares):

* ``--feeds F.npz``: the inputs, stored as ``arr_0, arr_1, ...`` (positional, because ONNX
  names such as ``/layer/Add_output_0`` are not safe zip member names) and a JSON meta file
  ``--meta M.json`` holding ``{"feeds": [name, ...]}`` in the same order.
* ``--out O.npz``: the outputs, again ``arr_0, ...``; their names are written back into the
  meta file under ``"outputs"``.
* On a Python-level failure the runner writes ``{"error": {"stage", "type", "message"}}`` into
  the meta file and exits with status 3, so the host can tell a load error (for example an
  operator the build lacks) from a crash of the emulated process.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

LEVELS = ("disable", "basic", "extended", "all")


def _write_meta(path: str, meta: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--feeds", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--meta", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--optimization", choices=LEVELS, default="all")
    args = parser.parse_args(argv)

    with open(args.meta, encoding="utf-8") as f:
        meta = json.load(f)
    stage = "import"
    try:
        import numpy as np
        import onnxruntime as ort

        stage = "read-feeds"
        with np.load(args.feeds, allow_pickle=False) as npz:
            feeds = {name: npz[f"arr_{i}"] for i, name in enumerate(meta["feeds"])}

        stage = "load-model"
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[args.optimization]
        if args.model.endswith(".ort"):
            # ORT infers this from the suffix too; saying it makes a wrong file fail loudly.
            so.add_session_config_entry("session.load_model_format", "ORT")
        session = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])

        stage = "run"
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feeds)

        stage = "write-outputs"
        np.savez(args.out, **{f"arr_{i}": np.asarray(v) for i, v in enumerate(values)})
        meta["outputs"] = names
    except Exception as exc:  # reported to the host, which raises TargetError
        meta["error"] = {
            "stage": stage,
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(limit=8),
        }
        _write_meta(args.meta, meta)
        return 3
    _write_meta(args.meta, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
