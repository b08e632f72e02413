"""Text generation with the KV cache on the device runtime (numpy + ONNX Runtime).

A decoder package (``runtime.decoder`` in its manifest, :mod:`edgestack.packer.decoder`)
is served by the same :class:`~edgestack.runtime.Runtime` as any package; :func:`generate`
drives its graph with the loop of :func:`edgestack.core.decoding.decode_steps`: the prompt
in calls of at most ``prefill_chunk`` tokens, then one call per new token, the cache fed
back as numpy arrays. Each request holds one serving snapshot from its first call to its
last (:meth:`Runtime.pinned`), so every token of a request comes from the tier it started
on; a :meth:`~Runtime.retier` during it applies to the next request (a shrink waits for the
request before releasing memory).

The memory plan covers ``max_context`` tokens (prompt, left padding included, plus new
tokens) of ``max_batch`` sequences: a longer request or a larger batch is refused before
anything runs. Sampling is numpy (:class:`edgestack.core.decoding.Sampler`): greedy at
temperature 0, else temperature, top-k, top-p and a seeded ``numpy.random.Generator``.

This module imports numpy and edgestack's core/package layers; the tokenizer (the
``tokenizers`` package) only when a caller asks for it (:func:`package_tokenizer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgestack.core.decoding import DecoderContract, Sampler, check_prompt, decode_steps
from edgestack.errors import BudgetError, EdgestackError, FormatError, PackageError, TargetError


def decoder_of(rt: Any) -> tuple[Any, DecoderContract]:
    """``(runtime.decoder, its contract)`` of the package ``rt`` serves.

    Raises:
        TargetError: the package is not a decoder.
    """
    dec = rt.package.manifest.runtime.decoder
    if dec is None:
        raise TargetError(f"{rt.package.path}: not a text-generation package (its manifest "
                          "has no runtime.decoder); pack a decoder exported with `edgestack "
                          "export MODEL --task text-generation`, or serve it with infer()")
    return dec, dec.decoder_contract()


def left_pad(prompts: Any, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)``: int64 ``[batch, longest]`` with shorter prompts left-padded with
    ``pad`` (mask 0), from a list of token lists or a 2-D array (mask ones)."""
    if isinstance(prompts, np.ndarray) or (
            isinstance(prompts, Sequence) and prompts and not isinstance(prompts[0], Sequence)
            and not isinstance(prompts[0], np.ndarray)):
        return check_prompt(np.atleast_2d(np.asarray(prompts)))
    rows = [list(map(int, p)) for p in prompts]
    if not rows or not all(rows):
        raise FormatError("generate: every prompt needs at least one token, found "
                          f"lengths {[len(r) for r in rows]}")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@dataclass
class Generation:
    """What :func:`generate` produced: ``tokens`` int64 ``[batch, n]`` (a stop token
    included; after it, the pad token), per sequence the count up to its stop
    (``lengths``), the tier it ran on, and the timings."""

    tokens: np.ndarray
    lengths: list[int]
    tier: int
    batch: int
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens (every sequence, padding included) per second of prefill."""
        return self.batch * self.prompt_tokens / self.prefill_seconds \
            if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first (every sequence) per second of decoding."""
        steps = self.tokens.shape[1] - 1
        return self.batch * steps / self.decode_seconds if steps > 0 and \
            self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens.tolist(), "lengths": self.lengths, "tier": self.tier,
                "batch": self.batch, "prompt_tokens": self.prompt_tokens,
                "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds,
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


def _check_request(rt: Any, dec: Any, ids: np.ndarray, max_new_tokens: int) -> None:
    batch, prompt = ids.shape
    if batch > dec.max_batch:
        raise BudgetError(f"generate: batch {batch} is more than the package's max_batch "
                          f"{dec.max_batch} (what its memory plan covers); split the "
                          "request, or repack with --max-batch")
    if prompt + max_new_tokens > dec.max_context:
        raise BudgetError(
            f"generate: prompt ({prompt} tokens, padding included) + max_new_tokens "
            f"({max_new_tokens}) = {prompt + max_new_tokens} is more than the package's "
            f"max_context {dec.max_context} (what its memory plan covers, KV cache "
            f"included); shorten the prompt, ask fewer tokens, or repack with "
            f"--max-context {prompt + max_new_tokens}")


