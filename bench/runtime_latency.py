"""The runtime's plans against the baselines a user would deploy, timed in one process.

Uses what ``edgestack demo --keep-work`` wrote (run it first): the 12-block MiniLM BitStack
package (``edgestack-demo/packages/minilm-bitstack``), the baselines it built from the fp32
export (ORT fp32, dynamic int8 per-tensor and per-channel, MatMulNBits 8- and 4-bit, each with
external data, and OpenVINO f32 and bf16; ``edgestack-demo/work/bench/baselines``) and the
bench inputs (the first held sentence, seq 128; ``edgestack-demo/work/bench/feeds.npz``).
Without ``--keep-work`` (``make demo``) the demo removes its scratch folder ``work/``, and
with it the baselines and the bench inputs. Serves the package with the runtime manager
at ``--budgets`` (default: one per dense form the planner picks: int8, 8-bit weight-only,
float32), and, with ``--openvino`` (default: f32,bf16), the package served by OpenVINO in
those precisions at each dense form (its top tier, every layer materialised), then times
every subject interleaved in one process (``--rounds`` rounds, one call per subject each,
pool threads not spinning, 2 threads), and prints p50 and the ratio of each plan to each
baseline, with the CPU's int8/bf16 extensions (latency ratios depend on them). Quality and
memory are the demo's and ``bench/runtime_budgets.py``'s; this script times only.

Run:  .venv/bin/edgestack demo --keep-work
      .venv/bin/python bench/runtime_latency.py [--rounds 60]
          [--out bench/results/runtime_latency.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "edgestack-demo"
BASELINES = {"ORT fp32": "ort_fp32", "ORT dynamic int8 per-tensor": "ort_int8",
             "ORT dynamic int8 per-channel": "ort_int8_channel",
             "ORT MatMulNBits int8 g32": "ort_nbits8", "ORT MatMulNBits int4 g32": "ort_nbits4"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default=str(DEMO / "packages" / "minilm-bitstack"))
    ap.add_argument("--baselines", default=str(DEMO / "work" / "bench" / "baselines"))
    ap.add_argument("--feeds", default=str(DEMO / "work" / "bench" / "feeds.npz"))
    ap.add_argument("--budgets", default="int8,nbits8,fp32",
                    help="comma-separated budgets (e.g. 40MB) or forms: a form is served at "
                    "its top-tier plan + 1 MiB")
    ap.add_argument("--openvino", default="f32,bf16",
                    help="OpenVINO precisions to serve the package with at each form of "
                    "--budgets that is a form ('' for none)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)

    from edgestack.core.latency import cpu_extensions
    from edgestack.core.ort import cpu_session
    from edgestack.package import Package
    from edgestack.runtime import Runtime, calibrate, plan_tier

    for path in (args.package, args.baselines, args.feeds):
        if not Path(path).exists():
            print(f"error: {path} does not exist; run `.venv/bin/edgestack demo "
                  "--keep-work` first (it writes the package, and with --keep-work keeps the "
                  "baselines and the bench inputs in edgestack-demo/work, which `make demo` "
                  "removes)", file=sys.stderr)
            return 2
    with np.load(args.feeds) as npz:
        feeds = {k: npz[k] for k in npz.files}
    subjects = {}
    for label, folder in BASELINES.items():
        sess = cpu_session(Path(args.baselines, folder, "model.onnx"), args.threads,
                           spinning="off")
        names = {i.name for i in sess.get_inputs()}
        own = {k: v for k, v in feeds.items() if k in names}
        subjects[label] = (lambda s=sess, f=own: s.run(None, f))
    ov = Path(args.baselines, "openvino")
    if ov.is_dir():   # OpenVINO f32 and bf16 (threads from the artifact's settings)
        from edgestack.targets import load_runner

        for precision, label in (("fp32", "OpenVINO f32"), ("bf16", "OpenVINO bf16")):
            runner = load_runner(str(ov), precision=precision).activate()
            subjects[label] = (lambda r=runner: r.infer(feeds))
    with Package.open(args.package) as pkg:
        costs = calibrate(pkg, threads=args.threads)
        top, layers = len(pkg.tiers) - 1, len(pkg.layers)
        budgets = []
        for item in args.budgets.split(","):
            if item in ("int8", "nbits8", "fp32"):
                plan = plan_tier(pkg, top, materialize=layers, costs=costs, form=item)
                budgets.append((item, plan.total + 2**20))
            else:
                budgets.append(("auto", item))
    plans = {}
    for form, budget in budgets:
        # without spinning pool threads, as the baselines (fair on 2 cores)
        rt = Runtime(args.package, budget, threads=args.threads, form=form, spinning="off")
        label = f"edgestack {rt.plan.graph} (tier {rt.tier}, plan {rt.plan.total / 1e6:.1f} MB)"
        subjects[label] = (lambda r=rt: r.infer(feeds))
        plans[label] = rt.plan.graph
    for precision in [p for p in args.openvino.split(",") if p]:
        for form, _budget in budgets:
            if form == "auto":
                continue
            rt = Runtime(args.package, threads=args.threads, form=form, engine="openvino",
                         precision=precision)
            label = f"edgestack {form} on OpenVINO {precision} (tier {rt.tier})"
            subjects[label] = (lambda r=rt: r.infer(feeds))
            plans[label] = f"openvino-{precision}-{form}"
    times: dict[str, list[float]] = {k: [] for k in subjects}
    for fn in subjects.values():
        for _ in range(3):
            fn()
    for _ in range(args.rounds):
        for label, fn in subjects.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    p50 = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    ext = cpu_extensions()
    print(f"p50 ms over {args.rounds} interleaved rounds, {args.threads} threads, CPU "
          f"extensions: {ext}")
    for label, ms in p50.items():
        print(f"  {label:48s} {ms:7.2f}")
    print("ratio of each plan to each baseline (below 1 is faster):")
    ratios = {}
    bases = [b for b in subjects if b not in plans]
    for plan in plans:
        ratios[plan] = {b: p50[plan] / p50[b] for b in bases}
        print(f"  {plan}: " + ", ".join(f"{b} {r:.2f}x" for b, r in ratios[plan].items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(
            {"p50_ms": p50, "ratios": ratios, "plans": plans, "cpu_extensions": ext,
             "rounds": args.rounds, "threads": args.threads}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
