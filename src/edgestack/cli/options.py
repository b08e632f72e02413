"""The one set of compression options of the command line (``export``, ``pack``, ``quality``,
``parity``, ``sensitivity``): :func:`add_method_options` adds them, :func:`method_options`
turns them into :func:`edgestack.compress.compress` options for a method, refusing the ones
that method does not take. Checking the values is :func:`edgestack.compress.options.check_options`'s
job (torch-free, before any model is loaded)."""

from __future__ import annotations

import argparse

from edgestack.errors import CompressError

METHODS = ("shift", "bitstack", "lowrank", "prune")


def add_method_options(p: argparse.ArgumentParser, tiers: bool = True) -> None:
    """The compression options every command that compresses takes (``export``, ``pack``,
    ``quality``, ``parity``, ``sensitivity``; ``tiers``: with ``quality``'s ``--tiers``),
    read back by :func:`method_options`."""
    g = p.add_argument_group("method options")
    g.add_argument("--bits", type=int, default=None, help="shift: code width 2..5")
    g.add_argument("--zero", action="store_true", help="shift: DeepShift codes with zero")
    g.add_argument("--rounding", choices=("auto", "nearest", "gptq"), default=None,
                   help="shift: auto (default: GPTQ when calibrated), nearest or GPTQ "
                   "(needs calibration)")
    g.add_argument("--finetune-steps", type=int, default=None,
                   help="shift: steps of STE fine-tune; bitstack: steps of factor fine-tune "
                   "(default 0)")
    g.add_argument("--finetune-lr", type=float, default=None,
                   help="shift/bitstack: peak learning rate of the fine-tune")
    g.add_argument("--finetune-act-quant", action="store_true",
                   help="shift: round the layer inputs during the fine-tune the way the int8 "
                   "serving graph does (ort-cpu int8=dynamic; use with --zero)")
    g.add_argument("--max-seconds", type=float, default=None,
                   help="shift/bitstack: time limit of the fine-tune")
    g.add_argument("--seed", type=int, default=None, help="shift/bitstack: fine-tune seed")
    g.add_argument("--blocks", type=int, default=None, help="bitstack: blocks per layer")
    g.add_argument("--k", type=int, default=None, help="bitstack: rank per block")
    g.add_argument("--factor-bits", type=float, default=None,
                   help="bitstack: factor bits per weight per block, sets k by shape "
                   "(default 0.25; 0.125 is best on MiniLM)")
    g.add_argument("--signs", choices=("auto", "gptq", "plain"), default=None,
                   help="bitstack: how block signs are chosen (default auto)")
    if tiers:
        g.add_argument("--tiers", default=None,
                       help="bitstack: comma-separated tiers to score: whole levels (int) or "
                       "bit budgets (float), e.g. 2,3,4.5")
    g.add_argument("--rank", type=int, default=None, help="lowrank: rank for every layer")
    g.add_argument("--ratio", type=float, default=None,
                   help="fraction of each layer's parameters removed (lowrank: the rank "
                   "keeps at most 1-R, default 0.5; prune: heads/channels removed, default "
                   "0.25)")
    g.add_argument("--energy", type=float, default=None,
                   help="lowrank: rank from the spectrum (WeLore split)")
    g.add_argument("--structure", choices=("lowrank", "monarch"), default=None,
                   help="lowrank: low-rank factors or Monarch")
    g.add_argument("--metric", choices=("auto", "weight", "activation", "fluctuation"),
                   default=None, help="prune: importance metric")
    g.add_argument("--adaptive", action="store_true",
                   help="prune: FLAP's global standardized ratios")
    g.add_argument("--no-act-aware", action="store_true",
                   help="bitstack/lowrank: ignore calibration statistics")
    g.add_argument("--skip", action="append", default=[], metavar="PREFIX",
                   help="leave modules whose name starts with PREFIX dense (repeatable)")
    g.add_argument("--extra-texts", type=int, default=None,
                   help="text models, any method: more corpus sentences for the pass's "
                   "statistics beyond the calibration batches (compress()'s extra_texts; "
                   "baselines and --calib-n unchanged)")


def _flags(args: argparse.Namespace) -> list[tuple[str, object, dict[str, str | None]]]:
    """``(flag, value or None when not given, {method: compress() option or None})``: the
    method options of the command line and the methods they apply to (None: not an option
    of compress(), e.g. ``--tiers``), in the order of each method's options."""
    no_act = False if getattr(args, "no_act_aware", False) else None
    return [
        ("--bits", args.bits, {"shift": "bits"}),
        ("--zero", args.zero or None, {"shift": "zero"}),
        ("--rounding", args.rounding, {"shift": "rounding"}),
        ("--finetune-steps", args.finetune_steps,
         {"shift": "finetune_steps", "bitstack": "finetune_steps"}),
        ("--finetune-lr", args.finetune_lr, {"shift": "finetune_lr", "bitstack": "finetune_lr"}),
        ("--finetune-act-quant", True if args.finetune_act_quant else None,
         {"shift": "finetune_act_quant"}),
        ("--max-seconds", args.max_seconds, {"shift": "max_seconds", "bitstack": "max_seconds"}),
        ("--seed", args.seed, {"shift": "seed", "bitstack": "seed"}),
        ("--blocks", args.blocks, {"bitstack": "n_blocks"}),
        ("--k", args.k, {"bitstack": "k"}),
        ("--factor-bits", args.factor_bits, {"bitstack": "factor_bits"}),
        ("--signs", args.signs, {"bitstack": "signs"}),
        ("--tiers", getattr(args, "tiers", None), {"bitstack": None}),
        ("--rank", args.rank, {"lowrank": "rank"}),
        ("--ratio", args.ratio, {"lowrank": "ratio", "prune": "ratio"}),
        ("--energy", args.energy, {"lowrank": "energy"}),
        ("--structure", args.structure, {"lowrank": "structure"}),
        ("--metric", args.metric, {"prune": "metric"}),
        ("--adaptive", True if args.adaptive else None, {"prune": "adaptive"}),
        ("--no-act-aware", no_act, {"bitstack": "act_aware", "lowrank": "act_aware"}),
        ("--extra-texts", args.extra_texts, {m: "extra_texts" for m in METHODS}),
    ]


def method_options(args: argparse.Namespace, method: str | None = None) -> dict:
    """compress() options for ``method`` (default ``method``) from the command line;
    CompressError naming the flags given that the method does not take."""
    method = method or args.method
    flags = [f for f in _flags(args)  # only the flags this command has
             if hasattr(args, f[0].lstrip("-").replace("-", "_"))]
    allowed = {flag for flag, _v, methods in flags if method in methods}
    stray = [flag for flag, v, _m in flags if v is not None and flag not in allowed]
    if stray:
        raise CompressError(f"option(s) {', '.join(stray)} do not apply to --method "
                            f"{method}; it takes {', '.join(sorted(allowed))}")
    opts = {methods[method]: v for _f, v, methods in flags
            if v is not None and methods.get(method) is not None}
    if args.skip:
        opts["skip"] = tuple(args.skip)
    return opts
