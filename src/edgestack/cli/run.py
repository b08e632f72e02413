"""``edgestack run``: load a package within a budget and run it on inputs from a file."""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

from edgestack.cli import (
    COUNT,
    EXIT_OK,
    NONNEG,
    bounds,
    emit_json,
    prepare_output,
    printable,
)
from edgestack.cli.plan import add_package_args
from edgestack.cli.verify import check_golden, golden_inputs_of
from edgestack.core import atomic
from edgestack.errors import TargetError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="load a package within a memory budget and run it on an input file",
        description="Load PKG with the plan for the budget (largest tier that fits) and run "
        "it on --input (an .npz mapping graph input names to arrays; default: the package's "
        "golden inputs). Prints the plan, timings and output summaries; --output saves the "
        "outputs as .npz. A text-generation package with a tokenizer generates from "
        "--prompt instead: the text streams to stdout (greedy, or sampled with "
        "--temperature/--top-k/--top-p/--seed), then prefill and decode tokens/s on stderr.",
    )
    add_package_args(p)
    p.add_argument("--input", default=None, help=".npz of inputs (default: golden inputs)")
    p.add_argument("--output", default=None,
                   help="write the outputs to this .npz (never an input, nor inside the "
                   "package; written whole)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--repeat", type=int, default=1, help="run N times, report the median")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    g = p.add_argument_group("text generation (a decoder package with a tokenizer)")
    g.add_argument("--prompt", default=None, metavar="TEXT",
                   help="generate a continuation of TEXT (instead of --input)")
    g.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="the most new tokens (default 32; prompt + new <= the package's "
                   "max_context)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 (default): greedy; else sample at this temperature")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample from the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="the sampler's seed (same seed, same text)")
    p.set_defaults(run=run)
    bounds(p, repeat=COUNT, max_new_tokens=COUNT, top_k=COUNT, seed=NONNEG)


def run(args: argparse.Namespace) -> int:
    from edgestack.runtime import Runtime  # lazy: keeps CLI start light
    from edgestack.targets.feeds import load_feeds  # lazy: keeps CLI start light

    if args.prompt is not None:
        return run_prompt(args)

    if args.output is not None:
        prepare_output(args.output, [args.package, args.input, args.profile],
                       overwrite=args.overwrite, kind="file", flag="--output")
    given = load_feeds(args.input) if args.input else None      # bad input fails before loading
    t0 = time.perf_counter()
    with Runtime(args.package, args.budget, profile=args.profile, auto=args.auto,
                 tier=args.tier, threads=args.threads, calibrate=args.calibrate,
                 form=args.form, engine=args.engine, precision=args.precision) as rt:
        load_s = time.perf_counter() - t0
        feeds = given
        if feeds is None:
            feeds = rt.package.golden()[0]
            check_golden(rt.package.path, "inputs", feeds)
        times = []
        with contextlib.nullcontext() if given is not None else golden_inputs_of(
                rt.package.path):
            for _ in range(args.repeat):
                t = time.perf_counter()
                out = rt.infer(feeds)
                times.append(time.perf_counter() - t)
        if args.output is not None:
            atomic.write_file(args.output, lambda f: np.savez(f, **out))
        summary = {k: {"shape": list(v.shape), "dtype": str(v.dtype),
                       "mean": float(np.mean(v)), "std": float(np.std(v))}
                   for k, v in out.items()}
        median_ms = float(np.median(times) * 1000)
        if args.json:
            emit_json({"ok": True, "tier": rt.tier, "engine": rt.engine,
                       "precision": rt.precision, "plan": rt.plan.to_dict(),
                       "load_seconds": load_s, "median_ms": median_ms, "outputs": summary,
                       "bytes_read": rt.bytes_read})
        else:
            print(rt.plan.table())
            print(f"loaded in {load_s:.2f} s ({rt.bytes_read} block bytes read); "
                  f"infer median {median_ms:.2f} ms over {len(times)} run(s)")
            for k, s in summary.items():
                print(printable(f"  {k}: {s['shape']} {s['dtype']} mean {s['mean']:.4g} std "
                                f"{s['std']:.4g}"))
    return EXIT_OK


def run_prompt(args: argparse.Namespace) -> int:
    """``run --prompt``: encode the text with the package's tokenizer, generate, stream the
    decoded text to stdout (``--json``: one object with tokens, text, tokens/s, tier,
    plan)."""
    import sys

    from edgestack.package import Package  # lazy: keeps CLI start light
    from edgestack.runtime import Runtime, package_tokenizer  # lazy: keeps CLI start light

    bad = [f for f, v in (("--input", args.input), ("--output", args.output)) if v]
    if bad or args.repeat != 1:
        raise TargetError(f"run: --prompt generates text; {', '.join(bad) or '--repeat'} "
                          "applies to --input runs only")
    with Package.open(args.package) as pkg:    # a bad package fails before loading
        tok = package_tokenizer(pkg)
    ids = tok.encode(args.prompt).ids
    if not ids:
        raise TargetError("run: --prompt encodes to no tokens; give some text")
    t0 = time.perf_counter()
    with Runtime(args.package, args.budget, profile=args.profile, auto=args.auto,
                 tier=args.tier, threads=args.threads, calibrate=args.calibrate,
                 form=args.form, engine=args.engine, precision=args.precision) as rt:
        load_s = time.perf_counter() - t0
        shown = ""
        made: list[int] = []

        def show(step: np.ndarray) -> None:
            nonlocal shown
            made.append(int(step[0]))
            text = tok.decode(made)
            if not args.json and text.startswith(shown):   # stream what is new
                sys.stdout.write(printable(text[len(shown):]))
                sys.stdout.flush()
                shown = text

        gen = rt.generate([ids], args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=show)
        tokens = gen.tokens[0, :gen.lengths[0]].tolist()
        text = tok.decode(tokens)
        if args.json:
            emit_json({"ok": True, "prompt": args.prompt, "prompt_tokens": ids,
                       "tokens": tokens, "text": text, "tier": gen.tier,
                       "load_seconds": load_s, "prefill_tokens_per_s": gen.prefill_tokens_per_s,
                       "decode_tokens_per_s": gen.decode_tokens_per_s,
                       "generation": gen.to_dict(), "plan": rt.plan.to_dict()})
        else:
            sys.stdout.write("\n")
            print(f"tier {gen.tier}: {len(ids)} prompt tokens, {len(tokens)} new; prefill "
                  f"{gen.prefill_tokens_per_s:.1f} tokens/s, decode "
                  f"{gen.decode_tokens_per_s:.1f} tokens/s (loaded in {load_s:.2f} s)",
                  file=sys.stderr)
    return EXIT_OK
