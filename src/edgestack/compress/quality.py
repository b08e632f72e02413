"""Compression quality in torch: a compressed model against its fp32 original, at equal bytes.

:class:`EmbeddingEval` measures a sentence encoder (mean-pooled ``last_hidden_state``) on the
held sentence set shipped with edgestack (``data/sentences.txt``): mean cosine of each
sentence's embedding against the fp32 model's, and the Spearman correlation of the pairwise
similarities (helpers from :mod:`edgestack.core.quality`). :class:`OutputEval` does the
same for any model: cosine of the flattened first output tensor per example.

Baselines (:func:`fake_quantize`) are computed in the same run with quantize-dequantize
torch weights over the same layers the passes compress:

- ``int8``: symmetric per-output-channel int8 (max-abs scale, fp32 scale per channel).
- ``int4_g32`` / ``int4_g128``: round-to-nearest symmetric int4 in groups of 32 / 128
  input columns, one fp16 scale per group (max-abs / 7, codes -8..7): 4.5 / 4.125 bits.

:func:`quality_rows` builds the table: one row per configuration with bits per weight,
bytes of the compressed layers, metric vs fp32, seconds.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgestack.compress import compress
from edgestack.compress.api import first_tensor
from edgestack.compress.bitstack import set_tier
from edgestack.compress.calib import jsonl_records, load_tokenizer, read_calib_file, text_field
from edgestack.compress.hf import detect_task
from edgestack.compress.layers import decoded_weights
from edgestack.compress.walk import LayerInfo, dense_weight, iter_layers
from edgestack.core.quality import compare_embeddings, held_sentences, mean_pool
from edgestack.errors import CompressError

BASELINES = ("int8", "int4_g32", "int4_g128")


@dataclass
class EmbeddingEval:
    """Sentence-embedding quality of a text encoder vs a reference embedding set.

    Attributes:
        batch: the tokenized held sentences (one padded batch, torch int64).
        ref: the reference (fp32 model's) mean-pooled embeddings ``[n, h]``.
        digits: decimals the scores are rounded to.
    """

    batch: dict[str, torch.Tensor]
    ref: np.ndarray
    digits: int = 5

    @classmethod
    def for_model(cls, model: nn.Module, model_dir: str | Path,
                  sentences: list[str] | None = None, seq: int = 128) -> EmbeddingEval:
        """Tokenize ``sentences`` (default: the held set) and embed them with ``model``."""
        sentences = held_sentences() if sentences is None else sentences
        tok = load_tokenizer(model_dir, seq)
        enc = tok.encode_batch(sentences)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        ev = cls(batch, np.zeros(0))
        ev.ref = ev.embed(model)
        return ev

    def embed(self, model: nn.Module) -> np.ndarray:
        """Mean-pooled embeddings of the held batch."""
        with torch.no_grad():
            hidden = first_tensor(model(**self.batch)).float().numpy()
        return mean_pool(hidden, self.batch["attention_mask"].numpy())

    def score(self, model: nn.Module) -> dict[str, float]:
        """``{"cosine_mean", "cosine_min", "spearman_pairwise"}`` vs the reference."""
        return {k: round(v, self.digits)
                for k, v in compare_embeddings(self.ref, self.embed(model)).items()}


@dataclass
class OutputEval:
    """Generic quality: cosine of each example's flattened first output vs the reference
    (scores rounded to ``digits`` decimals)."""

    inputs: list[dict[str, Any]]
    ref: list[torch.Tensor]
    digits: int = 5

    @classmethod
    def for_model(cls, model: nn.Module, inputs: list[dict[str, Any]]) -> OutputEval:
        with torch.no_grad():
            ref = [first_tensor(model(**x)).float() for x in inputs]
        return cls(inputs, ref)

    def score(self, model: nn.Module) -> dict[str, float]:
        cos = []
        with torch.no_grad(), decoded_weights(model):
            for x, r in zip(self.inputs, self.ref, strict=True):
                out = first_tensor(model(**x)).float()
                a, b = r.reshape(r.shape[0], -1), out.reshape(out.shape[0], -1)
                cos.append(torch.nn.functional.cosine_similarity(a, b, dim=1))
        c = torch.cat(cos)
        return {"cosine_mean": round(float(c.mean()), self.digits),
                "cosine_min": round(float(c.min()), self.digits)}


@dataclass
class TaskEval:
    """A task metric on the user's file (``edgestack quality --eval FILE``).

    - ``text-classification``: accuracy of ``argmax(logits)`` against the file's labels
      (JSONL lines with a text field and ``label``: an int, or a name of
      ``config.label2id``);
    - ``text-generation``: perplexity, ``exp`` of the mean next-token negative log-likelihood
      over every real (non-padding) token of the file's texts.

    Attributes:
        task: one of the two above.
        batches: tokenized batches (torch int64).
        labels: the labels of each batch (classification), else empty.
    """

    task: str
    batches: list[dict[str, torch.Tensor]]
    labels: list[torch.Tensor]

    TASKS = ("text-classification", "text-generation")

    @classmethod
    def from_file(cls, model: nn.Module, model_dir: str | Path, path: str | Path, task: str,
                  seq: int = 128, batch: int = 16) -> TaskEval:
        """Read ``path`` and tokenize it with ``model_dir``'s ``tokenizer.json``.

        Raises:
            CompressError: an unsupported task, a file without labels for a classifier, a
                label the model does not know.
        """
        if task not in cls.TASKS:
            raise CompressError(f"--eval measures {', '.join(cls.TASKS)} (and sentence "
                                f"embeddings of a feature-extraction model); found task "
                                f"{task!r}")
        labels: list[int] = []
        if task == "text-classification":
            label2id = {str(k): int(v) for k, v in
                        (getattr(model.config, "label2id", None) or {}).items()}
            n_labels = int(getattr(model.config, "num_labels", 0) or 0)
            texts = []
            for no, obj in jsonl_records(path):
                text = text_field(obj)
                if text is None or "label" not in obj:
                    raise CompressError(f"{path}:{no}: expected a JSON object with a text "
                                        f"field and a label, found {str(obj)[:80]!r}")
                label = obj["label"]
                label = label2id.get(label, label) if isinstance(label, str) else label
                if not isinstance(label, int) or not 0 <= label < n_labels:
                    raise CompressError(f"{path}:{no}: label {obj['label']!r} is not one of "
                                        f"the model's {n_labels} labels "
                                        f"({', '.join(label2id) or 'ids 0..' + str(n_labels - 1)})")
                texts.append(text)
                labels.append(label)
            if not texts:
                raise CompressError(f"{path}: no labelled lines")
        else:
            texts = read_calib_file(path)[1]
        tok = load_tokenizer(model_dir, seq)
        batches, label_batches = [], []
        for i in range(0, len(texts), batch):
            enc = tok.encode_batch(texts[i:i + batch])
            ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
            mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
            batches.append({"input_ids": ids, "attention_mask": mask})
            label_batches.append(torch.tensor(labels[i:i + batch], dtype=torch.int64))
        return cls(task, batches, label_batches if labels else [])

    def score(self, model: nn.Module) -> dict[str, float]:
        """``{"accuracy"}`` or ``{"perplexity"}`` of ``model`` on the file."""
        with torch.no_grad(), decoded_weights(model):
            if self.task == "text-classification":
                right = total = 0
                for b, y in zip(self.batches, self.labels, strict=True):
                    pred = first_tensor(model(**b)).argmax(-1)
                    right += int((pred == y).sum())
                    total += len(y)
                return {"accuracy": round(right / total, 5)}
            nll = count = 0.0
            for b in self.batches:
                logits = first_tensor(model(**b)).float()
                mask = b["attention_mask"][:, 1:].bool()
                logp = torch.log_softmax(logits[:, :-1], -1)
                tok = logp.gather(-1, b["input_ids"][:, 1:, None])[..., 0]
                nll -= float(tok[mask].sum())
                count += int(mask.sum())
            return {"perplexity": round(math.exp(nll / max(count, 1)), 4)}


Evaluator = EmbeddingEval | OutputEval | TaskEval
"""What :func:`choose_evaluator` returns: ``.score(model) -> {metric: value}``."""


def choose_evaluator(model: nn.Module, model_dir: str | Path | None, inputs: dict[str, Any],
                     eval_file: str | Path | None = None, task: str | None = None,
                     description: str = "the model", digits: int = 5
                     ) -> tuple[Evaluator, str]:
    """The evaluator of ``edgestack quality`` (and ``edgestack sensitivity``) for ``model``,
    with a description of its metric.

    - ``eval_file`` given: the task's metric on the file (a classifier's accuracy, a language
      model's perplexity, an encoder's sentence-embedding cosine vs fp32 on the file's
      texts); ``task`` defaults to the class the model was saved as.
    - else, a text model with a ``tokenizer.json`` (``model_dir``): the mean-pooled
      sentence-embedding cosine vs fp32 on the held sentence set;
    - else: the cosine of the first output vs fp32 on the example ``inputs``.

    Args:
        model: the fp32 model (the reference is computed from it now).
        model_dir: the folder of its ``tokenizer.json``, or None.
        inputs: its example inputs (``model(**inputs)``).
        eval_file: the user's evaluation file, or None.
        task: the model's task (:data:`edgestack.compress.hf.TASKS`), or None.
        description: how errors name the model.
        digits: decimals a cosine is rounded to (ranking many small drops wants more than
            the quality table's 5).

    Raises:
        CompressError: an evaluation file for a model without a tokenizer, or a task or file
            the metric cannot use.
    """
    if eval_file is not None:
        if model_dir is None:
            raise CompressError(f"--eval {eval_file}: {description} has no tokenizer.json to "
                                "read the file with; --eval needs a Hugging Face text model "
                                "folder")
        task = task or detect_task(model.config)
        if task == "feature-extraction":
            texts = read_calib_file(eval_file)[1]
            ev = EmbeddingEval.for_model(model, model_dir, sentences=texts)
            ev.digits = digits
            return (ev,
                    f"mean-pooled sentence-embedding cosine vs fp32 on {len(texts)} texts of "
                    f"{eval_file}")
        ev = TaskEval.from_file(model, model_dir, eval_file, task)
        what = "accuracy" if task == "text-classification" else "perplexity"
        return ev, f"{what} on {eval_file} ({task})"
    if model_dir is not None:
        ev = EmbeddingEval.for_model(model, model_dir)
        what = "mean-pooled sentence-embedding cosine vs fp32 on the held sentence set"
    else:
        ev = OutputEval.for_model(model, [inputs])
        what = "cosine of the first output vs fp32 on the example inputs"
    ev.digits = digits
    return ev, what


# --------------------------------------------------------------------------- baselines


def _set_weight(layer: LayerInfo, w: torch.Tensor) -> None:
    with torch.no_grad():
        layer.module.weight.copy_((w.t() if layer.transposed else w).reshape(
            layer.module.weight.shape))


def fake_quantize(model: nn.Module, scheme: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Quantize-dequantize every supported layer's weight in place (a baseline).

    Args:
        model: modified in place.
        scheme: one of :data:`BASELINES`.
        skip: module-name prefixes left untouched.

    Returns:
        ``{"dense_bytes", "compressed_bytes", "bits_per_weight", "layers"}``.
    """
    if scheme not in BASELINES:
        raise CompressError(f"unknown baseline {scheme!r}; valid: {', '.join(BASELINES)}")
    dense = stored = numel = 0
    n_layers = 0
    for layer in list(iter_layers(model, skip)):
        w = dense_weight(layer)
        w2 = w.reshape(w.shape[0], -1)
        m, n = w2.shape
        if scheme == "int8":
            s = (w2.abs().amax(1, keepdim=True) / 127).clamp_min(1e-30)
            q = (w2 / s).round().clamp(-127, 127) * s
            nbytes = m * n + 4 * m
        else:
            g = int(scheme.split("_g")[1])
            pad = (-n) % g
            wp = torch.nn.functional.pad(w2, (0, pad)).reshape(m, -1, g)
            s = (wp.abs().amax(2, keepdim=True) / 7).to(torch.float16).float().clamp_min(1e-30)
            q = ((wp / s).round().clamp(-8, 7) * s).reshape(m, -1)[:, :n]
            nbytes = math.ceil(m * n / 2) + 2 * m * math.ceil(n / g)
        _set_weight(layer, q.reshape(w.shape))
        dense += 4 * w.numel()
        stored += nbytes
        numel += w.numel()
        n_layers += 1
    return {"dense_bytes": dense, "compressed_bytes": stored,
            "bits_per_weight": round(8 * stored / max(1, numel), 4), "layers": n_layers}


# --------------------------------------------------------------------------- table


@dataclass
class QualityConfig:
    """One row of a quality table: a baseline (``method`` in :data:`BASELINES`), a
    compression method with options, or ``"fp32"``.

    ``tiers``: BitStack only: also score these prefixes of the global importance order,
    given as numbers of whole levels (blocks per matrix, int), e.g. ``(2, 3, 4)``, or as a
    bit budget (float: the longest prefix within that many bits per weight).
    """

    label: str
    method: str
    options: dict[str, Any]
    calibrated: bool = True
    tiers: tuple[int | float, ...] = ()


def quality_rows(
    model: nn.Module,
    score: Callable[[nn.Module], dict[str, float]],
    configs: list[QualityConfig],
    calib: list[dict[str, Any]] | None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Score every configuration on a fresh copy of ``model``.

    Returns:
        One dict per row: ``label, method, options, bits_per_weight, bytes, dense_bytes,
        seconds`` and the metric keys of ``score``.
    """
    rows = []
    for cfg in configs:
        skip = tuple(cfg.options.get("skip", ()))
        sizes = {lay.name: dense_weight(lay).numel() for lay in iter_layers(model, skip)}
        total = sum(sizes.values())
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        if cfg.method == "fp32":
            info = {"bits_per_weight": 32.0, "compressed_bytes": None, "dense_bytes": None}
            report = None
        elif cfg.method in BASELINES:
            info = fake_quantize(m, cfg.method, skip)
            report = None
        else:
            report = compress(m, cfg.method, calib=calib if cfg.calibrated else None,
                              **cfg.options)
            # every layer of the set counts: the ones a pass left dense at fp32
            done = {lay.name: lay.compressed_bytes for lay in report.layers}
            nbytes = sum(done.get(name, 4 * numel) for name, numel in sizes.items())
            info = {"bits_per_weight": round(8 * nbytes / max(1, total), 4),
                    "compressed_bytes": nbytes, "dense_bytes": 4 * total}
        secs = round(time.perf_counter() - t0, 2)
        tiers = cfg.tiers if report is not None and report.importance_order else ()
        if not tiers:
            row = {"label": cfg.label, "method": cfg.method, "options": cfg.options,
                   "calibrated": cfg.calibrated and cfg.method not in BASELINES + ("fp32",),
                   "bits_per_weight": info["bits_per_weight"],
                   "bytes": info["compressed_bytes"], "dense_bytes": info["dense_bytes"],
                   "seconds": secs, **score(m)}
            if report is not None and report.details:
                row["details"] = report.details
            rows.append(row)
            if log:
                log(_fmt(row))
        for levels in tiers:
            tier = set_tier(m, report, levels=levels) if isinstance(levels, int) else \
                set_tier(m, report, max_bits=float(levels))
            name = f"{levels} blocks" if isinstance(levels, int) else f"<= {levels} bits"
            row = {"label": f"{cfg.label}, {name}", "method": cfg.method,
                   "options": cfg.options, "calibrated": cfg.calibrated,
                   "bits_per_weight": tier["bits_per_weight"], "bytes": tier["bytes"],
                   "dense_bytes": report.dense_bytes, "seconds": secs,
                   "tier_blocks": tier["count"], **score(m)}
            rows.append(row)
            if log:
                log(_fmt(row))
    return rows


def suite_configs(skip: tuple[str, ...] = (), finetune_seconds: float = 300.0
                  ) -> list[QualityConfig]:
    """The full comparison (``edgestack quality MODEL --all``): baselines and every method."""
    sk = {"skip": skip} if skip else {}
    # shift fine-tune: GPTQ and the fine-tune also see the rest of the shipped corpus
    # (836 sentences in all, tokenized with the model's tokenizer); 300 seeded steps
    ft = {"rounding": "gptq", "extra_texts": 836, "finetune_steps": 300,
          "max_seconds": finetune_seconds}
    return [
        QualityConfig("int8 per-channel", "int8", dict(sk)),
        QualityConfig("int4 RTN g32", "int4_g32", dict(sk)),
        QualityConfig("int4 RTN g128", "int4_g128", dict(sk)),
        QualityConfig("shift 4-bit max-abs, nearest (no calib)", "shift",
                      {"scale": "maxabs", "rounding": "nearest", **sk}, calibrated=False),
        QualityConfig("shift 4-bit act-weighted MSE scale, nearest", "shift",
                      {"rounding": "nearest", **sk}),
        QualityConfig("shift 4-bit GPTQ (shift grid)", "shift", {"rounding": "gptq", **sk}),
        QualityConfig("shift 4-bit GPTQ + STE fine-tune", "shift", {**ft, **sk}),
        QualityConfig("shift 4-bit DeepShift (zero) GPTQ", "shift",
                      {"rounding": "gptq", "zero": True, **sk}),
        QualityConfig("shift 3-bit GPTQ", "shift", {"rounding": "gptq", "bits": 3, **sk}),
        QualityConfig("bitstack k=16, not act-aware", "bitstack",
                      {"k": 16, "n_blocks": 4, "act_aware": False, **sk}, calibrated=False,
                      tiers=(2, 4)),
        QualityConfig("bitstack act-aware, plain signs, k by shape", "bitstack",
                      {"n_blocks": 7, "signs": "plain", **sk}, tiers=(2, 3, 4, 4.5, 5, 6, 7)),
        QualityConfig("bitstack act-aware, GPTQ signs, factor_bits 0.125", "bitstack",
                      {"n_blocks": 6, "factor_bits": 0.125, **sk},
                      tiers=(2, 3, 4, 4.5, 5, 6)),
        # the same with GPTQ statistics from the whole shipped corpus (836 sentences)
        QualityConfig("bitstack act-aware, GPTQ signs on 836 calib sentences, "
                      "factor_bits 0.125", "bitstack",
                      {"n_blocks": 6, "factor_bits": 0.125, "extra_texts": 836, **sk},
                      tiers=(2, 3, 4, 4.5, 5, 6)),
        QualityConfig("bitstack GPTQ signs on 836 calib sentences, factor_bits 0.125, "
                      "+ factor fine-tune", "bitstack",
                      {"n_blocks": 5, "factor_bits": 0.125, "signs": "gptq",
                       "extra_texts": 836, "finetune_steps": 150, "finetune_lr": 5e-4, **sk},
                      tiers=(3, 4, 4.5, 5)),
        QualityConfig("lowrank act-aware ratio 0.5", "lowrank", {"ratio": 0.5, **sk}),
        QualityConfig("lowrank act-aware ratio 0.25", "lowrank", {"ratio": 0.25, **sk}),
        QualityConfig("lowrank energy 0.95 (WeLore split)", "lowrank",
                      {"energy": 0.95, **sk}),
        QualityConfig("lowrank energy 0.99 (WeLore split)", "lowrank",
                      {"energy": 0.99, "max_keep": 0.9, **sk}),
        QualityConfig("monarch 4x4 ratio 0.5", "lowrank",
                      {"structure": "monarch", "ratio": 0.5, **sk}),
        QualityConfig("prune 10% FLAP (fluctuation, adaptive)", "prune",
                      {"ratio": 0.1, "metric": "fluctuation", "adaptive": True, **sk}),
        QualityConfig("prune 25% FLAP (fluctuation, adaptive)", "prune",
                      {"ratio": 0.25, "metric": "fluctuation", "adaptive": True, **sk}),
        QualityConfig("prune 25% activation, uniform", "prune",
                      {"ratio": 0.25, "metric": "activation", **sk}),
    ]


def _fmt(row: dict[str, Any]) -> str:
    metric = " ".join(f"{k}={row[k]}" for k in ("cosine_mean", "spearman_pairwise") if k in row)
    return f"{row['label']}: {row['bits_per_weight']} bits/weight, {metric}, {row['seconds']} s"


METRICS = {"cosine_mean": "cosine", "spearman_pairwise": "Spearman", "accuracy": "accuracy",
           "perplexity": "perplexity"}
"""Metric keys a row can hold -> column titles (cosine_min is in the JSON only)."""

LOWER_IS_BETTER = ("perplexity",)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (the metric columns the rows hold)."""
    keys = [k for k in METRICS if any(k in r for r in rows)]
    head = ("| configuration | bits/weight | MB (compressed layers) | "
            + " | ".join(METRICS[k] for k in keys) + " | s |")
    lines = [head, "| --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " | ---: |"]
    for r in rows:
        mb = "" if r.get("bytes") is None else f"{r['bytes'] / 1e6:.2f}"
        vals = " | ".join("" if r.get(k) is None else f"{r[k]:.4f}" for k in keys)
        lines.append(f"| {r['label']} | {r['bits_per_weight']:.3f} | {mb} | {vals} | "
                     f"{r['seconds']} |")
    return "\n".join(lines)


def search_configs(skip: tuple[str, ...] = ()) -> list[QualityConfig]:
    """What ``edgestack quality --max-drop D`` searches, cheapest first within a method:
    BitStack (GPTQ signs, factor bits 0.125, 12 blocks, every whole tier from 2 blocks:
    one compression scores them all), shift 5/4/3-bit GPTQ, low-rank removing 50/30% of the
    parameters, pruning 25/10%, and the int8 / int4 baselines (``ratio``: the fraction of
    the parameters removed, for both methods)."""
    sk = {"skip": skip} if skip else {}
    return [
        QualityConfig("bitstack 12 blocks, GPTQ signs, factor bits 0.125", "bitstack",
                      {"n_blocks": 12, "signs": "gptq", "factor_bits": 0.125, **sk},
                      tiers=tuple(range(2, 12))),
        *(QualityConfig(f"shift {b}-bit GPTQ", "shift", {"bits": b, "rounding": "gptq", **sk})
          for b in (3, 4, 5)),
        *(QualityConfig(f"lowrank ratio {r}", "lowrank", {"ratio": r, **sk})
          for r in (0.5, 0.3)),
        *(QualityConfig(f"prune ratio {r}", "prune", {"ratio": r, **sk}) for r in (0.25, 0.1)),
        *(QualityConfig(b, b, dict(sk)) for b in BASELINES),
    ]


def metric_drop(row: dict[str, Any], reference: dict[str, Any] | None) -> tuple[str, float]:
    """``(metric, drop)`` of ``row`` against ``reference`` (the fp32 row; for the cosine
    vs fp32 without one, 1.0): the reference minus the row for a higher-is-better metric,
    the relative increase for perplexity."""
    key = next(k for k in ("accuracy", "perplexity", "cosine_mean") if k in row)
    ref = reference.get(key) if reference else None
    if ref is None:
        ref = 1.0
    if key in LOWER_IS_BETTER:
        return key, row[key] / ref - 1.0
    return key, ref - row[key]


def smallest_within(rows: list[dict[str, Any]], max_drop: float
                    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The row with the fewest compressed bytes (bits per weight, then) whose metric drop
    (:func:`metric_drop`, vs the ``fp32`` row) is at most ``max_drop``, or None; and every
    row with its ``drop`` and whether it is ``within``."""
    reference = next((r for r in rows if r["method"] == "fp32"), None)
    table = []
    for r in rows:
        if r["method"] == "fp32":
            continue
        key, drop = metric_drop(r, reference)
        table.append({**r, "metric": key, "drop": round(drop, 5),
                      "within": drop <= max_drop})
    fits = [r for r in table if r["within"]]
    best = min(fits, key=lambda r: (r["bits_per_weight"], r["drop"])) if fits else None
    return best, sorted(table, key=lambda r: r["bits_per_weight"])


__all__ = ["BASELINES", "EmbeddingEval", "Evaluator", "OutputEval", "QualityConfig", "TaskEval",
           "choose_evaluator", "fake_quantize", "markdown_table", "metric_drop", "quality_rows",
           "search_configs", "smallest_within", "suite_configs"]
