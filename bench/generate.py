"""Text generation with the KV cache: an edgestack BitStack package vs the same model
uncompressed on ONNX Runtime fp32, timed side by side in one process, and peak RSS of fresh
processes generating to max_context at 3 budgets.

The model is GPT-2-shaped: a real pretrained ``gpt2`` only when it is in the local Hugging
Face cache (nothing is downloaded), else **random weights of gpt2-small shape** (12 layers,
hidden 768, 12 heads, vocab 50257; transformers' initialisation): tokens/s do not depend on
the weights' values, so the speed numbers hold; the text does not mean anything. Steps:

1. compress a copy with BitStack (``--blocks``, ``--rank``) and export both (the compressed
   one and the uncompressed original) as decoders with a KV cache
   (:func:`edgestack.exporter.export_decoder`); pack the compressed one
   (``--max-context``, max_batch 1; its tied LM head / word embedding table int8, the
   default), and again with that table float (``tied_tables="float"``) to measure what
   int8 costs in logits (cosine, top-1 agreement on a forced token sequence). Also ONNX
   Runtime's own int8 model of the uncompressed export (``quantize_dynamic``,
   ``per_channel=True``, weights in external data: what a user would otherwise deploy);
2. speed, one process, interleaved rounds: the package served by the runtime (its fastest
   plan without a budget: every layer materialised int8; the float32 plan; the plan of the
   largest budget of step 3; the int8 and float32 plans again with ``prepack="off"``: what
   ONNX Runtime's prepacking of the weights buys; the int8 plan of the float-table
   twin) vs the
   uncompressed export and ORT's int8 model, each on an ONNX Runtime CPU session with the
   same session options and threads; each generates ``--new`` greedy tokens after a
   ``--prompt``-token prompt with the same loop
   (:func:`edgestack.core.decoding.decode_steps`): prefill tokens/s (the prompt, in the
   package's prefill chunks for all) and decode tokens/s separately; the package is also
   served at the budgets of its top and bottom tier and at ORT int8's peak (equal memory);
3. memory: budgets of 3 tiers (their smallest plans with this machine's calibrated costs,
   + 1 MiB); a fresh process per budget generates to max_context (prompt half of it) and
   reports its peak RSS above the imports; also the KV cache's share measured as the
   difference between generating to max_context and to 1/8 of it, against the plan's
   ``kv_cache`` line (KV_ALIVE copies); and the ORT int8 model's peak generating to
   max_context, with the package served at that peak as its budget (equal memory).

Run:  .venv/bin/python bench/generate.py [--threads 2] [--max-context 256]
          [--out bench/results/generate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "generate.json"
WORK = ROOT / "bench" / ".generate-work"
INT8 = WORK / "ort-int8pc" / "model.onnx"   # ORT's own int8 model of the uncompressed export

PEAK = r"""
import edgestack.runtime as R
import json, sys
import onnxruntime, numpy as np
from edgestack.profiler.probe import peak_rss as hwm
pkg, budget, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = hwm()
rt = R.Runtime(pkg, budget, threads=int(sys.argv[4]))
prompt = [[(7 * j) % 1000 + 10 for j in range(tokens // 2)]]
gen = rt.generate(prompt, tokens - tokens // 2, stop=())
print(json.dumps({'hwm': hwm(), 'base': base, 'tier': rt.tier, 'plan': rt.plan.total,
                  'kv': rt.plan.kv_bytes, 'graph': rt.plan.graph,
                  'new': int(gen.tokens.shape[1]), 'torch': 'torch' in sys.modules}))
"""


PEAK_ORT = r"""
import json, sys
import numpy as np
from edgestack.core.decoding import DecoderContract, decode_steps
from edgestack.core.ort import cpu_session
from edgestack.profiler.probe import peak_rss as hwm
path, tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = hwm()
sess = cpu_session(path, threads)
contract = DecoderContract.from_session(sess)
prompt = np.asarray([[(7 * j) % 1000 + 10 for j in range(tokens // 2)]], np.int64)
n = 0
for _tok in decode_steps(lambda f: sess.run(contract.output_names(), f), contract, prompt,
                         tokens - tokens // 2, eos_token_ids=(), prefill_chunk=64):
    n += 1
print(json.dumps({'hwm': hwm(), 'base': base, 'new': n}))
"""


def gpt2_model() -> tuple[object, str]:
    """GPT-2 (pretrained if cached locally, else random gpt2-small shape), and which."""
    import transformers

    try:
        model = transformers.GPT2LMHeadModel.from_pretrained("gpt2", local_files_only=True)
        return model, "pretrained gpt2 (local Hugging Face cache)"
    except Exception:  # not in the cache: no download
        transformers.set_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        return model, "random weights, gpt2-small shape (no pretrained gpt2 in the local cache)"


def build(args: argparse.Namespace) -> tuple[Path, Path, str, dict]:
    """Export the uncompressed and the BitStack model, pack the latter."""
    import copy

    import torch

    from edgestack.compress import compress
    from edgestack.exporter import export_decoder
    from edgestack.pipeline import pack_model

    WORK.mkdir(parents=True, exist_ok=True)
    fp32, pkg = WORK / "gpt2-fp32.onnx", WORK / f"gpt2-bitstack-{args.max_context}.pkg"
    info_file = WORK / "build.json"
    fpkg = float_pkg(pkg)
    if (fp32.exists() and pkg.exists() and fpkg.exists() and INT8.exists()
            and info_file.exists()
            and not args.rebuild):
        info = json.loads(info_file.read_text())
        return fp32, pkg, info["model"], info
    model, what = gpt2_model()
    model.config._attn_implementation = "eager"
    model.eval()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    export_decoder(model, fp32, log=lambda _: None, parity=False, overwrite=True)
    t1 = time.perf_counter()
    small = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress(small, "bitstack", n_blocks=args.blocks, k=args.rank)
    t2 = time.perf_counter()
    onnx_c = WORK / "gpt2-bitstack.onnx"
    export_decoder(small, onnx_c, log=lambda _: None, parity=False, overwrite=True)
    pack_model(onnx_c, pkg, max_context=args.max_context, overwrite=True,
               log=lambda _: None)
    pack_model(onnx_c, fpkg, max_context=args.max_context, overwrite=True,
               tied_tables="float", log=lambda _: None)
    t3 = time.perf_counter()
    ort_int8(fp32, INT8)
    info = {"model": what, "blocks": args.blocks, "rank": args.rank,
            "layers": len(report.layers), "export_fp32_s": t1 - t0,
            "compress_s": t2 - t1, "export_pack_s": t3 - t2,
            "ort_int8_s": time.perf_counter() - t3}
    info_file.write_text(json.dumps(info))
    return fp32, pkg, what, info


def float_pkg(pkg: Path) -> Path:
    """The same model packed with its tied table float (``tied_tables="float"``)."""
    return pkg.with_name(pkg.stem + "-float.pkg")


def tied_table_error(pkg: Path, args: argparse.Namespace) -> dict:
    """The int8 tied table's error: the logits of the package and of its float-table twin
    (the int8 plan, no budget) at every step of the same forced token sequence (a prompt,
    then ``--new`` steps fed fixed tokens): cosine per step and top-1 agreement."""
    from edgestack.core.decoding import decode_steps
    from edgestack.runtime import Runtime

    rng = np.random.default_rng(1)
    prompt = rng.integers(10, 1000, size=(1, args.prompt))
    forced = rng.integers(10, 1000, size=args.new)
    logits: list[np.ndarray] = []
    for path in (pkg, float_pkg(pkg)):
        with Runtime(path, threads=args.threads, calibrate=False) as rt:
            dec = rt.package.manifest.runtime.decoder
            contract, got = dec.decoder_contract(), []
            names = contract.output_names()
            tokens = iter(forced)

            def pick(lg: np.ndarray, got: list = got, tokens=tokens) -> np.ndarray:
                got.append(np.array(lg, np.float64))
                return np.array([next(tokens)])

            def run(feeds: dict, rt: Runtime = rt, names: list = names) -> list:
                out = rt.infer(feeds)
                return [out[n] for n in names]

            for _ in decode_steps(run, contract, prompt, args.new, pick=pick,
                                  eos_token_ids=(), prefill_chunk=dec.prefill_chunk):
                pass
            logits.append(np.concatenate(got))
    a, b = logits
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"steps": len(a), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "max_abs_error_over_max_abs": float(np.abs(a - b).max() / np.abs(b).max())}


def ort_int8(fp32: Path, out: Path) -> None:
    """ONNX Runtime's dynamic int8 model of ``fp32`` (per channel, QInt8 weights), its
    weights in external data (memory-mapped when served), built quietly as the bench
    builds its baselines."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgestack.core.logs import no_root_config, quiet_loggers
    from edgestack.profiler.bench import save_external

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("quantized.tmp.onnx")
    with quiet_loggers(("onnxruntime.quantization", "root"), logging.WARNING), \
            no_root_config():
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=True)
    save_external(onnx.load(str(tmp)), out)
    for f in tmp.parent.glob("quantized.tmp.*"):
        f.unlink()


def budgets(pkg: Path, args: argparse.Namespace) -> tuple[object, list[tuple[int, int]]]:
    """This machine's calibrated costs and ``(tier, budget)`` for 3 tiers: each tier's
    smallest plan + 1 MiB."""
    from edgestack.package import Package
    from edgestack.runtime import calibrate, smallest_plan

    p = Package.open(pkg)
    costs = calibrate(p, threads=args.threads)
    n = len(p.tiers)
    return costs, [(t, smallest_plan(p, t, costs).total + 2**20) for t in (0, n // 2, n - 1)]


def speed(fp32: Path, pkg: Path, args: argparse.Namespace, budgets: list[int]) -> list[dict]:
    """Prefill and decode tokens/s of each subject, interleaved rounds, one process; the
    package is also served at each of ``budgets`` (bytes)."""
    from edgestack.core.decoding import DecoderContract, decode_steps
    from edgestack.core.ort import cpu_session
    from edgestack.runtime import Runtime

    prompt = np.asarray([[(7 * j) % 1000 + 10 for j in range(args.prompt)]], np.int64)
    subjects: dict[str, object] = {}
    sess = cpu_session(fp32, args.threads, spinning="on")
    sess8 = cpu_session(INT8, args.threads, spinning="on")
    contract = DecoderContract.from_session(sess)
    names = contract.output_names()
    rt_fast = Runtime(pkg, threads=args.threads, calibrate=False)   # fastest plan
    rt_fp32 = Runtime(pkg, threads=args.threads, calibrate=False, form="fp32")
    rt_budgets = [Runtime(pkg, b, threads=args.threads) for b in budgets]
    # the same two plans with ONNX Runtime's prepacking off (the speed prepacking buys)
    rt_fast_pp = Runtime(pkg, threads=args.threads, calibrate=False, prepack="off")
    rt_fp32_pp = Runtime(pkg, threads=args.threads, calibrate=False, form="fp32",
                         prepack="off")
    rt_float = Runtime(float_pkg(pkg), threads=args.threads, calibrate=False)
    chunk = rt_fast.package.manifest.runtime.decoder.prefill_chunk

    def ort_run(session: object) -> object:
        def go(n: int) -> tuple[float, float, np.ndarray]:
            t0 = time.perf_counter()
            first, toks = None, []
            for tok in decode_steps(lambda f: session.run(names, f), contract, prompt, n,
                                    eos_token_ids=(), prefill_chunk=chunk):
                toks.append(tok)
                first = first or time.perf_counter()
            return first - t0, time.perf_counter() - first, np.stack(toks, 1)
        return go

    def rt_run(rt: Runtime) -> object:
        def go(n: int) -> tuple[float, float, np.ndarray]:
            g = rt.generate(prompt, n, stop=())
            return g.prefill_seconds, g.decode_seconds, g.tokens
        return go

    subjects = {"ORT fp32 (uncompressed)": ort_run(sess),
                "ORT int8 per-channel (uncompressed)": ort_run(sess8),
                f"edgestack tier {rt_fast.tier} {rt_fast.plan.graph}": rt_run(rt_fast),
                f"edgestack tier {rt_fp32.tier} {rt_fp32.plan.graph}": rt_run(rt_fp32),
                **{f"edgestack {b / 2**20:.1f} MiB: tier {rt.tier} {rt.plan.graph}":
                   rt_run(rt) for b, rt in zip(budgets, rt_budgets, strict=True)},
                f"edgestack tier {rt_fast_pp.tier} {rt_fast_pp.plan.graph}, prepack off":
                    rt_run(rt_fast_pp),
                f"edgestack tier {rt_fp32_pp.tier} {rt_fp32_pp.plan.graph}, prepack off":
                    rt_run(rt_fp32_pp),
                f"edgestack tier {rt_float.tier} {rt_float.plan.graph}, tied table float":
                    rt_run(rt_float)}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in subjects}
    for fn in subjects.values():
        fn(4)   # warm-up
    for _ in range(args.rounds):
        for name, fn in subjects.items():
            pre, dec, toks = fn(args.new)
            times[name].append((pre, dec))
    rows = []
    for name, ts in times.items():
        pre = float(np.median([t[0] for t in ts]))
        dec = float(np.median([t[1] for t in ts]))
        rows.append({"subject": name, "prefill_s": pre, "decode_s": dec,
                     "prefill_tokens_per_s": args.prompt / pre,
                     "decode_tokens_per_s": (args.new - 1) / dec})
    base = rows[0]
    for r in rows:
        r["decode_vs_ort_fp32"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["prefill_vs_ort_fp32"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
    rows.append({"plans": {"fast": rt_fast.plan.to_dict(), "fp32": rt_fp32.plan.to_dict(),
                           "budgets": [rt.plan.to_dict() for rt in rt_budgets]}})
    for rt in (rt_fast, rt_fp32, *rt_budgets, rt_fast_pp, rt_fp32_pp, rt_float):
        rt.close()
    return rows


def peak(pkg: str, budget: int, tokens: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PEAK, pkg, str(budget), str(tokens),
                          str(threads)], capture_output=True, text=True, check=True,
                         timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def ort_int8_peak(tokens: int, threads: int) -> dict:
    """ORT's int8 model generating to ``tokens`` in a fresh process: its peak RSS above the
    imports (``peak_increase``)."""
    out = subprocess.run([sys.executable, "-c", PEAK_ORT, str(INT8), str(tokens),
                          str(threads)], capture_output=True, text=True, check=True,
                         timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"peak_increase": got["hwm"] - got["base"], "new": got["new"]}


def memory(pkg: Path, args: argparse.Namespace, costs: object,
           planned: list[tuple[int, int]], ort: dict) -> dict:
    from edgestack.package import Package
    from edgestack.runtime import plan_memory

    p = Package.open(pkg)
    ctx = p.manifest.runtime.decoder.max_context
    rows = []
    for tier, budget in planned:
        plan = plan_memory(p, budget, costs=costs)
        run = peak(str(pkg), budget, ctx, args.threads)
        inc = run["hwm"] - run["base"]
        rows.append({"tier_planned": tier, "budget": budget, "tier": run["tier"],
                     "plan": run["plan"], "peak_increase": inc, "within_budget": inc <= budget,
                     "peak_over_plan": inc / run["plan"], "kv_line": run["kv"],
                     "graph": run["graph"], "context_fit": [list(c) for c in plan.context_fit]})
    # the cache's share: to max_context vs to 1/8 of it, at the top budget
    top = rows[-1]["budget"]
    short = peak(str(pkg), top, max(2, ctx // 8), args.threads)
    full = peak(str(pkg), top, ctx, args.threads)
    per_copy = p.manifest.runtime.decoder.kv_bytes_per_token * (ctx - max(2, ctx // 8))
    grew = (full["hwm"] - full["base"]) - (short["hwm"] - short["base"])
    # equal memory: ORT's int8 model generating to max_context, and the package served with
    # that peak as its budget
    ort_peak = ort["peak_increase"]
    try:
        run = peak(str(pkg), ort_peak, ctx, args.threads)
        at = {"tier": run["tier"], "graph": run["graph"], "plan": run["plan"],
              "peak_increase": run["hwm"] - run["base"],
              "within_budget": run["hwm"] - run["base"] <= ort_peak}
    except subprocess.CalledProcessError as exc:   # below the smallest tier: BudgetError
        at = {"refused": (exc.stderr or "").strip().splitlines()[-1][:300]}
    return {"costs": costs.to_dict(), "budgets": rows,
            "kv_measured": {"tokens": [max(2, ctx // 8), ctx], "rss_growth": grew,
                            "one_copy_bytes": per_copy, "copies": grew / per_copy},
            "ort_int8": {**ort, "package_at_that_budget": at}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-context", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    from edgestack.core.latency import cpu_extensions

    fp32, pkg, what, info = build(args)
    print(f"model: {what}; build {info}", flush=True)
    costs, planned = budgets(pkg, args)
    ort = ort_int8_peak(args.max_context, args.threads)   # equal memory: its peak a budget
    timed = [planned[-1][1], *([ort["peak_increase"]] if ort["peak_increase"] >= planned[0][1]
                               else []), planned[0][1]]
    result = {"model": what, "build": info, "threads": args.threads,
              "cpu_extensions": cpu_extensions(), "max_context": args.max_context,
              "prompt": args.prompt, "new": args.new, "rounds": args.rounds,
              "speed": speed(fp32, pkg, args, timed)}
    result["tied_table_int8_vs_float"] = tied_table_error(pkg, args)
    print("tied table int8 vs float (logits):", result["tied_table_int8_vs_float"], flush=True)
    for r in result["speed"][:-1]:
        print(f"{r['subject']:<40} prefill {r['prefill_tokens_per_s']:8.1f} tok/s "
              f"({r['prefill_vs_ort_fp32']:.2f}x)  decode {r['decode_tokens_per_s']:7.1f} "
              f"tok/s ({r['decode_vs_ort_fp32']:.2f}x)", flush=True)
    if not args.skip_memory:
        result["memory"] = memory(pkg, args, costs, planned, ort)
        for r in result["memory"]["budgets"]:
            print(f"budget {r['budget'] / 2**20:7.1f} MiB: tier {r['tier']} ({r['graph']}), "
                  f"peak +{r['peak_increase'] / 2**20:6.1f} MiB ({r['peak_over_plan']:.2f} of "
                  f"plan), within budget: {r['within_budget']}")
        print("kv measured:", result["memory"]["kv_measured"])
        print("ORT int8 per-channel and the package at its peak:", result["memory"]["ort_int8"])
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
