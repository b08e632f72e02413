"""Decoders with a KV cache: the I/O contract an export writes, and greedy decoding over it.

A ``text-generation`` export (:func:`edgestack.exporter.decoder.export_decoder`) is one ONNX
graph that runs both the prompt (prefill) and every later step (decode), Optimum's layout:

inputs
    ``input_ids`` int64 ``[batch, sequence]``; ``attention_mask`` int64
    ``[batch, past_sequence + sequence]`` (1 = a real token, 0 = left padding);
    ``position_ids`` int64 ``[batch, sequence]``; for each layer ``i``
    ``past_key_values.{i}.key`` and ``past_key_values.{i}.value``, float32
    ``[batch, kv_heads_i, past_sequence, head_dim]`` (``past_sequence`` may be 0: the first
    call feeds empty tensors).
outputs
    ``logits`` float32 ``[batch, sequence, vocab]``; for each layer ``present.{i}.key`` and
    ``present.{i}.value``, ``[batch, kv_heads_i, past_sequence + sequence, head_dim]``: the
    next call's past.

Batch, sequence and past length are dynamic. The contract is stored as JSON in the model
metadata under :data:`META_DECODER` (:meth:`DecoderContract.to_json`), so a runtime drives
generation from the file alone, with numpy and ONNX Runtime (no torch, no onnx):
:func:`greedy_generate` is that loop. ``kv_heads`` is per layer (structured pruning may
leave layers with different head counts).

This module imports numpy and the standard library only; the session is any object with
ONNX Runtime's ``run(output_names, feeds)`` and ``get_modelmeta()``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgestack.errors import FormatError

META_DECODER = "edgestack.decoder"
"""Model metadata key of the JSON :class:`DecoderContract` of a text-generation export."""

CONTRACT_VERSION = 1
"""Version of the decoder I/O contract (bump when a name, dtype or layout changes)."""

AXES = {"batch": "batch", "sequence": "sequence", "past": "past_sequence",
        "total": "total_sequence"}
"""Names of the dynamic axes in the graph (``present`` length: ``past_sequence + sequence``)."""


@dataclass(frozen=True)
class DecoderContract:
    """The I/O contract of a decoder export with a KV cache (see the module docstring).

    Attributes:
        num_layers: decoder layers (pairs of cache tensors).
        kv_heads: key/value heads of each layer (grouped-query attention: fewer than the
            query heads).
        head_dim: size of each head's key and value vectors.
        vocab_size: size of the logits' last axis.
        eos_token_ids: tokens that end a sequence (from the model's generation config);
            empty when none.
        pad_token_id: the token written after a sequence ended, or None.
        tied_weights: groups of torch parameter names stored once (e.g. the input embedding
            and the LM head).
        input_ids, attention_mask, position_ids, logits: graph value names.
        past_key, past_value, present_key, present_value: name templates, ``{layer}``
            replaced by the layer index.
        cache_dtype: element type of the cache tensors.
        cache_layout: axis order of each cache tensor.
        version: :data:`CONTRACT_VERSION`.
    """

    num_layers: int
    kv_heads: tuple[int, ...]
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    tied_weights: tuple[tuple[str, ...], ...] = ()
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    position_ids: str = "position_ids"
    logits: str = "logits"
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"
    cache_dtype: str = "float32"
    cache_layout: str = "batch,kv_heads,sequence,head_dim"
    version: int = CONTRACT_VERSION
    axes: dict[str, str] = field(default_factory=lambda: dict(AXES))

    def __post_init__(self) -> None:
        if len(self.kv_heads) != self.num_layers:
            raise FormatError(f"decoder contract: kv_heads lists {len(self.kv_heads)} layers, "
                              f"expected num_layers = {self.num_layers}")

    def past_names(self) -> list[str]:
        """The cache inputs, layer by layer: key then value."""
        return [t.format(layer=i) for i in range(self.num_layers)
                for t in (self.past_key, self.past_value)]

    def present_names(self) -> list[str]:
        """The cache outputs, in the order of :meth:`past_names`."""
        return [t.format(layer=i) for i in range(self.num_layers)
                for t in (self.present_key, self.present_value)]

    def input_names(self) -> list[str]:
        """Every graph input, in graph order."""
        return [self.input_ids, self.attention_mask, self.position_ids, *self.past_names()]

    def output_names(self) -> list[str]:
        """Every graph output, in graph order."""
        return [self.logits, *self.present_names()]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """The first call's past: zero-length cache tensors for ``batch`` sequences."""
        dtype = np.dtype(self.cache_dtype)
        return {name: np.zeros((batch, self.kv_heads[i // 2], 0, self.head_dim), dtype)
                for i, name in enumerate(self.past_names())}

    def cache_bytes_per_token(self) -> int:
        """Bytes of one token of one sequence in the cache: the sum over layers of
        ``2 * kv_heads * head_dim * itemsize`` (a key and a value)."""
        return 2 * sum(self.kv_heads) * self.head_dim * np.dtype(self.cache_dtype).itemsize

    def to_json(self) -> str:
        """The contract as the JSON stored under :data:`META_DECODER`."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DecoderContract:
        """Read a contract written by :meth:`to_json`.

        Raises:
            FormatError: not JSON, a newer version, or fields missing or of the wrong kind.
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise FormatError(f"decoder contract ({META_DECODER}) is not JSON: {exc}; "
                              "re-export the model") from None
        if not isinstance(data, dict):
            raise FormatError(f"decoder contract ({META_DECODER}): expected a JSON object, "
                              f"found {type(data).__name__}; re-export the model")
        version = data.get("version")
        if version != CONTRACT_VERSION:
            raise FormatError(f"decoder contract version {version!r}: this edgestack reads "
                              f"version {CONTRACT_VERSION}; export and run with the same "
                              "edgestack version")
        try:
            data["kv_heads"] = tuple(int(h) for h in data["kv_heads"])
            data["eos_token_ids"] = tuple(int(t) for t in data.get("eos_token_ids") or ())
            data["tied_weights"] = tuple(tuple(g) for g in data.get("tied_weights") or ())
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"decoder contract ({META_DECODER}) is malformed ({exc}); "
                              "re-export the model") from None

    @classmethod
    def from_session(cls, session: Any) -> DecoderContract:
        """The contract of a loaded ONNX Runtime session (its model metadata).

        Raises:
            FormatError: the model has no decoder contract (not a text-generation export).
        """
        meta = session.get_modelmeta().custom_metadata_map
        if META_DECODER not in meta:
            raise FormatError(
                f"the model has no {META_DECODER} metadata: it is not a decoder exported with "
                "a KV cache; export it with `edgestack export MODEL --task text-generation`")
        return cls.from_json(meta[META_DECODER])


def position_ids(attention_mask: np.ndarray, length: int) -> np.ndarray:
    """Positions of the last ``length`` tokens: ``cumsum(mask) - 1`` (padding at 1), as
    transformers' ``generate`` computes them, so left-padded prompts start at 0."""
    pos = np.cumsum(attention_mask, axis=-1, dtype=np.int64) - 1
    pos[attention_mask == 0] = 1
    return pos[:, -length:]


@dataclass(frozen=True)
class Sampler:
    """How the next token is picked from the last logits of each sequence (numpy only).

    ``temperature`` 0 is greedy (argmax; ``top_k``/``top_p`` then change nothing). Otherwise
    the logits are divided by ``temperature``, cut to the ``top_k`` largest (ties at the
    k-th value kept) and to the smallest set whose probability reaches ``top_p`` (the most
    likely token always kept), and one token is drawn per sequence from a
    ``numpy.random.Generator`` seeded with ``seed`` (the same seed, prompt and model give the
    same tokens).

    Raises:
        FormatError: a negative or non-finite temperature, ``top_k < 1`` or ``top_p``
            outside ``(0, 1]``.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < np.inf:
            raise FormatError(f"temperature must be a finite number >= 0 (0: greedy), found "
                              f"{t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool)
                                       or not isinstance(self.top_k, int) or self.top_k < 1):
            raise FormatError(f"top_k must be an integer >= 1 (or None: no cut), found "
                              f"{self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float))
                                           and 0 < self.top_p <= 1):
            raise FormatError(f"top_p must be in (0, 1] (or None: no cut), found "
                              f"{self.top_p!r}")
        object.__setattr__(self, "rng", np.random.default_rng(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """float64 ``[batch, vocab]`` probabilities after temperature, top-k and top-p (zero
        for every token cut); the sampling distribution of :meth:`__call__`."""
        z = np.asarray(logits, np.float64) / max(float(self.temperature), 1e-12)
        if self.top_k is not None and self.top_k < z.shape[-1]:
            kth = np.partition(z, -self.top_k, axis=-1)[:, -self.top_k, None]
            z = np.where(z < kth, -np.inf, z)
        z = z - z.max(axis=-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=-1, keepdims=True)
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-p, axis=-1, kind="stable")
            sorted_p = np.take_along_axis(p, order, axis=-1)
            before = np.cumsum(sorted_p, axis=-1) - sorted_p   # mass of the more likely ones
            keep = np.zeros_like(p, dtype=bool)
            np.put_along_axis(keep, order, before < self.top_p, axis=-1)
            p = np.where(keep, p, 0.0)
            p /= p.sum(axis=-1, keepdims=True)
        return p

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """int64 ``[batch]``: the next token of each sequence from its ``[batch, vocab]``
        logits."""
        if self.greedy:
            return np.argmax(logits, axis=-1).astype(np.int64)
        p = self.probabilities(logits)
        cdf = np.cumsum(p, axis=-1)
        u = self.rng.random((p.shape[0], 1)) * cdf[:, -1:]
        return np.minimum((cdf <= u).sum(axis=-1), p.shape[-1] - 1).astype(np.int64)


def check_prompt(input_ids: Any, attention_mask: Any = None, what: str = "generate"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` as int64 ``[batch, prompt]`` arrays (the mask defaults to ones).

    Raises:
        FormatError: not a non-empty integer ``[batch, prompt]`` array, or a mask of another
            shape.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise FormatError(f"{what}: input_ids must be a non-empty int [batch, prompt] "
                          f"array, found {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    mask = (np.ones_like(ids) if attention_mask is None
            else np.asarray(attention_mask).astype(np.int64))
    if mask.shape != ids.shape:
        raise FormatError(f"{what}: attention_mask shape {mask.shape} differs from "
                          f"input_ids shape {ids.shape}")
    return ids, mask


def decode_steps(run: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]],
                 contract: DecoderContract, input_ids: Any, max_new_tokens: int, *,
                 attention_mask: Any = None, pick: Callable[[np.ndarray], np.ndarray]
                 | None = None, eos_token_ids: Any = "contract",
                 prefill_chunk: int | None = None) -> Iterator[np.ndarray]:
    """The generation loop with the KV cache: yields each step's int64 ``[batch]`` tokens.

    The prompt is fed first (in calls of at most ``prefill_chunk`` tokens, the cache growing
    between them: that bounds the activations of a long prompt; None: one call), then one
    call per token. A finished sequence (it produced a stop token) gets the contract's
    ``pad_token_id`` (else its stop token) until every sequence has finished, which ends
    the loop.

    Args:
        run: runs the graph: ``feeds -> outputs`` in :meth:`DecoderContract.output_names`
            order (an ONNX Runtime session's ``run`` bound to those names, or a runtime's).
        contract: the export's I/O contract.
        input_ids, attention_mask: the prompt (see :func:`check_prompt`; left padding
            marked 0 in the mask).
        max_new_tokens: the most steps.
        pick: ``[batch, vocab]`` logits -> ``[batch]`` tokens (default: argmax).
        eos_token_ids: ``"contract"`` (the model's) or an iterable (empty: never stop).
        prefill_chunk: the most prompt tokens per call.

    Raises:
        FormatError: inputs of the wrong shape, ``max_new_tokens < 0``.
    """
    ids, mask = check_prompt(input_ids, attention_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 0:
        raise FormatError(f"generate: max_new_tokens must be an integer >= 0, found "
                          f"{max_new_tokens!r}")
    pick = pick or (lambda lg: np.argmax(lg, axis=-1).astype(np.int64))
    stops = sorted(set(contract.eos_token_ids if isinstance(eos_token_ids, str)
                       and eos_token_ids == "contract" else (int(t) for t in eos_token_ids)))
    fill = contract.pad_token_id if contract.pad_token_id is not None else (
        stops[0] if stops else 0)
    batch = ids.shape[0]
    if max_new_tokens == 0:
        return
    past = contract.empty_cache(batch)
    names = contract.past_names()
    chunk = ids.shape[1] if not prefill_chunk else max(1, int(prefill_chunk))
    done = np.zeros(batch, dtype=bool)
    pos = 0
    step = ids[:, :chunk]
    for produced in range(max_new_tokens):
        while True:
            seen = mask[:, :pos + step.shape[1]]
            feeds = {contract.input_ids: step, contract.attention_mask: seen,
                     contract.position_ids: position_ids(seen, step.shape[1]), **past}
            logits, *present = run(feeds)
            del feeds
            past = dict(zip(names, present, strict=True))
            del present
            pos += step.shape[1]
            if pos >= ids.shape[1] or produced:
                break
            step = ids[:, pos:pos + chunk]            # the rest of the prompt
        nxt = np.where(done, fill, pick(logits[:, -1, :]))
        del logits
        yield nxt
        done |= np.isin(nxt, stops)
        if done.all() or produced + 1 == max_new_tokens:
            return
        step = nxt[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)


def greedy_generate(session: Any, input_ids: np.ndarray, max_new_tokens: int, *,
                    attention_mask: np.ndarray | None = None,
                    contract: DecoderContract | None = None,
                    eos_token_ids: Any = "contract") -> np.ndarray:
    """Greedy decoding with the KV cache over an ONNX Runtime session
    (:func:`decode_steps` with argmax).

    Args:
        session: an ONNX Runtime ``InferenceSession`` of a text-generation export (or any
            object with its ``run`` and ``get_modelmeta``).
        input_ids: int ``[batch, prompt]`` prompt tokens (left-padded when the prompts differ
            in length, with ``attention_mask`` marking the padding).
        max_new_tokens: tokens to generate per sequence.
        attention_mask: int ``[batch, prompt]`` (default: all ones).
        contract: the I/O contract (default: read from the session's metadata).
        eos_token_ids: tokens that end a sequence: ``"contract"`` (the model's), or an
            iterable (empty: never stop early). A finished sequence gets the contract's
            ``pad_token_id`` (else its end token) until all have finished.

    Returns:
        int64 ``[batch, n]``, the new tokens (``n <= max_new_tokens``: fewer when every
        sequence ended early).

    Raises:
        FormatError: no contract in the model, or inputs of the wrong shape.
    """
    contract = contract or DecoderContract.from_session(session)
    outputs = contract.output_names()
    tokens = list(decode_steps(lambda feeds: session.run(outputs, feeds), contract, input_ids,
                               max_new_tokens, attention_mask=attention_mask,
                               eos_token_ids=eos_token_ids))
    batch = np.asarray(input_ids).shape[0]
    return np.stack(tokens, axis=1) if tokens else np.zeros((batch, 0), np.int64)


__all__ = ["AXES", "CONTRACT_VERSION", "META_DECODER", "DecoderContract", "Sampler",
           "check_prompt", "decode_steps", "greedy_generate", "position_ids"]
