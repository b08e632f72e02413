"""Sentence-embedding quality: mean-pooled embedding cosine vs a reference model.

The held sentence set ships with edgestack (``edgestack/data/sentences.txt``), so quality is
measured without downloads. Embeddings are the attention-mask-weighted mean of the encoder's
``last_hidden_state`` (what sentence-transformers does for all-MiniLM-L6-v2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgestack.errors import EdgestackError


def held_sentences() -> list[str]:
    """The sentence set shipped in the package (one per line)."""
    text = resources.files("edgestack").joinpath("data/sentences.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def tokenize(model_dir: str | Path, sentences: list[str], seq: int) -> list[dict[str, np.ndarray]]:
    """Tokenize each sentence alone, padded/truncated to ``seq`` (int64 arrays, batch 1)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise EdgestackError("quality needs the tokenizers package: "
                             "pip install tokenizers") from None
    tok_file = Path(model_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise EdgestackError(f"no tokenizer.json in {model_dir}; expected a Hugging Face folder")
    tok = Tokenizer.from_file(str(tok_file))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq, pad_id=0)
    out = []
    for enc in tok.encode_batch(sentences):
        out.append({
            "input_ids": np.asarray([enc.ids], dtype=np.int64),
            "attention_mask": np.asarray([enc.attention_mask], dtype=np.int64),
        })
    return out


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attention-mask-weighted mean over the sequence axis: ``[b, s, h] -> [b, h]``."""
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def hidden_state_output(feeds: Mapping[str, np.ndarray],
                        outputs: Mapping[str, np.ndarray]) -> str | None:
    """The output a text encoder's sentence embedding is pooled from, or ``None`` when the
    model is not a text encoder: it needs an ``attention_mask`` input ``[batch, seq]`` and
    an output ``last_hidden_state``, else the first output shaped ``[batch, seq, hidden]``."""
    mask = feeds.get("attention_mask")
    if mask is None or np.ndim(mask) != 2:
        return None
    if np.ndim(outputs.get("last_hidden_state")) == 3:
        return "last_hidden_state"
    return next((name for name, out in outputs.items()
                 if np.ndim(out) == 3 and tuple(np.shape(out)[:2]) == tuple(mask.shape)), None)


def sentence_feeds(batches: list[dict[str, np.ndarray]], like: Mapping[str, np.ndarray]
                   ) -> list[dict[str, np.ndarray]]:
    """Tokenized ``batches`` (:func:`tokenize`) as feeds for a model whose inputs are
    ``like``'s: ids and mask in ``like``'s dtypes, any other input (``token_type_ids``)
    zeros shaped like the mask.

    Raises:
        EdgestackError: a model input that is neither tokenizer output nor a token-type
            input (the sentences cannot feed it).
    """
    other = [k for k in like if k not in ("input_ids", "attention_mask")]
    bad = [k for k in other if "type" not in k or np.ndim(like[k]) != 2]
    if bad or "input_ids" not in like:
        raise EdgestackError(f"the held sentences give input_ids and attention_mask (and zero "
                             f"token types); the model also needs {bad or ['input_ids']}")
    return [{k: (b[k].astype(like[k].dtype) if k in b
                 else np.zeros(b["attention_mask"].shape, like[k].dtype)) for k in like}
            for b in batches]


def embed(run: Callable[[dict[str, np.ndarray]], np.ndarray],
          batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled embeddings ``[n, h]``; ``run(feeds)`` returns ``last_hidden_state``."""
    return np.concatenate([mean_pool(run(b), b["attention_mask"]) for b in batches])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (no ties expected)."""
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def compare_embeddings(ref: np.ndarray, test: np.ndarray) -> dict[str, Any]:
    """Mean cosine vs the reference, and Spearman correlation of pairwise similarities."""
    def pairwise(e: np.ndarray) -> np.ndarray:
        n = e / np.linalg.norm(e, axis=1, keepdims=True)
        s = n @ n.T
        return s[np.triu_indices(len(e), 1)]

    cos = cosine_rows(ref, test)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "spearman_pairwise": spearman(pairwise(ref), pairwise(test))}


def ort_runner(session: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A ``run(feeds) -> last_hidden_state`` function over an ORT session."""
    names = {i.name for i in session.get_inputs()}

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]

    return run
