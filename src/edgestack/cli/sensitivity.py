"""``edgestack sensitivity``: which layers lose the most quality when compressed, by method.

Compresses one layer at a time (one prunable structure for ``prune``), every other layer
left fp32, and ranks the layers by the model's metric drop vs fp32, measured like
``edgestack quality``. The measurement is :mod:`edgestack.profiler.sensitivity`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgestack.cli import EXIT_OK, emit_json, prepare_output, progress
from edgestack.cli.export import TASK_NAMES
from edgestack.cli.options import METHODS, add_method_options, method_options
from edgestack.compress.options import check_int, check_options
from edgestack.core import atomic
from edgestack.errors import CompressError

_log = progress("sensitivity")

DIGITS = 7
"""Decimals of a cosine in the ranking (one layer's drop is often below the quality table's
1e-5 resolution)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sensitivity",
        help="rank layers by the quality lost when only that layer is compressed",
        description="Compress ONE layer of MODEL at a time with --method and its options "
        "(every other layer left fp32; for prune, one prunable structure: an attention "
        "block's heads or an MLP's channels), measure the model's metric as `edgestack "
        "quality` does (sentence-embedding cosine vs fp32 for a text encoder, --eval FILE's "
        "task metric, else the first output's cosine) and print the layers sorted by the "
        "drop vs fp32: layer, shape, params, bits/weight, metric, drop. The calibration "
        "batches run once for all layers.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="Hugging Face model folder, module:factory or built-in name (minilm, "
                   "gpt2-tiny, small-cnn, conv1d-net, resnet-tiny, mobilenet-tiny)")
    p.add_argument("--method", choices=METHODS, required=True, help="compression method")
    add_method_options(p, tiers=False)
    p.add_argument("--layers", action="append", default=[], metavar="PATTERN",
                   help="score only layers whose module name matches this fnmatch pattern, "
                   "e.g. 'encoder.layer.0.*' (repeatable; default: every compressible layer)")
    p.add_argument("--top", type=int, default=None, metavar="N",
                   help="print only the N most sensitive layers (the JSON keeps them all)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default=None, metavar="FILE",
                   help="calibrate on FILE: text lines, JSONL with a text field (tokenized "
                   "with the model's tokenizer.json), or an .npz of model inputs")
    c.add_argument("--calib-n", type=int, default=128,
                   help="calibration sentences from the shipped corpus or --calib (default "
                   "128)")
    c.add_argument("--calib-seq", type=int, default=64, help="tokens per sentence (default 64)")
    e = p.add_argument_group("evaluation on your data")
    e.add_argument("--eval", default=None, metavar="FILE",
                   help="measure with the task's metric on FILE, as `edgestack quality --eval`")
    e.add_argument("--task", choices=TASK_NAMES, default=None,
                   help="the model's task (default: from the class it was saved as)")
    p.add_argument("--out", default=None, metavar="FILE.md",
                   help="also write the table (markdown; every row) to this file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (only a file, never an input)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)


def check_args(args: argparse.Namespace) -> dict:
    """Every argument, checked before the model is loaded; returns compress() options.

    Raises:
        EdgestackError: a bad value (the message says which and what was expected).
    """
    opts = method_options(args)
    check_options(args.method, **opts)
    if args.top is not None:
        check_int("--top", args.top, 1, None)
    check_int("--calib-n", args.calib_n, 0, None, "0 calibrates on the example inputs")
    check_int("--calib-seq", args.calib_seq, 1, None)
    bad = [pat for pat in args.layers if not pat.strip()]
    if bad:
        raise CompressError("--layers: expected a non-empty fnmatch pattern such as "
                            "'encoder.layer.0.*', found ''")
    for flag, path in (("--eval", args.eval), ("--calib", args.calib)):
        if path is not None and not Path(path).is_file():
            raise CompressError(f"{flag} file {path!r} does not exist; expected a readable "
                                "file")
    if args.out:
        prepare_output(args.out, [args.model, args.eval, args.calib],
                       overwrite=args.overwrite)
    return opts


def run(args: argparse.Namespace) -> int:
    opts = check_args(args)

    from edgestack.compress.quality import choose_evaluator  # lazy: torch at CLI start
    from edgestack.profiler.sensitivity import layer_sensitivity  # lazy: torch at CLI start
    from edgestack.sources import load_source  # lazy: tests patch edgestack.sources.load_source

    say = _log if not args.json else (lambda _m: None)
    say(f"loading {args.model}")
    src = load_source(args.model, task=args.task)
    calib, calib_what = src.calibration(args.calib_n, args.calib_seq, file=args.calib)
    evaluator, metric = choose_evaluator(src.model, src.text_folder, src.inputs, args.eval,
                                         args.task, src.description, digits=DIGITS)
    given = ", ".join(f"{k}={v}" for k, v in opts.items()) or "default options"
    say(f"method {args.method} ({given}), calibration: {calib_what}; metric: {metric}")
    report = layer_sensitivity(src.model, args.method, evaluator.score, calib=calib,
                               patterns=tuple(args.layers),
                               progress=not getattr(args, "quiet", False), **opts)
    doc = {"ok": True, "model": src.description, "metric_description": metric,
           "calibration": calib_what, **report.to_dict()}
    title = (f"sensitivity of {src.description} to {args.method} ({given}) "
             f"({metric}; fp32 {report.metric} = {report.reference[report.metric]}), "
             f"{len(report.rows)} {'structures' if args.method == 'prune' else 'layers'} in "
             f"{report.seconds:.1f} s")
    if args.out:
        text = f"# {title}\n\n{report.table()}\n".encode()
        atomic.write_file(args.out, lambda f: f.write(text))   # whole or not at all
    if args.json:
        emit_json(doc)
    else:
        print(title + ":")
        print(report.table(args.top))
        if args.top and len(report.rows) > args.top:
            print(f"({len(report.rows) - args.top} more rows: drop --top, or --json)")
        for note in report.notes:
            print(f"note: {note}")
    if args.out:
        say(f"wrote {args.out}")
    return EXIT_OK
