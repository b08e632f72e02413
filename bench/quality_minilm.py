"""Compression quality on all-MiniLM-L6-v2: every method vs int8/int4 baselines, one run.

Usage: .venv/bin/python bench/quality_minilm.py [--out bench/results/quality_minilm.json]
       [--finetune-seconds 3600] [--only LABEL_SUBSTRING ...] [--merge]

Same as ``edgestack quality minilm --all``; writes the rows as JSON and prints the markdown
table used in docs/quality.md. Metric: mean-pooled sentence-embedding cosine vs fp32 on the
held sentence set (edgestack/data/sentences.txt) and Spearman correlation of pairwise
similarities; calibration: 128 sentences of the shipped corpus (edgestack/data/calib.txt).
The pooler (unused by sentence embeddings) is left dense by every configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from edgestack import zoo
from edgestack.compress.calib import text_calib
from edgestack.compress.quality import EmbeddingEval, markdown_table, quality_rows, suite_configs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/quality_minilm.json")
    ap.add_argument("--finetune-seconds", type=float, default=3600.0,
                    help="safety bound of each fine-tune (the step counts decide the result)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only configurations whose label contains one of these")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other rows of an existing --out file (rows of the same "
                         "label are replaced; rows of labels no longer in the suite dropped)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, _ = zoo.minilm()
    folder = zoo.minilm_path()
    evaluator = EmbeddingEval.for_model(model, folder)
    calib = text_calib(folder, n=128, seq=64, batch=8)
    configs = suite_configs(skip=("pooler",), finetune_seconds=args.finetune_seconds)
    if args.only:
        configs = [c for c in configs if any(s in c.label for s in args.only)]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows = quality_rows(model, evaluator.score, configs, calib, log=log)
    out = Path(args.out)
    if args.merge and out.exists():
        rows = _merge(json.loads(out.read_text())["rows"], rows,
                      [c.label for c in suite_configs(skip=("pooler",))])
    doc = {"model": "all-MiniLM-L6-v2 (edgestack.zoo.minilm)",
           "metric": "mean-pooled sentence-embedding cosine vs fp32, held sentences",
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
           "torch": torch.__version__, "seconds_total": round(time.perf_counter() - t0, 1),
           "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(markdown_table(rows))
    return 0


def _merge(old: list[dict], new: list[dict], order: list[str]) -> list[dict]:
    """Rows of ``old`` with those of ``new`` replacing the same configuration, suite order."""
    def config(label: str) -> str:
        return next((c for c in order if label == c or label.startswith(c + ",")), label)

    fresh = {config(r["label"]) for r in new}
    kept = [r for r in old if config(r["label"]) in order and config(r["label"]) not in fresh]
    rows = kept + new
    rank = {c: i for i, c in enumerate(order)}
    return sorted(rows, key=lambda r: rank.get(config(r["label"]), len(order)))


if __name__ == "__main__":
    sys.exit(main())
