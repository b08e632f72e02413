"""Export every built-in model with every method and report what the exporter issue asks.

For each (model, method): compress, export, ONNX checker (full), ONNX Runtime vs compressed
torch parity, and the compressed layers' bytes in the ONNX file vs the format's theoretical
size. Run:  .venv/bin/python bench/export_matrix.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnx

from edgestack import zoo
from edgestack.compress import compress
from edgestack.exporter import export, layer_sizes

MODELS = {"minilm": lambda: zoo.minilm(seq=128), "gpt2-tiny": zoo.gpt2_tiny,
          "small-cnn": zoo.small_cnn}
METHODS = {"shift": {"bits": 4}, "bitstack": {"n_blocks": 4}, "lowrank": {"ratio": 0.5},
           "prune": {"ratio": 0.25}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for method, opts in METHODS.items():
                model, inputs = MODELS[name]()
                t0 = time.perf_counter()
                report = compress(model, method, calib=[inputs], **opts)
                t_c = time.perf_counter() - t0
                out = Path(tmp) / f"{name}-{method}.onnx"
                res = export(model, inputs, out, metadata={"compression": report})
                onnx.checker.check_model(str(out), full_check=True)
                sizes = layer_sizes(out)
                actual = sum(r.actual_bytes for r in sizes.layers)
                theory = sum(r.theoretical_bytes for r in sizes.layers)
                row = {
                    "model": name, "method": method, "options": opts,
                    "layers": len(report.layers),
                    "bits_per_weight": round(report.bits_per_weight, 3),
                    "compressed_bytes": report.compressed_bytes,
                    "onnx_layer_bytes": actual,
                    "size_ratio": round(actual / theory, 4) if theory else None,
                    "parity_max_rel": res.parity.max_rel, "parity_passed": res.parity.passed,
                    "compress_s": round(t_c, 2), "export_s": round(res.seconds["total"], 2),
                }
                rows.append(row)
                print(f"{name:10s} {method:9s} layers={row['layers']:3d} "
                      f"bpw={row['bits_per_weight']:7.3f} size_ratio={row['size_ratio']} "
                      f"parity_max_rel={row['parity_max_rel']:.2e} "
                      f"compress={row['compress_s']:.1f}s export={row['export_s']:.1f}s",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    # the exporter issue's bars: parity within tolerance, file bytes within 10% of theory
    ok = all(r["parity_passed"] and (r["size_ratio"] is None or r["size_ratio"] <= 1.10)
             for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
