"""``edgestack export``: compress a model and export it to ONNX, then check parity."""

from __future__ import annotations

import argparse
import time

from edgestack.cli import (
    COUNT,
    EXIT_CHECK_FAILED,
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
from edgestack.cli.options import add_method_options, method_options
from edgestack.compress.hf import TASKS
from edgestack.compress.options import MAX_RATIO, check_options
from edgestack.errors import EdgestackError
from edgestack.targets import TARGET_NAMES

METHODS = ("none", "prune", "shift", "lowrank", "bitstack")
IMPORTERS = ("deepshift", "welore", "flap", "bitstack")
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4


TASK_NAMES = tuple(TASKS)
"""``--task`` choices (``edgestack.compress.hf`` imports torch only when it loads a model)."""

MIN_OPSET = 18
"""``edgestack.exporter.ops.MIN_OPSET``, checked here before anything imports torch (a test
keeps the two equal)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="compress a model and export it to ONNX with edgestack ops",
        description="Load MODEL, compress it with --method, export it to ONNX keeping the "
        "compressed weights compressed (edgestack-domain ops), and check ONNX Runtime "
        "against the compressed torch model. Exit 1 when parity is above tolerance.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="Hugging Face model folder, module:factory returning (model, inputs), "
                   "a built-in model (minilm, gpt2-tiny, small-cnn, conv1d-net, resnet-tiny, "
                   "mobilenet-tiny), or with "
                   "--from an upstream checkpoint (folder or weights file)")
    p.add_argument("--method", choices=METHODS, default="none",
                   help="compression method (default: none)")
    p.add_argument("--from", dest="from_", choices=IMPORTERS, default=None,
                   help="MODEL is an upstream checkpoint of this kind")
    p.add_argument("--base", default=None,
                   help="architecture for a checkpoint without config.json "
                   "(model folder, module:factory or built-in name)")
    p.add_argument("--weight-bits", type=int, default=None,
                   help="--from deepshift: apply DeepShift-PS's forward-pass clamp of the shifts "
                   "for the weight_bits it was trained with (default: the stored shifts as "
                   "they are)")
    p.add_argument("--clamp", action="store_true",
                   help="--from deepshift: re-express a layer no shift code holds exactly "
                   "(16 exponents and a zero) the way that changes fewest weights, and report "
                   "how many and by how much")
    p.add_argument("--importance", default=None,
                   help="--from bitstack: BitStack's compression_config.json or "
                   "reduced_ppl_average.json (or their folder) giving the block order "
                   "(default: beside the checkpoint)")
    p.add_argument("--task", choices=TASK_NAMES, default=None,
                   help="a Hugging Face folder's task (default: from the class it was saved "
                   "as, config.architectures; its head is exported with the body); "
                   "text-generation exports a decoder with its LM head and a KV cache "
                   "(past_key_values.{i}.key/value in, present.{i}.key/value out, dynamic "
                   "batch, sequence and past length)")
    p.add_argument("--out", required=True,
                   help="output .onnx path (large weights go beside it, in "
                   "OUT.<sha256 prefix>.data)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (only an earlier export; its data file goes "
                   "with it, no other file is touched)")
    add_method_options(p)
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default=None, metavar="FILE",
                   help="calibrate on your data: text lines, JSONL with a 'text' field "
                   "(tokenized with the model's tokenizer.json), or an .npz of model inputs")
    g.add_argument("--calib-n", type=int, default=None,
                   help="text models with a tokenizer: calibrate on this many sentences of "
                   "the shipped corpus (default: all 836; 0: on the example inputs, as for "
                   "every other model)")
    e = p.add_argument_group("export options")
    e.add_argument("--batch", type=int, default=None, help="example batch size (default 1)")
    e.add_argument("--seq", type=int, default=None,
                   help="example sequence length for token models (default 128)")
    e.add_argument("--dynamic", choices=("batch,sequence",), default=None,
                   help="make the batch (dim 0 of every input) and sequence (dim 1 of 2-D "
                   "integer inputs) dimensions dynamic; dims the model specialises stay "
                   "static (default: static shapes, the fastest on every backend)")
    e.add_argument("--opset", type=int, default=20,
                   help=f"ONNX opset (default 20; at least {MIN_OPSET} for the edgestack "
                   "functions)")
    e.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="store initializers in OUT.data (auto: when large)")
    e.add_argument("--no-compact-embeddings", dest="compact_embeddings", action="store_false",
                   help="keep float embedding tables (default for a compressed model: "
                   "Gather-only tables of 256 KiB or more stored as int8 per row)")
    e.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help=f"parity: absolute tolerance (default {DEFAULT_ATOL:g})")
    e.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help=f"parity: relative tolerance, max|diff|/max|ref| "
                   f"(default {DEFAULT_RTOL:g})")
    lat = p.add_argument_group("latency target (--method prune)")
    lat.add_argument("--target-latency", type=float, default=None, metavar="MS",
                     help="prune step by step (ratio 0, STEP, 2*STEP, ...) until the exported "
                     "model's median latency on --latency-on is at most MS milliseconds "
                     "(measured in this process on the example inputs); the search picks "
                     "the ratio, so --ratio is refused. Exit 1 when no ratio meets it")
    lat.add_argument("--latency-on", choices=TARGET_NAMES, default="ort-cpu",
                     help="the target whose backend times the candidates (default ort-cpu; "
                     "ort-arm runs emulated on x86: its times are the emulator's)")
    lat.add_argument("--latency-step", type=float, default=0.1,
                     help="ratio step of the search (default 0.1)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.set_defaults(run=run)
    bounds(p, atol=NONNEG, rtol=NONNEG, batch=COUNT, seq=COUNT, calib_n=NONNEG,
           target_latency=POSITIVE, latency_step=POSITIVE)


def run(args: argparse.Namespace) -> int:
    opts = method_options(args)
    check_options(args.method, **opts)                # bad values fail before loading
    latency = None
    if args.target_latency is not None:
        if args.method != "prune":
            raise EdgestackError(f"--target-latency prunes to a latency: it needs --method "
                                 f"prune, found --method {args.method}")
        if "ratio" in opts:
            raise EdgestackError("--target-latency chooses the prune ratio: give --ratio or "
                                 "--target-latency, not both")
        if args.latency_step > MAX_RATIO:
            raise EdgestackError(f"bad --latency-step {args.latency_step!r}: expected at most "
                                 f"{MAX_RATIO} (the largest prune ratio)")
        latency = {"target_ms": args.target_latency, "target": args.latency_on,
                   "step": args.latency_step}
    importer = {k: v for k, v in (("weight_bits", args.weight_bits),
                                  ("clamp", args.clamp or None),
                                  ("importance", args.importance)) if v is not None}
    wants = {"weight_bits": "deepshift", "clamp": "deepshift", "importance": "bitstack"}
    wrong = [k for k in importer if wants[k] != args.from_]
    if wrong:
        flag = "--" + wrong[0].replace("_", "-")
        raise EdgestackError(f"{flag} is an option of --from {wants[wrong[0]]}, found --from "
                             f"{args.from_}; drop {flag} or import a {wants[wrong[0]]} "
                             "checkpoint")
    if args.opset < MIN_OPSET:
        raise EdgestackError(f"bad --opset {args.opset!r} (expected >= {MIN_OPSET}: the "
                             "edgestack function bodies use BitwiseAnd and ReduceProd with an "
                             "axes input)")
    out = prepare_output(args.out, [args.model, args.base, args.calib],
                         overwrite=args.overwrite, kind="onnx")
    from edgestack.exporter.output import replaced_files  # lazy: onnx at CLI start

    replaced_files(out, args.overwrite)               # only an earlier export is replaced
    if args.calib is not None:
        from edgestack.compress.calib import read_calib_file  # lazy: keeps CLI start light

        read_calib_file(args.calib)                   # a bad file fails before loading
    from edgestack.pipeline import compress_and_export  # lazy: keeps CLI start light

    t0 = time.perf_counter()
    _log = progress("export")
    _log(f"loading {args.model}" + (f" ({args.from_} checkpoint)" if args.from_ else ""))
    done = compress_and_export(
        args.model, args.method, opts, out, log=_log, calib_file=args.calib,
        calib_n=args.calib_n, progress=bars(args), latency=latency,
        load={"from_": args.from_, "base": args.base, "batch": args.batch, "task": args.task,
              "seq": args.seq, **({"import_options": importer} if importer else {})},
        export_options={"external_data": args.external_data, "overwrite": args.overwrite,
                        "opset": args.opset, "dynamic": args.dynamic is not None,
                        "atol": args.atol, "rtol": args.rtol,
                        "compact_embeddings": args.compact_embeddings})
    src, report, result, calib_text, notes = (done.source, done.report, done.result,
                                              done.calibration, done.notes)
    for note in notes:
        warn("export", note)
    parity = result.parity
    elapsed = time.perf_counter() - t0
    if args.json:
        emit_json({
            "ok": bool(parity.passed),
            "out": str(result.path),
            "model": src.description,
            "method": args.method,
            "options": opts,
            "calibration": calib_text,
            "compression": report.to_dict(),
            "import": src.details.get("import"),
            "export": result.to_dict(),
            "decoder": result.to_dict()["decoder"],
            "parity": parity.to_dict(),
            "latency": done.latency.to_dict() if done.latency else None,
            "tolerance": {"atol": args.atol, "rtol": args.rtol},
            "warnings": notes,
            "seconds": round(elapsed, 2),
        })
    else:
        if done.latency:
            print(done.latency.table())
        print(report.summary())
        print(result.summary())
        print(f"parity (ONNX Runtime vs compressed torch; atol={args.atol:g}, "
              f"rtol={args.rtol:g}):")
        print(parity.table())
        print(f"{'PASS' if parity.passed else 'FAIL'}: wrote {result.path} in {elapsed:.1f} s")
    if done.latency and not done.latency.met:
        warn("export", f"no prune ratio up to {done.latency.ratio:g} met the latency target "
             f"{done.latency.target_ms:g} ms on {done.latency.target}; wrote the most pruned "
             "candidate")
        return EXIT_CHECK_FAILED
    return EXIT_OK if parity.passed else EXIT_CHECK_FAILED