def generate_iter(rt: Any, input_ids: Any, max_new_tokens: int, *,
                  attention_mask: Any = None, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stop: Any = "contract",
                  timings: dict[str, float] | None = None,
                  info: dict[str, Any] | None = None) -> Iterator[np.ndarray]:
    """Each step's int64 ``[batch]`` tokens, generated on one pinned snapshot (see the
    module doc; arguments as :func:`generate`). The snapshot is held until the iterator is
    exhausted or closed; ``timings`` (when given) receives ``prefill`` and ``decode``
    seconds, ``info`` the ``tier``, ``batch`` and ``prompt_tokens``. Every check runs
    before the iterator is returned."""
    dec, contract = decoder_of(rt)
    pad = contract.pad_token_id if contract.pad_token_id is not None else (
        contract.eos_token_ids[0] if contract.eos_token_ids else 0)
    ids, mask = left_pad(input_ids, pad)
    if attention_mask is not None:
        ids, mask = check_prompt(ids, attention_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise FormatError(f"generate: max_new_tokens must be an integer >= 1, found "
                          f"{max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    if ids.max() >= contract.vocab_size or ids.min() < 0:
        raise FormatError(f"generate: token ids must be in [0, {contract.vocab_size}), found "
                          f"[{ids.min()}, {ids.max()}]")
    _check_request(rt, dec, ids, max_new_tokens)
    sampler = Sampler(temperature, top_k, top_p, seed)
    stops = stop if not isinstance(stop, int) else (stop,)
    return _steps(rt, contract, dec, ids, mask, max_new_tokens, sampler, stops,
                  timings if timings is not None else {}, info if info is not None else {})


def _steps(rt: Any, contract: DecoderContract, dec: Any, ids: np.ndarray, mask: np.ndarray,
           max_new_tokens: int, sampler: Sampler, stops: Any, timings: dict[str, float],
           info: dict[str, Any]) -> Iterator[np.ndarray]:
    names = contract.output_names()
    with rt.pinned() as st:
        need = set(st.required)
        info.update(tier=st.tier, batch=ids.shape[0], prompt_tokens=ids.shape[1])

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            out = rt.run_pinned(st, {k: v for k, v in feeds.items() if k in need})
            return [out[n] for n in names]

        t0 = time.perf_counter()
        first = None
        for tokens in decode_steps(run, contract, ids, max_new_tokens, attention_mask=mask,
                                   pick=sampler, eos_token_ids=stops,
                                   prefill_chunk=dec.prefill_chunk):
            now = time.perf_counter()
            if first is None:
                first = now
                timings["prefill"] = now - t0
            timings["decode"] = now - first
            yield tokens


def generate(rt: Any, input_ids: Any, max_new_tokens: int, *, attention_mask: Any = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop: Any = "contract",
             stream: Callable[[np.ndarray], Any] | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` tokens per sequence with the runtime ``rt``.

    Args:
        rt: a :class:`~edgestack.runtime.Runtime` serving a decoder package.
        input_ids: the prompt: int ``[batch, prompt]`` (with ``attention_mask`` marking
            left padding 0), or a list of token lists of any lengths (left-padded here).
        max_new_tokens: the most new tokens per sequence (>= 1).
        attention_mask: int ``[batch, prompt]`` for an array prompt (default: ones).
        temperature: 0 (default): greedy; else sampling at this temperature.
        top_k, top_p: keep the ``top_k`` most likely tokens / the smallest set reaching
            probability ``top_p`` (sampling only).
        seed: the sampler's seed (same seed, same tokens).
        stop: tokens that end a sequence: ``"contract"`` (the model's end tokens), a token,
            or an iterable (empty: never stop early).
        stream: called with each step's int64 ``[batch]`` tokens as they come.

    Returns:
        :class:`Generation`: tokens, lengths, the tier, prefill and decode tokens/s.

    Raises:
        TargetError: not a decoder package. BudgetError: prompt + new tokens beyond
            ``max_context``, or a batch beyond ``max_batch``. FormatError: a malformed
            prompt or sampling option.
    """
    timings: dict[str, float] = {}
    info: dict[str, Any] = {}
    _dec, contract = decoder_of(rt)
    steps = []
    for tokens in generate_iter(rt, input_ids, max_new_tokens, attention_mask=attention_mask,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                stop=stop, timings=timings, info=info):
        steps.append(tokens)
        if stream is not None:
            stream(tokens)
    out = np.stack(steps, axis=1)
    ends = set(contract.eos_token_ids if isinstance(stop, str) else
               (stop,) if isinstance(stop, int) else stop)
    lengths = []
    for row in out:
        hit = [i for i, t in enumerate(row.tolist()) if t in ends]
        lengths.append(hit[0] + 1 if hit else len(row))
    return Generation(out, lengths, info["tier"], info["batch"], info["prompt_tokens"],
                      timings.get("prefill", 0.0), timings.get("decode", 0.0))


def package_tokenizer(package: Any) -> Any:
    """The ``tokenizers.Tokenizer`` stored in a decoder package (hash-checked).

    Raises:
        TargetError: not a decoder package, or one packed without a tokenizer.
        EdgestackError: the ``tokenizers`` package is not installed.
        PackageError: the tokenizer file cannot be read.
    """
    dec = package.manifest.runtime.decoder
    if dec is None:
        raise TargetError(f"{package.path}: not a text-generation package (no "
                          "runtime.decoder); --prompt needs a decoder package")
    if not dec.tokenizer:
        raise TargetError(f"{package.path}: the package has no tokenizer; repack with "
                          "--tokenizer DIR (a folder with tokenizer.json), or generate from "
                          "token ids with Runtime.generate")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise EdgestackError("--prompt needs the tokenizers package: pip install "
                             "tokenizers") from None
    data = package.read_file(dec.tokenizer[0])
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # the tokenizers library raises its own Exception type
        raise PackageError(f"{package.path}: {dec.tokenizer[0]} is not a tokenizers file "
                           f"({str(exc)[:200]}); repack with a valid --tokenizer") from None


__all__ = ["Generation", "generate", "generate_iter", "left_pad", "decoder_of",
           "package_tokenizer"]
