"""``edgestack pack``: turn an exported model into a verifiable device package."""

from __future__ import annotations

import argparse

from edgestack.cli import (
    COUNT,
    EXIT_OK,
    NONNEG,
    POSITIVE,
    bars,
    bounds,
    emit_json,
    prepare_output,
    progress,
    warn,
)
from edgestack.cli.export import TASK_NAMES
from edgestack.cli.options import METHODS, add_method_options, method_options
from edgestack.compress.options import check_options
from edgestack.errors import CompressError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="pack a model into a device package (directory or .tar) with BitStack tiers",
        description="Pack MODEL (an ONNX file written by `edgestack export`, or a model source "
        "to compress with --method and export first) into a device package: manifest with "
        "sizes and sha256 of every file, BitStack blocks in importance order so that every "
        "memory tier is a prefix of blocks.bin, golden inputs/outputs for the on-device "
        "self-test. --out ending in .tar writes the one-file archive. Writing is atomic.",
    )
    p.add_argument("model", metavar="MODEL",
                   help=".onnx file from `edgestack export`, or a model source (folder, "
                   "module:factory, built-in name such as minilm)")
    p.add_argument("--target", default="ort-cpu",
                   help="package target: ort-cpu (default; served with ONNX Runtime), ort-arm "
                   "(the same, on aarch64) or openvino-cpu (the same files, served with "
                   "OpenVINO)")
    p.add_argument("--profile", default=None,
                   help="device profile (name or .toml); its target must be the package's")
    p.add_argument("--out", required=True, help="package directory, or PATH.tar")
    p.add_argument("--name", default=None, help="model name in the manifest")
    p.add_argument("--task", choices=TASK_NAMES, default=None,
                   help="a Hugging Face folder's task (default: from the class it was saved "
                   "as; its head is packed with the body)")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="a model source: calibrate on your data (text lines, JSONL with a "
                   "'text' field, or an .npz of model inputs)")
    p.add_argument("--method", choices=METHODS, default="bitstack",
                   help="compression when MODEL is not an .onnx file (default bitstack: 12 "
                   "blocks, factor bits 0.125, so the top tier reaches the original's "
                   "quality; other methods give a compiled package with one tier)")
    add_method_options(p)
    p.add_argument("--steps-per-level", type=int, default=4,
                   help="tiers between BitStack level boundaries (default 4)")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="a decoder (--task text-generation): the most tokens (prompt + new) "
                   "the memory plan covers, KV cache included (default: the model's "
                   "positions, at most 1024)")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="a decoder: the most sequences generated at once (default 1)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="a decoder: the most prompt tokens one call feeds (default 64)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a decoder: a folder with tokenizer.json to store in the package, "
                   "for `edgestack run --prompt` (default: the model folder's, if any)")
    p.add_argument("--tied-tables", choices=("int8", "float"), default="int8",
                   help="a BitStack decoder whose LM head is tied to its word embedding: "
                   "store the shared table int8, one scale per row, the head on the int8 "
                   "kernels (default), or float as exported (a compiled package keeps it "
                   "float)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing package (a package folder or .tar only; swapped "
                   "in whole)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)
    bounds(p, steps_per_level=COUNT, blocks=COUNT, k=COUNT, factor_bits=POSITIVE,
           extra_texts=NONNEG, max_context=COUNT, max_batch=COUNT, prefill_chunk=COUNT)


def run(args: argparse.Namespace) -> int:
    prepare_output(args.out, [args.model, args.calib, args.profile, args.tokenizer],
                   overwrite=args.overwrite,
                   kind="package")
    if args.calib is not None:
        from edgestack.compress.calib import read_calib_file  # lazy: keeps CLI start light

        read_calib_file(args.calib)                   # a bad file fails before loading
    from pathlib import Path

    from edgestack.pipeline import pack_model  # lazy: keeps CLI start light

    opts = method_options(args)
    if opts and Path(args.model).suffix == ".onnx":
        raise CompressError(f"pack: {args.model} is already exported; compression options "
                            f"({', '.join(sorted(opts))}) apply to a model source only")
    check_options(args.method, **opts)                # bad values fail before loading
    result = pack_model(args.model, args.out, target=args.target, profile=args.profile,
                        name=args.name, method=args.method, options=opts, task=args.task,
                        calib=args.calib,
                        steps_per_level=args.steps_per_level, overwrite=args.overwrite,
                        **{k: v for k, v in (("max_context", args.max_context),
                                             ("prefill_chunk", args.prefill_chunk),
                                             ("tokenizer", args.tokenizer)) if v is not None},
                        **({"max_batch": args.max_batch} if args.max_batch != 1 else {}),
                        **({"tied_tables": "float"} if args.tied_tables == "float" else {}),
                        log=progress("pack"), progress=bars(args))
    if args.json:
        emit_json({"ok": True, **result.to_dict()})
    else:
        tiers = result.tiers
        print(f"wrote {result.path}: {result.n_layers} BitStack layers, {result.n_blocks} "
              f"blocks (order: {result.order_source}), {len(tiers)} tiers "
              f"{tiers[0]['total_bytes'] / 2**20:.2f}..{tiers[-1]['total_bytes'] / 2**20:.2f} "
              "MiB loaded")
        for w in result.warnings:
            warn("pack", w)
    return EXIT_OK
