"""Calibration data without downloads: the shipped text corpus and token batches from it.

The passes take ``calib``, a list of input dicts (``model(**x)``). For text models this
module builds that list from text: :func:`calib_sentences` reads the corpus shipped with
edgestack (``edgestack/data/calib.txt``, a few hundred varied English sentences written for
this purpose; disjoint from the held evaluation set ``data/sentences.txt``), and
:func:`text_calib` tokenizes sentences with a Hugging Face ``tokenizer.json`` into padded
batches. :func:`check_calib_tokens` refuses calibration data that is empty or too short to
give usable statistics (fewer than :data:`MIN_TOKENS` real tokens).

Statistics over these batches are collected by
:func:`edgestack.compress.api.collect_input_stats` (running sums: bounded memory).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from edgestack.errors import CompressError

#: Fewest real (attention-mask) tokens that calibration data must hold.
MIN_TOKENS = 64


def calib_sentences() -> list[str]:
    """The calibration corpus shipped with edgestack, one sentence per line."""
    text = resources.files("edgestack").joinpath("data/calib.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_calib_tokens(calib: Sequence[dict[str, Any]], min_tokens: int = MIN_TOKENS) -> int:
    """Count the real tokens of token calibration batches; refuse empty or too-short data.

    Tokens are counted from ``attention_mask`` when present, else from ``input_ids``.
    Batches without either (e.g. image inputs) are counted as their first dimension.

    Returns:
        The number of tokens (or examples).

    Raises:
        CompressError: no batch, or fewer than ``min_tokens`` tokens in all.
    """
    if not calib:
        raise CompressError(
            "calibration data is empty: pass a non-empty list of input dicts, or use "
            "edgestack.compress.calib.text_calib() on the shipped corpus"
        )
    total = 0
    for x in calib:
        if "attention_mask" in x:
            total += int(x["attention_mask"].sum())
        elif "input_ids" in x:
            total += int(x["input_ids"].numel())
        else:
            first = next(iter(x.values()))
            total += int(first.shape[0]) if hasattr(first, "shape") and first.dim() else 1
            min_tokens = min(min_tokens, 1)
    if total < min_tokens:
        raise CompressError(
            f"calibration data is too short: {total} token(s), at least {min_tokens} are needed "
            "for stable activation statistics; pass more or longer texts (the shipped corpus "
            "calib_sentences() has a few hundred sentences)"
        )
    return total


def text_calib(
    model_dir: str | Path,
    texts: Sequence[str] | None = None,
    *,
    n: int | None = 128,
    seq: int = 64,
    batch: int = 8,
    min_tokens: int = MIN_TOKENS,
) -> list[dict[str, Any]]:
    """Token calibration batches (torch int64) from ``texts`` or the shipped corpus.

    Args:
        model_dir: a Hugging Face folder holding ``tokenizer.json``.
        texts: sentences; default :func:`calib_sentences`.
        n: use the first ``n`` texts (None: all).
        seq: truncate each text to this many tokens (batches are padded to their longest
            text, a multiple of 8: no compute is spent on long padding).
        batch: texts per batch.
        min_tokens: refuse data with fewer real tokens than this.

    Returns:
        A list of ``{"input_ids", "attention_mask", "token_type_ids"}`` dicts.

    Raises:
        CompressError: ``texts`` empty, only blank, or too short.
    """
    import torch

    texts = calib_sentences() if texts is None else [t for t in texts if t and t.strip()]
    if not texts:
        raise CompressError("calibration texts are empty: pass at least one non-blank text")
    if n is not None:
        texts = texts[:n]
    tok_file = Path(model_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise CompressError(f"no tokenizer.json in {model_dir}; expected a Hugging Face folder")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    tok.enable_truncation(seq)
    tok.enable_padding(pad_id=0, pad_to_multiple_of=8)  # to the longest of each batch
    out = []
    for i in range(0, len(texts), batch):
        enc = tok.encode_batch(list(texts[i:i + batch]))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
        out.append({"input_ids": ids, "attention_mask": mask,
                    "token_type_ids": torch.zeros_like(ids)})
    check_calib_tokens(out, min_tokens)
    return out


__all__ = ["MIN_TOKENS", "calib_sentences", "check_calib_tokens", "text_calib"]
