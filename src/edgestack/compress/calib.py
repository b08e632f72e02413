"""Calibration data without downloads: the shipped text corpus and token batches from it.

The passes take ``calib``, a list of input dicts (``model(**x)``). For text models this
module builds that list from text: :func:`calib_sentences` reads the corpus shipped with
edgestack (``edgestack/data/calib.txt``, 836 varied everyday English sentences written for
this purpose; disjoint from the held evaluation set ``data/sentences.txt``), and
:func:`text_calib` tokenizes sentences with a Hugging Face ``tokenizer.json`` into padded
batches. :func:`check_calib_tokens` refuses calibration data that is empty or too short to
give usable statistics (fewer than :data:`MIN_TOKENS` real tokens).

:func:`corpus_sentences` extends the shipped corpus for training-style uses (the shift
fine-tune) with English sentences taken at run time from the docstrings of Python standard
library modules (:data:`DOC_MODULES`): thousands of sentences, no download, deterministic for
a given Python version. Sentences of the held evaluation set are always left out.

Statistics over these batches are collected by
:func:`edgestack.compress.api.collect_input_stats` (running sums: bounded memory).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from edgestack.core.quality import held_sentences
from edgestack.errors import CompressError

#: Fewest real (attention-mask) tokens that calibration data must hold.
MIN_TOKENS = 64


def calib_sentences() -> list[str]:
    """The calibration corpus shipped with edgestack, one sentence per line."""
    text = resources.files("edgestack").joinpath("data/calib.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


#: Standard-library modules whose docstrings :func:`doc_sentences` reads (missing ones are
#: skipped; none of them has side effects on import).
DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "email.utils", "enum", "filecmp",
    "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "logging.handlers", "lzma",
    "mailbox", "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "profile", "pstats", "pydoc", "queue", "random", "re", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z ,;:'()-]+[a-z][.!?]$")


def doc_sentences(modules: tuple[str, ...] = DOC_MODULES) -> list[str]:
    """Prose sentences (6-40 words, letters and punctuation only) from the docstrings of
    ``modules`` and of their classes, functions and methods, in a fixed order, no
    duplicates. Deterministic for a given Python version; no network."""
    import importlib
    import inspect
    import warnings

    out: list[str] = []
    seen: set[str] = set()

    def add(doc: str | None) -> None:
        for para in re.split(r"\n\s*\n", doc or ""):
            for s in _SPLIT.split(" ".join(para.split())):
                if 6 <= len(s.split()) <= 40 and _PROSE.match(s) and s not in seen:
                    seen.add(s)
                    out.append(s)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                mod = importlib.import_module(name)
            except Exception:  # absent on this platform/version: skip
                continue
            add(inspect.getdoc(mod))
            for _, obj in sorted(vars(mod).items()):
                if getattr(obj, "__module__", None) != mod.__name__:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj):
                    add(inspect.getdoc(obj))
                if inspect.isclass(obj):
                    for _, meth in sorted(vars(obj).items()):
                        if inspect.isfunction(meth):
                            add(meth.__doc__ and inspect.cleandoc(meth.__doc__))
    return out


def corpus_sentences(n: int | None = None, seed: int = 0) -> list[str]:
    """The shipped corpus (:func:`calib_sentences`, first) then docstring sentences
    (:func:`doc_sentences`, shuffled with ``seed``), without any held evaluation sentence.

    Args:
        n: at most this many sentences (None: all, a few thousand).
        seed: order of the docstring sentences.
    """
    held = set(held_sentences())
    seen: set[str] = set()
    out: list[str] = []

    def add(sentences: list[str]) -> None:
        for s in sentences:
            if s not in held and s not in seen:
                seen.add(s)
                out.append(s)

    add(calib_sentences())
    if n is None or len(out) < n:  # the docstrings import ~100 modules: only when needed
        docs = doc_sentences()
        random.Random(seed).shuffle(docs)
        add(docs)
    return out if n is None else out[:n]


def tokenizer_folder(model: Any) -> Path | None:
    """The folder holding ``model``'s ``tokenizer.json``: ``model.config.name_or_path``
    (set by ``from_pretrained`` and :func:`edgestack.compress.hf.load_hf_model`) when it
    holds one, else None."""
    folder = getattr(getattr(model, "config", None), "name_or_path", None)
    if folder and (Path(folder) / "tokenizer.json").is_file():
        return Path(folder)
    return None


def load_tokenizer(model_dir: str | Path, seq: int, *, pad: bool = True,
                   pad_multiple: int | None = None) -> Any:
    """The ``tokenizer.json`` of a Hugging Face folder, truncating to ``seq`` tokens and
    padding with id 0 to the longest text of each batch (``pad_multiple``: to a multiple of
    it; ``pad=False``: no padding).

    Raises:
        CompressError: the folder has no ``tokenizer.json``.
    """
    tok_file = Path(model_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise CompressError(f"no tokenizer.json in {model_dir}; expected a Hugging Face folder")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    tok.enable_truncation(seq)
    if pad:
        tok.enable_padding(pad_id=0, pad_to_multiple_of=pad_multiple)
    else:
        tok.no_padding()
    return tok


def jsonl_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, object)`` of each non-blank line of a JSONL file.

    Raises:
        CompressError: a line that is not JSON (the message names it).
    """
    import json

    for no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield no, json.loads(line)
        except ValueError as exc:
            raise CompressError(f"{path}:{no}: not a JSON object ({exc})") from None


