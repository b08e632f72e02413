"""``edgestack quality``: compression quality vs the uncompressed model, with baselines.

Runs torch only (no ONNX). For a model with a ``tokenizer.json`` (a Hugging Face folder or
the built-in ``minilm``) the metric is the mean-pooled sentence-embedding cosine vs fp32 on
the held sentence set and the Spearman correlation of pairwise similarities; otherwise the
cosine of the model's first output on its example inputs. Calibration batches come from
the corpus shipped with edgestack (``edgestack/data/calib.txt``) for text models, else the
example inputs. The measurement is :mod:`edgestack.compress.quality`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgestack.cli import (
    COUNT,
    EXIT_OK,
    NONNEG,
    POSITIVE,
    bounds,
    emit_json,
    prepare_output,
    progress,
)
from edgestack.cli.export import TASK_NAMES
from edgestack.core import atomic

METHODS = ("shift", "bitstack", "lowrank", "prune")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quality",
        help="measure compression quality vs the fp32 model, with int8/int4 baselines",
        description="Compress MODEL with --method (or every method with --all) and report "
        "bits per weight, bytes and quality vs the uncompressed model, next to int8 "
        "per-channel and int4 RTN (group 32 and 128) baselines computed in the same run.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="Hugging Face model folder, module:factory or built-in name (minilm, "
                   "gpt2-tiny, small-cnn, conv1d-net)")
    p.add_argument("--method", choices=METHODS, default=None, help="compression method")
    p.add_argument("--all", action="store_true",
                   help="the full comparison: baselines and every method (minutes)")
    p.add_argument("--max-drop", type=float, default=None, metavar="D",
                   help="accuracy-aware search: the smallest configuration (bits per weight) "
                   "across methods, bits and BitStack tiers whose metric drop vs fp32 is at "
                   "most D (cosine or accuracy: absolute; perplexity: relative), with the "
                   "table searched (minutes)")
    p.add_argument("--no-baselines", action="store_true", help="skip the int8/int4 baselines")
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
    g.add_argument("--tiers", default=None,
                   help="bitstack: comma-separated tiers to score: whole levels (int) or bit "
                   "budgets (float), e.g. 2,3,4.5")
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
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-n", type=int, default=128,
                   help="calibration sentences from the shipped corpus (default 128)")
    c.add_argument("--calib-seq", type=int, default=64, help="tokens per sentence (default 64)")
    c.add_argument("--extra-texts", type=int, default=None,
                   help="any method: more corpus sentences for the pass only (compress()'s "
                   "extra_texts: the baselines and --calib-n are unchanged; text models)")
    e = p.add_argument_group("evaluation on your data")
    e.add_argument("--eval", default=None, metavar="FILE",
                   help="measure on FILE with the task's metric: JSONL with a text field and "
                   "a label for a classifier (accuracy), text lines or JSONL for a language "
                   "model (perplexity) or an encoder (sentence-embedding cosine vs fp32); an "
                   "fp32 row gives the uncompressed model's value")
    e.add_argument("--task", choices=TASK_NAMES, default=None,
                   help="the model's task (default: from the class it was saved as)")
    p.add_argument("--out", default=None, help="also write the JSON rows to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)
    bounds(p, calib_n=NONNEG, calib_seq=COUNT, extra_texts=NONNEG, finetune_steps=NONNEG,
           finetune_lr=POSITIVE, max_seconds=POSITIVE)


def _flags(args: argparse.Namespace) -> list[tuple[str, object, dict[str, str | None]]]:
    """``(flag, value or None when not given, {method: compress() option or None})``: the
    method options of the command line and the methods they apply to (None: not an option
    of compress(), e.g. ``--tiers``), in the order of each method's options."""
    no_act = False if args.no_act_aware else None
    return [
        ("--bits", args.bits, {"shift": "bits"}),
        ("--zero", args.zero or None, {"shift": "zero"}),
        ("--rounding", args.rounding, {"shift": "rounding"}),
        ("--finetune-steps", args.finetune_steps,
         {"shift": "finetune_steps", "bitstack": "finetune_steps"}),
        ("--finetune-lr", args.finetune_lr, {"shift": "finetune_lr", "bitstack": "finetune_lr"}),
        ("--max-seconds", args.max_seconds, {"shift": "max_seconds", "bitstack": "max_seconds"}),
        ("--seed", args.seed, {"shift": "seed", "bitstack": "seed"}),
        ("--blocks", args.blocks, {"bitstack": "n_blocks"}),
        ("--k", args.k, {"bitstack": "k"}),
        ("--factor-bits", args.factor_bits, {"bitstack": "factor_bits"}),
        ("--signs", args.signs, {"bitstack": "signs"}),
        ("--tiers", args.tiers, {"bitstack": None}),
        ("--rank", args.rank, {"lowrank": "rank"}),
        ("--ratio", args.ratio, {"lowrank": "ratio", "prune": "ratio"}),
        ("--energy", args.energy, {"lowrank": "energy"}),
        ("--structure", args.structure, {"lowrank": "structure"}),
        ("--metric", args.metric, {"prune": "metric"}),
        ("--adaptive", True if args.adaptive else None, {"prune": "adaptive"}),
        ("--no-act-aware", no_act, {"bitstack": "act_aware", "lowrank": "act_aware"}),
        ("--extra-texts", args.extra_texts, {m: "extra_texts" for m in METHODS}),
    ]


