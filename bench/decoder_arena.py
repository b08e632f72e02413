"""ONNX Runtime's memory arena on a decoder package's dense graph: what it buys and costs.

The runtime turns the arena on for the dense graphs (decoders included). This serves a
decoder package without a budget (its fastest plan) in fresh processes, alternating the
runtime's setting with the arena forced off (``InferenceSession`` wrapped so that its
session options say ``enable_cpu_mem_arena = False``), and reports per process the median
prefill and decode tokens/s of ``--repeats`` generations (``--prompt`` tokens, ``--new``
new tokens) and the peak RSS above the imports.

Run (after ``bench/generate.py`` has built its GPT-2 package):
    .venv/bin/python bench/decoder_arena.py [--package bench/.generate-work/gpt2-bitstack-256.pkg]
        [--processes 3] [--out bench/results/decoder_arena.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, statistics, sys
import onnxruntime as ort
pkg, arena, threads, prompt_len, new, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
if arena == "off":   # the runtime sets the option itself: force it where the session is made
    _Session = ort.InferenceSession
    def _session(model, so=None, *args, **kwargs):
        if so is not None:
            so.enable_cpu_mem_arena = False
        return _Session(model, so, *args, **kwargs)
    ort.InferenceSession = _session
from edgestack.profiler.probe import peak_rss
from edgestack.runtime import Runtime
base = peak_rss()
rt = Runtime(pkg, threads=threads, calibrate=False)
prompt = [[(7 * j) % 1000 + 10 for j in range(prompt_len)]]
rt.generate(prompt, 4, stop=())   # warm-up
runs = [rt.generate(prompt, new, stop=()) for _ in range(repeats)]
print(json.dumps({"graph": rt.plan.graph, "tier": rt.tier,
                  "decode": statistics.median(g.decode_tokens_per_s for g in runs),
                  "prefill": statistics.median(g.prefill_tokens_per_s for g in runs),
                  "peak_mib": (peak_rss() - base) / 2**20}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default=str(ROOT / "bench" / ".generate-work" /
                                             "gpt2-bitstack-256.pkg"))
    ap.add_argument("--processes", type=int, default=3, help="processes per setting")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decoder_arena.json"))
    args = ap.parse_args(argv)
    if not Path(args.package).is_dir():
        print(f"decoder_arena: no package at {args.package}; run bench/generate.py first "
              "(it builds one) or pass --package", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(args.processes):
        for arena in runs:
            out = subprocess.run(
                [sys.executable, "-c", PROBE, args.package, arena, str(args.threads),
                 str(args.prompt), str(args.new), str(args.repeats)],
                capture_output=True, text=True, check=True, timeout=1200,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            got = json.loads(out.stdout.strip().splitlines()[-1])
            runs[arena].append(got)
            print(f"arena {arena:3s}: {got['graph']} tier {got['tier']}, decode "
                  f"{got['decode']:6.1f} tok/s, prefill {got['prefill']:7.1f} tok/s, peak "
                  f"+{got['peak_mib']:6.1f} MiB", flush=True)
    summary = {a: {k: statistics.median(r[k] for r in rs) for k in ("decode", "prefill",
                                                                      "peak_mib")}
               for a, rs in runs.items()}
    print("medians:", summary)
    Path(args.out).write_text(json.dumps({"package": args.package, "threads": args.threads,
                                          "prompt": args.prompt, "new": args.new,
                                          "runs": runs, "median": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
