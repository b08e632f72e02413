"""Text-generation export: a causal LM with its head and a KV cache in one ONNX graph.

:func:`export_decoder` wraps a (compressed) transformers causal LM (GPT-2, Llama, Qwen2 and
other ``*ForCausalLM`` / ``*LMHeadModel`` classes that take transformers' cache objects) in
a ``forward`` (:func:`flat_cache_forward`, set on the model during the export) that takes the
cache as flat tensors, builds transformers' own ``DynamicCache`` from them, runs the model
with ``use_cache=True`` and returns the logits and the grown cache flat again.
:func:`edgestack.exporter.export` then exports it like any model (compressed layers become
``edgestack`` ops), with the I/O of :mod:`edgestack.core.decoding` (Optimum's names:
``past_key_values.{i}.key/value`` in, ``present.{i}.key/value`` out), dynamic batch,
sequence and past length, and the contract as JSON in the model metadata
(``edgestack.decoder``).

Tied weights: an LM head tied to the input embedding is left dense by the compression passes
(:func:`edgestack.compress.api.select_layers`), so ``torch.export`` sees one parameter and the
graph stores it once, read by both the embedding ``Gather`` and the head ``MatMul``;
``ExportResult.tied_weights`` and the contract report the tie.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from typing import Any

from edgestack.core.decoding import AXES, META_DECODER, DecoderContract
from edgestack.errors import ExportError
from edgestack.exporter.export import ExportResult, export

TRACE_SIZES = {"batch": 2, "sequence": 3, "past": 5}
"""Example sizes the graph is traced with: distinct and above 1, so that ``torch.export``
keeps each axis symbolic and apart (a size of 1 would be specialised)."""


def _cache_argument(model: Any) -> str:
    """The name under which the model's ``forward`` takes the cache (``cache`` in
    transformers 5.x, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ExportError(
        f"text-generation export: {type(model).__name__}.forward takes no cache argument "
        "(cache or past_key_values); expected a transformers causal LM (AutoModelForCausalLM)"
    )


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@contextlib.contextmanager
def flat_cache_forward(model: Any, num_layers: int) -> Iterator[Any]:
    """Inside the block, ``model.forward`` takes the cache as flat tensors:
    ``forward(input_ids, attention_mask, position_ids, *past)`` with ``past`` the key and
    value of each layer in turn (``[batch, kv_heads, past, head_dim]``; ``past`` may be 0),
    returning ``{"logits": ..., "present.{i}.key": ..., "present.{i}.value": ...}``: the
    cache is transformers' own ``DynamicCache``, built from ``past`` and grown by the model.

    The model itself is exported (an instance ``forward``, as transformers' exporters do), so
    parameter, layer and BitStack-order names stay the model's own; restored on exit.
    """
    from transformers.cache_utils import DynamicCache

    original = model.forward
    cache_arg = _cache_argument(model)
    layers = int(num_layers)

    def forward(input_ids: Any, attention_mask: Any, position_ids: Any,
                *past: Any) -> dict[str, Any]:
        if len(past) != 2 * layers:
            raise ExportError(f"decoder forward: expected {2 * layers} cache tensors (key and "
                              f"value of {layers} layers), found {len(past)}")
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1])
                                             for i in range(layers)], config=model.config)
        out = original(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=True, **{cache_arg: cache})
        flat: dict[str, Any] = {"logits": out.logits}
        for i, layer in enumerate(_returned_cache(out).layers):
            flat[f"present.{i}.key"] = layer.keys
            flat[f"present.{i}.value"] = layer.values
        return flat

    had_own = "forward" in vars(model)
    model.forward = forward
    try:
        yield model
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward


