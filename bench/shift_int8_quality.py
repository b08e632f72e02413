#!/usr/bin/env python3
"""MiniLM shift 4-bit ``zero=True`` codes served with int8 kernels: sentence cosine.

GPTQ shift codes (calibrated on the shipped corpus, cached in ``--work``), optionally an STE
fine-tune (``--steps``, ``--lr``, ``--params``, ``--act 1``: ``finetune_act_quant``), then
the quality a user of the int8 model sees: exported, compiled for ``ort-cpu`` with
``int8=dynamic`` and compared with the dense model (also through ORT) on the first 40 held
sentences at seq 128, the ``sentence_cosine`` of ``bench/targets_latency.py``. Also prints
the weight-only cosine (torch, fp32 activations) and the served rounding simulated in torch
(``fake_quant_uint8`` on every shift layer's input). ``--serve 0`` skips the ORT part;
``--dense`` prints the activation rounding alone (dense weights). One JSON line per run,
appended to ``--work``/results.jsonl (docs/quality.md, "Served with int8 kernels").

Usage::

    .venv/bin/python bench/shift_int8_quality.py --tag act2000 --act 1 --steps 2000
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from edgestack import zoo
from edgestack.compress import compress
from edgestack.compress.finetune import fake_quant_uint8, finetune_shift
from edgestack.compress.layers import CompressedLayer
from edgestack.compress.shift import MAX_VAL_BATCHES, model_outputs
from edgestack.core.quality import (
    compare_embeddings,
    embed,
    held_sentences,
    sentence_feeds,
    tokenize,
)
from edgestack.exporter import export
from edgestack.sources import load_source
from edgestack.targets import get_target

SEQ = 128
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def torch_embeddings(model: torch.nn.Module, batches: list, rounded: bool) -> np.ndarray:
    """Mean-pooled embeddings of ``model`` in torch; ``rounded``: every linear layer's input
    rounded as the int8 graph serves it."""
    hooks = []
    if rounded:
        hooks = [m.register_forward_pre_hook(lambda _m, a: (fake_quant_uint8(a[0]), *a[1:]))
                 for n, m in model.named_modules()
                 if isinstance(m, (CompressedLayer, torch.nn.Linear)) and "pooler" not in n
                 and getattr(m, "kind", "linear") == "linear"]

    def run(f: dict) -> np.ndarray:
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in f.items()})[0].numpy()

    like = {k: np.zeros((1, SEQ), np.int64) for k in INPUTS}
    try:
        return embed(run, sentence_feeds(batches, like))
    finally:
        for h in hooks:
            h.remove()


def served_embeddings(path: Path, folder: Path, int8: str, threads: int, batches: list
                      ) -> np.ndarray:
    """Embeddings of the ONNX model at ``path`` compiled for ort-cpu with ``int8``."""
    ort = get_target("ort-cpu")
    art = ort.lower(path, folder, int8=int8, threads=threads, graph_optimization="all")
    runner = ort.runner(art).activate()
    like = {k: np.zeros((1, SEQ), np.int64) for k in runner.artifact.inputs}
    try:
        return embed(lambda f: runner.infer(f)["last_hidden_state"],
                     sentence_feeds(batches, like))
    finally:
        runner.release()


def export_quiet(model: torch.nn.Module, inputs: dict, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, inputs, path, parity=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--work", default=".cache/shift-int8")
    ap.add_argument("--tag", required=True, help="name of this run's files and JSON row")
    ap.add_argument("--steps", type=int, default=0, help="fine-tune steps (0: GPTQ only)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--act", type=int, default=0, help="1: finetune_act_quant")
    ap.add_argument("--params", default="all", help="finetune_params")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--serve", type=int, default=1, help="0: skip the ORT int8 model")
    ap.add_argument("--dense", action="store_true", help="the activation rounding alone")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    batches = tokenize(zoo.minilm_path(), held_sentences()[:40], SEQ)
    dense, inputs = zoo.minilm(seq=SEQ)
    dense.eval()
    ref = torch_embeddings(dense, batches, False)
    res: dict = {"tag": a.tag, "steps": a.steps, "lr": a.lr, "act": a.act, "params": a.params}
    if a.dense:
        res["torch_dense_rounded"] = compare_embeddings(
            ref, torch_embeddings(dense, batches, True))["cosine_mean"]
        print(json.dumps(res))
        return 0
    calib, _ = load_source("minilm").calibration()   # all 836 corpus sentences
    held = {tuple(b["input_ids"][0][b["attention_mask"][0] > 0].tolist()) for b in batches}
    for b in calib:    # the held sentences never train
        for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True):
            assert tuple(ids[m > 0].tolist()) not in held, "held sentence in calib"
    gptq = work / "gptq4z.pt"
    if gptq.exists():
        model = torch.load(gptq, weights_only=False)
    else:
        model, _ = zoo.minilm(seq=SEQ)
        t = time.perf_counter()
        compress(model, "shift", calib=calib, bits=4, zero=True)
        res["gptq_s"] = round(time.perf_counter() - t, 1)
        torch.save(model, gptq)
    model.eval()
    if a.steps:   # what the shift pass runs with finetune_steps (GPTQ cached above)
        targets = model_outputs(dense, calib)
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, CompressedLayer)]
        n_val = min(MAX_VAL_BATCHES, round(0.1 * len(calib)))
        with torch.no_grad():
            res["finetune"] = finetune_shift(
                model, layers, calib, targets, a.steps, a.lr, None, 0, False, a.params,
                n_val / len(calib), max(10, a.steps // 10), act_quant=bool(a.act))
    res["torch_weight_only"] = compare_embeddings(
        ref, torch_embeddings(model, batches, False))["cosine_mean"]
    res["torch_rounded"] = compare_embeddings(
        ref, torch_embeddings(model, batches, True))["cosine_mean"]
    if a.serve:
        path, dpath = work / f"{a.tag}.onnx", work / "dense.onnx"
        export_quiet(model, inputs, path)
        if not dpath.exists():
            export_quiet(dense, inputs, dpath)
        e_dense = served_embeddings(dpath, work / f"c_{a.tag}_dense", "off", a.threads,
                                    batches)
        e_int8 = served_embeddings(path, work / f"c_{a.tag}_int8", "dynamic", a.threads,
                                   batches)
        res["served_int8"] = compare_embeddings(e_dense, e_int8)["cosine_mean"]
    print(json.dumps(res, default=str), flush=True)
    with open(work / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(res, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