def method_options(args: argparse.Namespace) -> dict:
    """compress() options for ``args.method`` from the command line."""
    from edgestack.errors import CompressError

    flags = _flags(args)
    allowed = {flag for flag, _v, methods in flags if args.method in methods}
    stray = [flag for flag, v, _m in flags if v is not None and flag not in allowed]
    if stray:
        raise CompressError(f"option(s) {', '.join(stray)} do not apply to --method "
                            f"{args.method}; it takes {', '.join(sorted(allowed))}")
    opts = {methods[args.method]: v for _f, v, methods in flags
            if v is not None and methods.get(args.method) is not None}
    if args.skip:
        opts["skip"] = tuple(args.skip)
    return opts


def _parse_tiers(text: str | None) -> tuple:
    if not text:
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        out.append(float(part) if "." in part else int(part))
    return tuple(out)


_log = progress("quality")


def _eval_file(src: object, model_dir: Path | None, path: str, task: str | None
               ) -> tuple[object, str]:
    """The evaluator and metric of ``quality --eval FILE`` for the model's task."""
    from edgestack.compress.calib import read_calib_file
    from edgestack.compress.hf import detect_task
    from edgestack.compress.quality import EmbeddingEval, TaskEval
    from edgestack.errors import CompressError

    if model_dir is None:
        raise CompressError(f"--eval {path}: {src.description} has no tokenizer.json to read "
                            "the file with; --eval needs a Hugging Face text model folder")
    task = task or detect_task(src.model.config)
    if task == "feature-extraction":
        texts = read_calib_file(path)[1]
        return (EmbeddingEval.for_model(src.model, model_dir, sentences=texts),
                f"mean-pooled sentence-embedding cosine vs fp32 on {len(texts)} texts of {path}")
    ev = TaskEval.from_file(src.model, model_dir, path, task)
    what = "accuracy" if task == "text-classification" else "perplexity"
    return ev, f"{what} on {path} ({task})"


def run(args: argparse.Namespace) -> int:
    from edgestack.compress.quality import (
        BASELINES,
        EmbeddingEval,
        OutputEval,
        QualityConfig,
        markdown_table,
        quality_rows,
        search_configs,
        smallest_within,
        suite_configs,
    )
    from edgestack.errors import CompressError
    from edgestack.sources import load_source

    modes = [m for m, on in (("--method", args.method is not None), ("--all", args.all),
                             ("--max-drop", args.max_drop is not None)) if on]
    if len(modes) != 1:
        raise CompressError(f"quality: give one of --method METHOD, --all or --max-drop D; "
                            f"found {', '.join(modes) or 'none'}")
    if args.max_drop is not None and not 0 <= args.max_drop < 1:
        raise CompressError(f"--max-drop: expected a number in [0, 1), found {args.max_drop}")
    if args.eval is not None and not Path(args.eval).is_file():
        raise CompressError(f"--eval file {args.eval!r} does not exist")
    if args.out is not None:
        prepare_output(args.out, [args.model, args.eval], overwrite=args.overwrite)
    src = load_source(args.model, task=args.task)
    model_dir = src.text_folder
    calib, _ = src.calibration(args.calib_n, args.calib_seq)
    reference: list[QualityConfig] = []
    if args.eval is not None:
        evaluator, metric = _eval_file(src, model_dir, args.eval, args.task)
        reference = [QualityConfig("fp32", "fp32", {})]
    elif model_dir is not None:
        evaluator = EmbeddingEval.for_model(src.model, model_dir)
        metric = "mean-pooled sentence-embedding cosine vs fp32 on the held sentence set"
    else:
        evaluator = OutputEval.for_model(src.model, [src.inputs])
        metric = "cosine of the first output vs fp32 on the example inputs"
    skip = tuple(args.skip)
    sk = {"skip": skip} if skip else {}
    if args.max_drop is not None:
        configs = search_configs(skip)
        reference = reference or [QualityConfig("fp32", "fp32", {})]
    elif args.all:
        configs = suite_configs(skip)
    else:
        configs = [] if args.no_baselines else [
            QualityConfig(b, b, dict(sk)) for b in BASELINES]
        opts = method_options(args)
        tiers = _parse_tiers(args.tiers) if args.method == "bitstack" else ()
        configs.append(QualityConfig(f"{args.method} {opts}", args.method, opts, tiers=tiers))
    rows = quality_rows(src.model, evaluator.score, reference + configs, calib,
                        log=None if args.json else _log)
    doc = {"ok": True, "model": src.description, "metric": metric, "rows": rows}
    if args.max_drop is not None:
        best, table = smallest_within(rows, args.max_drop)
        doc.update(max_drop=args.max_drop, chosen=best, searched=table)
    if args.out is not None:
        data = (json.dumps(doc, indent=2, default=str) + "\n").encode()
        atomic.write_file(args.out, lambda f: f.write(data))
    if args.json:
        emit_json(doc)
    else:
        print(f"quality of {src.description} ({metric}):")
        print(markdown_table(rows))
        if args.max_drop is not None:
            print(f"smallest configuration within a drop of {args.max_drop}: "
                  + (f"{best['label']} ({best['bits_per_weight']:.3f} bits/weight, "
                     f"{best['metric']} drop {best['drop']:.4f})" if best else
                     "none of the searched configurations"))
    return EXIT_OK
