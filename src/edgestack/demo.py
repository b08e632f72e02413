"""The demo: the main job of edgestack on the embedded default model.

all-MiniLM-L6-v2 (real weights, offline) is compressed with each method, exported to ONNX
with edgestack ops, parity-checked against the compressed torch model, and measured with
ONNX Runtime: stored bytes, embedding quality vs the fp32 model on the shipped sentence set,
and latency. Everything lands in one folder as report.md and report.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_METHODS: dict[str, dict[str, Any]] = {
    "none": {},
    "shift": {"bits": 4},
    "bitstack": {"n_blocks": 4},
    "lowrank": {"ratio": 0.5},
    "prune": {"ratio": 0.25},
}


@dataclass
class DemoResult:
    """What the demo measured; ``rows`` has one dict per method."""

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.md"

    @property
    def ok(self) -> bool:
        return all(r["parity_passed"] for r in self.rows)


def _environment() -> dict[str, Any]:
    import platform

    import onnxruntime
    import torch

    import edgestack

    return {"edgestack": edgestack.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "machine": platform.machine(), "processor": platform.processor() or "unknown"}


def run_demo(out_dir: str | Path = "edgestack-demo", methods: dict[str, dict] | None = None,
             seq: int = 128, threads: int = 2, iterations: int = 20,
             log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo and write ``out_dir/report.md`` and ``report.json``.

    Args:
        out_dir: folder for the report and the exported models.
        methods: method name -> compress() options (default :data:`DEFAULT_METHODS`).
        seq: sequence length of the exported models.
        threads: ONNX Runtime intra-op threads for latency.
        iterations: timed iterations per model.
        log: progress callback.
    """
    from edgestack import zoo
    from edgestack.compress import compress
    from edgestack.exporter import export
    from edgestack.profiler.latency import ort_session, time_calls
    from edgestack.profiler.quality import compare_embeddings, embed, held_sentences, \
        ort_runner, tokenize

    t_start = time.perf_counter()
    out = Path(out_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    methods = dict(DEFAULT_METHODS if methods is None else methods)
    result = DemoResult(out, environment=_environment())
    batches = tokenize(zoo.minilm_path(), held_sentences(), seq)
    ref_emb = None
    for i, (method, opts) in enumerate(methods.items(), 1):
        log(f"[{i}/{len(methods)}] {method} {opts or ''}: load, compress, export, check")
        model, inputs = zoo.minilm(seq=seq)
        t0 = time.perf_counter()
        report = compress(model, method, calib=[inputs], **opts)
        t_compress = time.perf_counter() - t0
        path = out / "models" / f"minilm-{method}.onnx"
        t0 = time.perf_counter()
        res = export(model, inputs, path, metadata={"compression": report})
        t_export = time.perf_counter() - t0
        sess = ort_session(str(path), threads=threads)
        emb = embed(ort_runner(sess), batches)
        if ref_emb is None:
            ref_emb = emb  # the first method is the fp32 reference ("none")
        quality = compare_embeddings(ref_emb, emb)
        feeds = {k: v.numpy() for k, v in inputs.items()}
        lat = time_calls(lambda: sess.run(None, feeds), warmup=3, iterations=iterations)
        files = [path] + ([Path(str(path) + ".data")] if Path(str(path) + ".data").exists() else [])
        row = {
            "method": method,
            "options": opts,
            "layers_compressed": len(report.layers),
            "dense_bytes": report.dense_bytes,
            "compressed_bytes": report.compressed_bytes,
            "bits_per_weight": round(report.bits_per_weight, 3) if report.layers else 32.0,
            "onnx_file_bytes": sum(f.stat().st_size for f in files),
            "parity_passed": bool(res.parity.passed),
            "parity_max_rel": max(o["max_rel"] for o in res.parity.to_dict()["outputs"]),
            "cosine_vs_fp32": round(quality["cosine_mean"], 5),
            "spearman_vs_fp32": round(quality["spearman_pairwise"], 5),
            "ort_p50_ms": round(lat.p50_ms, 2),
            "ort_p90_ms": round(lat.p90_ms, 2),
            "compress_s": round(t_compress, 2),
            "export_s": round(t_export, 2),
        }
        result.rows.append(row)
        log(f"    {row['bits_per_weight']} bits/weight, cosine {row['cosine_vs_fp32']}, "
            f"parity {'ok' if row['parity_passed'] else 'FAILED'}, p50 {row['ort_p50_ms']} ms")
    result.seconds = time.perf_counter() - t_start
    write_report(result, seq=seq, threads=threads)
    return result


def write_report(result: DemoResult, seq: int, threads: int) -> None:
    """Write report.md and report.json into ``result.out_dir``."""
    out = result.out_dir
    data = {"environment": result.environment, "seq": seq, "threads": threads,
            "seconds": round(result.seconds, 1), "rows": result.rows}
    (out / "report.json").write_text(json.dumps(data, indent=2))
    lines = [
        "# edgestack demo report",
        "",
        f"Model: all-MiniLM-L6-v2 (real weights), batch 1, seq {seq}; ONNX Runtime CPU, "
        f"{threads} threads. Made by `edgestack demo` in {result.seconds:.0f} s.",
        "",
        "Quality: mean-pooled sentence-embedding cosine vs the fp32 model on the "
        f"{len(__import__('edgestack.profiler.quality', fromlist=['x']).held_sentences())} "
        "shipped sentences, and Spearman correlation of their pairwise similarities.",
        "Bits/weight and compressed bytes cover the compressed layers only (embeddings and "
        "norms stay fp32); the file size is the whole ONNX model.",
        "",
        "| method | options | bits/weight | compressed MB | ONNX file MB | cosine | Spearman "
        "| parity max rel | ORT p50 ms | ORT p90 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result.rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        lines.append(
            f"| {r['method']} | {opts} | {r['bits_per_weight']} | "
            f"{r['compressed_bytes'] / 1e6:.2f} | {r['onnx_file_bytes'] / 1e6:.2f} | "
            f"{r['cosine_vs_fp32']:.4f} | {r['spearman_vs_fp32']:.4f} | "
            f"{r['parity_max_rel']:.1e}{'' if r['parity_passed'] else ' FAIL'} | "
            f"{r['ort_p50_ms']} | {r['ort_p90_ms']} |"
        )
    env = result.environment
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    (out / "report.md").write_text("\n".join(lines))
