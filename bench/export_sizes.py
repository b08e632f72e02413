"""Whole-file sizes of all-MiniLM-L6-v2 exports vs ONNX Runtime's dynamic int8 model.

Exports MiniLM (seq 128, static shapes) as fp32 (no method), shift 4-bit and BitStack at
<= 4.5 bits per weight (6 blocks, factor_bits 0.125, the longest tier within 4.5 bits, as in
docs/quality.md), each compressed one with and without compact embeddings (int8 per-row word
and position tables), and ONNX Runtime's ``quantize_dynamic(fp32 export, per_channel=True,
weight_type=QInt8)``. Reports the bytes of the graph file plus its external data, and the
mean-pooled sentence-embedding cosine vs the fp32 torch model on the held sentences
(``edgestack.core.quality``), computed with ONNX Runtime on each file. One more row
applies :func:`edgestack.exporter.passes.compact_embeddings` (what the packer calls) to the
fp32 file: the int8 tables' own effect.

Calibration: ``--calib-n`` sentences (default 128, as docs/quality.md; GPTQ signs for
BitStack, the default shift rounding). File sizes do not depend on it, the cosines do.
The pooler (unused by sentence embeddings) stays dense fp32, as in docs/quality.md.

Run:  PYTHONPATH=src .venv/bin/python bench/export_sizes.py [--out bench/results/export_sizes.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edgestack import zoo
from edgestack.compress import compress
from edgestack.compress.bitstack import set_tier
from edgestack.compress.calib import text_calib
from edgestack.core.quality import cosine_rows, held_sentences, mean_pool, ort_runner, tokenize
from edgestack.exporter import export
from edgestack.exporter.output import external_files
from edgestack.exporter.parity import ort_session
from edgestack.exporter.passes import compact_embeddings

SEQ = 128
SKIP = ("pooler",)
METHODS: dict[str, dict[str, Any]] = {
    "shift": {"bits": 4},
    "bitstack": {"n_blocks": 6, "factor_bits": 0.125},
}
BITSTACK_MAX_BITS = 4.5


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _files(path: Path) -> dict[str, int]:
    graph = path.stat().st_size
    ext = sum((path.parent / name).stat().st_size for name in external_files(path))
    return {"graph_bytes": graph, "data_bytes": ext, "total_bytes": graph + ext}


def _embed_onnx(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    run = ort_runner(ort_session(path))
    return np.concatenate([mean_pool(run(f), f["attention_mask"]) for f in feeds])


def _embed_torch(model: Any, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    out = []
    with torch.no_grad():
        for f in feeds:
            hidden = model(**{k: torch.from_numpy(v) for k, v in f.items()}).last_hidden_state
            out.append(mean_pool(hidden.numpy(), f["attention_mask"]))
    return np.concatenate(out)


def _row(label: str, path: Path, ref: np.ndarray, feeds: list[dict[str, np.ndarray]],
         **extra: Any) -> dict[str, Any]:
    cos = cosine_rows(ref, _embed_onnx(path, feeds))
    row = {"label": label, **_files(path), "cosine_mean": round(float(cos.mean()), 5),
           "cosine_min": round(float(cos.min()), 5), **extra}
    _say(f"{label}: {row['total_bytes'] / 1e6:.2f} MB, cosine {row['cosine_mean']:.4f}")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/export_sizes.json")
    ap.add_argument("--calib-n", type=int, default=128,
                    help="calibration sentences of the shipped corpus (default 128)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    folder = zoo.minilm_path()
    feeds = tokenize(folder, held_sentences(), SEQ)
    calib = text_calib(folder, n=args.calib_n, seq=64, batch=8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        model, inputs = zoo.minilm(seq=SEQ)
        ref = _embed_torch(model, feeds)
        fp32 = tmpd / "fp32.onnx"
        export(model, inputs, fp32, parity=False, log=_say)
        rows.append(_row("fp32 (no method)", fp32, ref, feeds, method="none"))

        from onnxruntime.quantization import QuantType, quantize_dynamic

        q8 = tmpd / "ort-int8.onnx"
        quantize_dynamic(str(fp32), str(q8), per_channel=True, weight_type=QuantType.QInt8)
        rows.append(_row("ONNX Runtime quantize_dynamic, per-channel QInt8", q8, ref, feeds,
                         method="ort-int8"))

        # the int8 tables alone: the fp32 file through the packer's entry point
        fp32c = tmpd / "fp32-int8-embeddings.onnx"
        onnx.save(compact_embeddings(onnx.load(str(fp32)), log=_say), str(fp32c))
        rows.append(_row("fp32 layers, int8 embeddings (compact_embeddings on the fp32 file)",
                         fp32c, ref, feeds, method="none", compact_embeddings=True))

        for method, opts in METHODS.items():
            model, inputs = zoo.minilm(seq=SEQ)
            report = compress(model, method, calib=calib, skip=SKIP, **opts)
            extra: dict[str, Any] = {"method": method, "options": opts,
                                     "bits_per_weight": round(report.bits_per_weight, 3)}
            if method == "bitstack":
                tier = set_tier(model, report, max_bits=BITSTACK_MAX_BITS)
                extra["bits_per_weight"] = tier["bits_per_weight"]
                extra["tier"] = f"max_bits {BITSTACK_MAX_BITS}: {tier['count']} blocks"
            for compact in (False, True):
                out = tmpd / f"{method}-{'compact' if compact else 'float'}.onnx"
                res = export(model, inputs, out, compact_embeddings=compact, log=_say,
                             metadata={"method": method, "compression": report})
                label = (f"{method} {extra['bits_per_weight']:.3f} bits/weight, "
                         f"{'int8' if compact else 'fp32'} embeddings")
                rows.append(_row(label, out, ref, feeds, compact_embeddings=compact,
                                 parity_passed=res.parity.passed,
                                 parity_max_rel=res.parity.max_rel,
                                 tables=res.compact_embeddings, **extra))
    ort_bytes = rows[1]["total_bytes"]
    for row in rows:
        row["vs_ort_int8"] = round(row["total_bytes"] / ort_bytes, 3)
    doc = {"model": "all-MiniLM-L6-v2 (edgestack.zoo.minilm), seq 128, static shapes",
           "metric": "mean-pooled sentence-embedding cosine vs the fp32 torch model, "
                     f"{len(feeds)} held sentences, ONNX Runtime on each file",
           "calibration_sentences": args.calib_n, "skip": list(SKIP),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
           "onnxruntime": ort.__version__, "torch": torch.__version__,
           "seconds_total": round(time.perf_counter() - t0, 1), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown_table(rows))
    return 0


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The docs/ops.md table of ``rows``."""
    lines = ["| export | graph + data MB | vs ORT int8 | embedding cosine mean / min |",
             "| --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['total_bytes'] / 1e6:.2f} | "
                     f"{row['vs_ort_int8']:.2f}x | {row['cosine_mean']:.5f} / "
                     f"{row['cosine_min']:.5f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
