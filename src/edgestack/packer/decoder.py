"""Packing a decoder exported with a KV cache (host side): what :func:`edgestack.packer.pack.pack`
adds for a graph with ``edgestack.decoder`` metadata (:mod:`edgestack.core.decoding`).

- ``runtime.decoder`` (:class:`~edgestack.package.format.DecoderInfo`): the contract, the
  declared ``max_context`` (prompt + new tokens) and ``max_batch`` the memory plan covers,
  and ``prefill_chunk``, the most prompt tokens one call feeds (the runtime feeds a longer
  prompt in chunks, the cache growing between them);
- ``runtime.activation_bytes`` at the worst call the plan covers: a prefill chunk of
  ``prefill_chunk`` tokens with a cache of ``max_context - prefill_chunk`` tokens, batch
  ``max_batch`` (a decode step, one token over ``max_context - 1``, is smaller). The cache
  tensors themselves (``past`` fed in, ``present`` coming out) are not activations: the
  planner's ``kv_cache`` line counts them;
- golden inputs: a short prompt (:data:`GOLDEN_PROMPT` tokens, batch 1) with an empty cache;
- the tokenizer (``tokenizer.json`` and the configs beside it) under ``tokenizer/``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgestack.core.decoding import META_DECODER, DecoderContract, position_ids
from edgestack.errors import FormatError, PackageError
from edgestack.package.format import DecoderInfo, Table

DEFAULT_MAX_CONTEXT = 512
"""``max_context`` when neither the caller nor the graph (a position table) gives one."""

MAX_CONTEXT_CAP = 1024
"""The default ``max_context`` is the model's positions, at most this (a larger context is
asked for with ``--max-context``)."""

DEFAULT_PREFILL_CHUNK = 64
"""The most prompt tokens one call feeds by default (bounds the prefill activations: the
logits of a chunk are ``chunk x vocab`` floats)."""

GOLDEN_PROMPT = 8
"""Tokens of the golden prompt."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
"""Files of a Hugging Face folder stored as the package's tokenizer (``tokenizer.json``
required)."""

TOKENIZER_DIR = "tokenizer"


def contract_of(props: Mapping[str, str]) -> DecoderContract | None:
    """The decoder contract in a model's metadata, or None (not a text-generation export).

    Raises:
        PackageError: the metadata is there but malformed.
    """
    raw = props.get(META_DECODER)
    if raw is None:
        return None
    try:
        return DecoderContract.from_json(raw)
    except FormatError as exc:
        raise PackageError(f"pack: {exc}") from None


def positions_of(contract: DecoderContract, gathered: Mapping[str, Table]) -> int | None:
    """Rows of the position-embedding table (GPT-2's ``wpe``) when the graph reads one by
    ``position_ids``: the longest context the model was trained for; None (rotary)."""
    for table in gathered.values():
        if any(ids == contract.position_ids for ids, _v in table.lookups):
            return int(table.shape[0])
    return None


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PackageError(f"pack: {what} must be an integer >= 1, found {value!r}")
    return int(value)


def decoder_info(contract: DecoderContract, *, max_context: int | None, max_batch: int,
                 prefill_chunk: int | None, positions: int | None,
                 tokenizer: tuple[str, ...] = ()) -> DecoderInfo:
    """The manifest's ``runtime.decoder``; ``max_context`` None: the model's ``positions``
    capped at :data:`MAX_CONTEXT_CAP` (:data:`DEFAULT_MAX_CONTEXT` without a position table).

    Raises:
        PackageError: a bound below 1, or a context beyond the model's positions.
    """
    if max_context is None:
        max_context = min(positions, MAX_CONTEXT_CAP) if positions else DEFAULT_MAX_CONTEXT
    max_context = _positive(max_context, "max_context")
    if positions is not None and max_context > positions:
        raise PackageError(f"pack: max_context {max_context} is more than the model's "
                           f"{positions} positions (its position table); give "
                           f"--max-context {positions} or less")
    chunk = min(max_context, _positive(prefill_chunk or DEFAULT_PREFILL_CHUNK,
                                       "prefill_chunk"))
    return DecoderInfo(contract=dict(_contract_json(contract)), max_context=max_context,
                       max_batch=_positive(max_batch, "max_batch"), prefill_chunk=chunk,
                       tokenizer=tokenizer)


def _contract_json(contract: DecoderContract) -> dict[str, Any]:
    return json.loads(contract.to_json())


def golden_prompt(contract: DecoderContract, tokens: int = GOLDEN_PROMPT) -> dict[str, Any]:
    """The golden inputs of a decoder: a deterministic prompt of ``tokens`` ids (batch 1)
    with an empty cache (zero-length past tensors)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(contract.vocab_size, 100), (1, tokens)).astype(np.int64)
    mask = np.ones_like(ids)
    return {contract.input_ids: ids, contract.attention_mask: mask,
            contract.position_ids: position_ids(mask, tokens), **contract.empty_cache(1)}


def worst_call_shapes(info: DecoderInfo) -> dict[str, list[int]]:
    """Input shapes of the largest call the plan covers: a prefill chunk of
    ``prefill_chunk`` tokens over a cache of ``max_context - prefill_chunk`` tokens,
    ``max_batch`` sequences."""
    c = info.decoder_contract()
    b, chunk = info.max_batch, info.prefill_chunk
    past = info.max_context - chunk
    shapes = {c.input_ids: [b, chunk], c.attention_mask: [b, info.max_context],
              c.position_ids: [b, chunk]}
    for i, name in enumerate(c.past_names()):
        shapes[name] = [b, c.kv_heads[i // 2], past, c.head_dim]
    return shapes


def cache_outputs(info: DecoderInfo) -> dict[str, list[int]]:
    """The ``present`` outputs at the worst call, with their shapes (excluded from the
    activations: the plan's ``kv_cache`` line counts them)."""
    c = info.decoder_contract()
    return {name: [info.max_batch, c.kv_heads[i // 2], info.max_context, c.head_dim]
            for i, name in enumerate(c.present_names())}


def tokenizer_files(folder: str | Path) -> dict[str, Path]:
    """``{package name: file}`` of the tokenizer in ``folder`` (see :data:`TOKENIZER_FILES`).

    Raises:
        PackageError: ``folder`` has no ``tokenizer.json``.
    """
    folder = Path(folder)
    if not (folder / TOKENIZER_FILES[0]).is_file():
        raise PackageError(f"pack: {folder} has no {TOKENIZER_FILES[0]} (a Hugging Face "
                           "tokenizers file); give --tokenizer a folder with one, or leave "
                           "it out (the package then generates token ids only)")
    return {f"{TOKENIZER_DIR}/{n}": folder / n for n in TOKENIZER_FILES
            if (folder / n).is_file()}


__all__ = ["DEFAULT_MAX_CONTEXT", "MAX_CONTEXT_CAP", "DEFAULT_PREFILL_CHUNK", "GOLDEN_PROMPT",
           "TOKENIZER_FILES", "contract_of", "positions_of", "decoder_info", "golden_prompt",
           "worst_call_shapes", "cache_outputs", "tokenizer_files"]