def text_field(obj: Any) -> str | None:
    """The text of a JSONL record: its first :data:`CALIB_TEXT_FIELDS` field that is a string,
    else None."""
    if not isinstance(obj, dict):
        return None
    return next((obj[f] for f in CALIB_TEXT_FIELDS if isinstance(obj.get(f), str)), None)


def model_text_calib(model: Any, n: int, like: Sequence[dict[str, Any]] | None = None, *,
                     seq: int = 64, batch: int | None = None) -> list[dict[str, Any]]:
    """Token batches of the first ``n`` :func:`corpus_sentences`, tokenized with the
    tokenizer of a Hugging Face text ``model`` loaded from a folder; sentences already in
    ``like`` (same token ids) are left out.

    The folder is ``model.config.name_or_path`` (set by ``from_pretrained`` and
    :func:`edgestack.compress.hf.load_hf_model`); it must hold ``tokenizer.json``.

    Args:
        model: the (fp32) text model.
        n: number of sentences.
        like: existing calibration batches: the new ones get the same keys and batch size.
        seq: truncate each sentence to this many tokens.
        batch: sentences per batch (default: that of ``like[0]``, else 8).

    Raises:
        CompressError: the model has no folder with ``tokenizer.json``.
    """
    folder = tokenizer_folder(model)
    if folder is None:
        found = getattr(getattr(model, "config", None), "name_or_path", None)
        raise CompressError(
            f"extra calibration text needs a Hugging Face text model loaded from a folder with "
            f"tokenizer.json (model.config.name_or_path); found {found!r} for "
            f"{type(model).__name__}; pass calib=text_calib(folder, texts=corpus_sentences(n)) "
            "instead"
        )
    if batch is None:
        first = next(iter(like[0].values()), None) if like else None
        batch = int(first.shape[0]) if getattr(first, "dim", lambda: 0)() else 8
    texts = corpus_sentences(n)
    if like:
        keys = set(like[0])
        if "input_ids" not in keys:
            raise CompressError(
                "extra calibration text: the calibration batches are not token inputs "
                f"(keys {sorted(keys)}; expected input_ids)"
            )
        # leave out sentences the given batches already hold (same token ids)
        have = set()
        for x in like:
            mask = x.get("attention_mask")
            for j, row in enumerate(x["input_ids"].tolist()):
                real = int(mask[j].sum()) if mask is not None else len(row)
                have.add(tuple(row[:real]))
        tok = load_tokenizer(folder, seq, pad=False)
        texts = [t for t, e in zip(texts, tok.encode_batch(texts), strict=True)
                 if tuple(e.ids) not in have]
        if not texts:
            raise CompressError(
                f"extra calibration text: all {n} corpus sentence(s) are already in the "
                "calibration batches; ask for more"
            )
    out = text_calib(folder, texts, n=None, seq=seq, batch=batch)
    if like:
        out = [{k: v for k, v in x.items() if k in keys} for x in out]
    return out


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
    tok = load_tokenizer(model_dir, seq, pad_multiple=8)  # to the longest of each batch
    out = []
    for i in range(0, len(texts), batch):
        enc = tok.encode_batch(list(texts[i:i + batch]))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
        out.append({"input_ids": ids, "attention_mask": mask,
                    "token_type_ids": torch.zeros_like(ids)})
    check_calib_tokens(out, min_tokens)
    return out


CALIB_TEXT_FIELDS = ("text", "sentence", "content")
"""JSON fields a ``--calib`` JSONL line's text is read from (the first present)."""


def read_calib_file(path: str | Path) -> tuple[str, Any]:
    """A user's calibration file: ``("texts", [str, ...])`` from a text file (one text a
    line, blank lines skipped) or JSONL (one object a line with a ``text``, ``sentence`` or
    ``content`` field), or ``("arrays", {input name: array})`` from an ``.npz`` of model
    inputs (first dimension: examples). Reads only the file; checked before any model is
    loaded.

    Raises:
        CompressError: the file is missing, empty, or not in one of these forms (the message
            names the line).
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise CompressError(f"calibration file {str(path)!r} does not exist; expected text "
                            "lines, JSONL with a 'text' field, or an .npz of model inputs")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise CompressError(f"calibration file {str(path)!r} is not a readable .npz "
                                f"({exc})") from None
        if not arrays or len({len(a) if a.ndim else 0 for a in arrays.values()}) != 1 or (
                not len(next(iter(arrays.values())))):
            raise CompressError(f"calibration file {str(path)!r}: expected arrays of model "
                                "inputs with the same number of examples (first dimension, "
                                f"at least 1), found {({k: a.shape for k, a in arrays.items()})}")
        return "arrays", arrays
    texts: list[str] = []
    try:
        if path.suffix in (".jsonl", ".json"):
            for no, obj in jsonl_records(path):
                text = text_field(obj)
                if text is None:
                    raise CompressError(f"{path}:{no}: expected an object with a text field "
                                        f"({', '.join(CALIB_TEXT_FIELDS)}), found "
                                        f"{str(obj)[:80]!r}")
                texts.append(text)
        else:
            texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                     if line.strip()]
    except UnicodeDecodeError as exc:
        raise CompressError(f"calibration file {str(path)!r} is not UTF-8 text ({exc})") from None
    if not texts:
        raise CompressError(f"calibration file {str(path)!r} holds no text")
    return "texts", texts


__all__ = ["DOC_MODULES", "MIN_TOKENS", "calib_sentences", "check_calib_tokens", "read_calib_file",
           "corpus_sentences", "doc_sentences", "model_text_calib", "text_calib"]
