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
* ``--jobs J.json`` instead of the four paths: a list of ``{"model", "feeds", "out", "meta",
  "threads", "optimization"}`` (``optimization``: a ``GraphOptimizationLevel`` member
  name), run one after another in this one process (numpy and
  onnxruntime are imported once: each emulated start costs seconds). Each job writes its own
  meta file as above; the exit status is 0 even when a job failed (its meta says so).
* On a Python-level failure the runner writes ``{"error": {"stage", "type", "message"}}`` into
  the meta file and exits with status 3, so the host can tell a load error (for example an
  operator the build lacks) from a crash of the emulated process.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback


def session_options(ort, threads: int, level: str):
    """ORT session options as :func:`edgestack.core.ort.session_options` makes them on the
    host: ``threads`` intra-op threads, one inter-op thread, sequential, graph optimization
    ``level`` given as the ``onnxruntime.GraphOptimizationLevel`` member name (the host maps
    its level keys with :data:`edgestack.core.ort.LEVELS`; this file imports nothing but the
    standard library at load, hence ``ort`` passed in)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return so


def _write_meta(path: str, meta: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--feeds")
    parser.add_argument("--out")
    parser.add_argument("--meta")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--optimization", default="ORT_ENABLE_ALL",
                        help="an onnxruntime.GraphOptimizationLevel member name")
    parser.add_argument("--jobs")
    args = parser.parse_args(argv)
    if args.jobs:
        with open(args.jobs, encoding="utf-8") as f:
            jobs = json.load(f)
        for job in jobs:
            run_one(job["model"], job["feeds"], job["out"], job["meta"],
                    int(job.get("threads", 1)), job.get("optimization", "ORT_ENABLE_ALL"))
        return 0
    if not (args.model and args.feeds and args.out and args.meta):
        parser.error("--model, --feeds, --out and --meta are required without --jobs")
    return run_one(args.model, args.feeds, args.out, args.meta, args.threads, args.optimization)


def run_one(model: str, feeds_path: str, out: str, meta_path: str, threads: int,
            optimization: str) -> int:
    """Run one model on one set of feeds (see the protocol above); returns 0 or 3."""
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    stage = "import"
    try:
        import numpy as np
        import onnxruntime as ort

        stage = "read-feeds"
        with np.load(feeds_path, allow_pickle=False) as npz:
            feeds = {name: npz[f"arr_{i}"] for i, name in enumerate(meta["feeds"])}

        stage = "load-model"
        so = session_options(ort, threads, optimization)
        if model.endswith(".ort"):
            # ORT infers this from the suffix too; saying it makes a wrong file fail loudly.
            so.add_session_config_entry("session.load_model_format", "ORT")
        session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

        stage = "run"
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feeds)

        stage = "write-outputs"
        np.savez(out, **{f"arr_{i}": np.asarray(v) for i, v in enumerate(values)})
        meta["outputs"] = names
    except Exception as exc:  # reported to the host, which raises TargetError
        meta["error"] = {
            "stage": stage,
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(limit=8),
        }
        _write_meta(meta_path, meta)
        return 3
    _write_meta(meta_path, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