def _check_causal_lm(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings") \
            or model.get_output_embeddings() is None:
        raise ExportError(
            f"text-generation export: {type(model).__name__} has no language-model head; "
            "expected a transformers causal LM (loaded with AutoModelForCausalLM, e.g. "
            "`--task text-generation` on a model folder saved as *ForCausalLM/*LMHeadModel)"
        )
    return config


def _eos_ids(model: Any) -> tuple[int, ...]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def decoder_example(model: Any, *, batch: int = TRACE_SIZES["batch"],
                    seq: int = TRACE_SIZES["sequence"], past: int = TRACE_SIZES["past"],
                    seed: int = 0) -> tuple[tuple[Any, ...], DecoderContract]:
    """Example inputs of :func:`flat_cache_forward` (a prompt continuing a random cache of
    ``past`` tokens) and the I/O contract of ``model``; the per-layer cache shapes are read
    from the model's own cache after one forward pass (pruned layers may have fewer heads).

    Raises:
        ExportError: not a causal LM with a cache, or its forward fails.
    """
    import torch

    _check_causal_lm(model)
    g = torch.Generator().manual_seed(seed)
    arg = _cache_argument(model)
    probe_ids = torch.randint(0, int(model.config.vocab_size), (1, 2), generator=g)
    try:
        with torch.no_grad():
            out = model(input_ids=probe_ids, use_cache=True)
    except Exception as exc:
        raise ExportError(f"text-generation export: the model's forward with use_cache=True "
                          f"failed: {type(exc).__name__}: {exc}") from exc
    vocab = int(out.logits.shape[-1])  # the head's width (a compressed head has no .weight)
    cache = _returned_cache(out)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise ExportError(f"text-generation export: {type(model).__name__} returned no cache "
                          f"with use_cache=True ({arg}); expected a transformers Cache")
    kv_heads = tuple(int(layer.keys.shape[1]) for layer in layers)
    head_dims = {int(layer.keys.shape[-1]) for layer in layers}
    if len(head_dims) != 1:
        raise ExportError(f"text-generation export: cache head sizes differ across layers "
                          f"({sorted(head_dims)}); expected one head_dim")
    head_dim = head_dims.pop()
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    from edgestack.compress.walk import tied_parameters  # lazy: torch at import

    contract = DecoderContract(
        num_layers=len(layers), kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        eos_token_ids=_eos_ids(model), pad_token_id=None if pad is None else int(pad),
        tied_weights=tuple(tuple(grp) for grp in tied_parameters(model)))
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    cache_t = [torch.randn(batch, kv_heads[i // 2], past, head_dim, generator=g)
               for i in range(2 * len(layers))]
    return (ids, mask, pos, *cache_t), contract


def dynamic_axes(contract: DecoderContract) -> dict[str, dict[int, str]]:
    """``{input: {axis: name}}`` of a decoder export: batch, sequence, past length."""
    axes: dict[str, dict[int, str]] = {
        contract.input_ids: {0: AXES["batch"], 1: AXES["sequence"]},
        contract.attention_mask: {0: AXES["batch"], 1: AXES["total"]},
        contract.position_ids: {0: AXES["batch"], 1: AXES["sequence"]},
    }
    for name in contract.past_names():
        axes[name] = {0: AXES["batch"], 2: AXES["past"]}
    return axes


def export_decoder(model: Any, out: str | os.PathLike[str], *, metadata: Any = None,
                   **options: Any) -> ExportResult:
    """Export a (compressed) causal LM with its LM head and a KV cache.

    Args:
        model: a transformers causal LM (``*ForCausalLM``, ``GPT2LMHeadModel``), compressed
            or not.
        out: the ``.onnx`` path.
        metadata: extra model metadata, as for :func:`~edgestack.exporter.export`.
        **options: other :func:`~edgestack.exporter.export` options (``opset``,
            ``external_data``, ``parity``, ``atol``, ``rtol``, ``overwrite``, ``log``,
            ``progress``, ``compact_embeddings``); ``dynamic`` and ``input_names`` are set
            here.

    Returns:
        The :class:`~edgestack.exporter.ExportResult`; ``result.decoder`` is the
        :class:`~edgestack.core.decoding.DecoderContract` (also in the model metadata under
        ``edgestack.decoder``). Parity compares the logits and the whole grown cache on a
        prompt that continues a random cache.

    Raises:
        ExportError: not a causal LM with a cache, or any export step fails.
    """
    for key in ("dynamic", "input_names"):
        if key in options:
            raise ExportError(f"export_decoder: {key} is fixed by the decoder contract; "
                              "leave it out")
    inputs, contract = decoder_example(model)
    meta = dict(metadata) if isinstance(metadata, dict) else (
        {} if metadata is None else {"compression": metadata})
    meta[META_DECODER] = contract.to_json()
    with flat_cache_forward(model, contract.num_layers):
        result = export(model, inputs, out, dynamic=dynamic_axes(contract),
                        input_names=contract.input_names(), metadata=meta, **options)
    if result.output_names != contract.output_names():
        raise ExportError(f"text-generation export: the graph's outputs "
                          f"({', '.join(result.output_names)}) differ from the contract's "
                          f"({', '.join(contract.output_names())}); please report this model")
    result.decoder = contract
    return result


__all__ = ["TRACE_SIZES", "flat_cache_forward", "decoder_example", "dynamic_axes",
           "export_decoder"]
