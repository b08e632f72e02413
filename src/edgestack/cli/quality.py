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
from edgestack.cli.options import METHODS, add_method_options, method_options
from edgestack.compress.options import check_options
from edgestack.core import atomic
from edgestack.errors import CompressError


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
                   "gpt2-tiny, small-cnn, conv1d-net, resnet-tiny, mobilenet-tiny)")
    p.add_argument("--method", choices=METHODS, default=None, help="compression method")
    p.add_argument("--all", action="store_true",
                   help="the full comparison: baselines and every method (minutes)")
    p.add_argument("--max-drop", type=float, default=None, metavar="D",
                   help="accuracy-aware search: the smallest configuration (bits per weight) "
                   "across methods, bits and BitStack tiers whose metric drop vs fp32 is at "
                   "most D (cosine or accuracy: absolute; perplexity: relative), with the "
                   "table searched (minutes)")
    p.add_argument("--no-baselines", action="store_true", help="skip the int8/int4 baselines")
    add_method_options(p)
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-n", type=int, default=128,
                   help="calibration sentences from the shipped corpus (default 128)")
    c.add_argument("--calib-seq", type=int, default=64, help="tokens per sentence (default 64)")
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


def _parse_tiers(text: str | None) -> tuple:
    if not text:
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        out.append(float(part) if "." in part else int(part))
    return tuple(out)


_log = progress("quality")


def run(args: argparse.Namespace) -> int:
    if args.method is not None:   # a flag the method does not take, a bad value: before torch
        check_options(args.method, **method_options(args))
    from edgestack.compress.quality import (  # lazy: torch at CLI start
        BASELINES,
        QualityConfig,
        choose_evaluator,
        markdown_table,
        quality_rows,
        search_configs,
        smallest_within,
        suite_configs,
    )
    from edgestack.sources import load_source  # lazy: tests patch edgestack.sources.load_source

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
    evaluator, metric = choose_evaluator(src.model, model_dir, src.inputs, args.eval,
                                         args.task, src.description)
    reference = [QualityConfig("fp32", "fp32", {})] if args.eval is not None else []
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
