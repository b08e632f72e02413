"""``compress()``: the one entry point of the compression passes, and what they share.

:func:`compress` checks the method and its options, finds the layers the pass may touch
(supported types, minus ``skip`` prefixes, minus layers inside unsupported modules), refuses
NaN/Inf weights before anything changes, collects calibration statistics if the pass wants
them, and runs the pass under ``torch.no_grad`` with the model in eval mode.

A pass is a module (``shift``, ``bitstack``, ``lowrank``, ``prune``) with:

- its options, their defaults and their check in the torch-free
  :mod:`edgestack.compress.options` (``PASS_OPTIONS``; ``skip`` is added for every method),
  which :func:`compress` runs first;
- ``run(ctx)``: modify ``ctx.model`` in place and fill ``ctx.report``.

Calibration statistics (:func:`collect_input_stats`) are running sums kept per watched
layer input (per-channel sum, sum of absolute values, sum of squares, optionally the Gram
matrix of the layer's matrix input), so memory stays bounded whatever the calibration size.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgestack.compress.calib import check_calib_tokens, model_text_calib
from edgestack.compress.options import (  # re-exported: the passes import them from here
    METHODS,
    check_options,
    method_options,
)
from edgestack.compress.report import CompressReport, SkippedLayer
from edgestack.compress.walk import (
    LayerInfo,
    check_finite_weight,
    iter_layers,
    tied_parameters,
    unsupported_layers,
)
from edgestack.core.progress import (  # re-exported: the passes import it from here
    Progress,
    progress_iter,
)
from edgestack.errors import CompressError

_PASS_MODULES = {
    "prune": "edgestack.compress.prune",
    "shift": "edgestack.compress.shift",
    "lowrank": "edgestack.compress.lowrank",
    "bitstack": "edgestack.compress.bitstack",
}


def _pass_module(method: str) -> Any:
    return importlib.import_module(_PASS_MODULES[method])


# --------------------------------------------------------------------------- context


@dataclass
class PassContext:
    """What a pass gets: the model, its layers, options, calibration data and the report.

    Attributes:
        model: the model, modified in place.
        method: the method name.
        options: resolved options (defaults filled in, ``skip`` a tuple).
        layers: supported layers the pass may touch (finite weights, not skipped).
        calib: calibration inputs (``model(**x)``) or None.
        progress: tqdm progress bars on stderr (:mod:`edgestack.core.progress`: True,
            False, or None for "when stderr is a terminal").
        stats_cache: input statistics shared with other :func:`compress` calls (see
            :class:`StatsCache`), or None.
        report: the report the pass fills.
    """

    model: nn.Module
    method: str
    options: dict[str, Any]
    layers: list[LayerInfo]
    calib: list[dict[str, Any]] | None
    progress: Progress
    stats_cache: StatsCache | None = None
    report: CompressReport = field(init=False)

    def __post_init__(self) -> None:
        self.report = CompressReport(self.method, dict(self.options))

    def skip(self, name: str, reason: str) -> None:
        """Record a layer left dense."""
        self.report.skipped.append(SkippedLayer(name, reason))

    def input_stats(self, layers: Iterable[LayerInfo],
                    gram: Callable[[LayerInfo], bool] | bool = False) -> dict[str, InputStats]:
        """Input statistics of ``layers`` on ``calib`` (:func:`collect_input_stats`), from
        :attr:`stats_cache` when there is one."""
        if self.stats_cache is not None:
            return self.stats_cache.get(self.model, self.calib, layers, gram, self.progress)
        return collect_input_stats(self.model, self.calib, layers, gram=gram,
                                   progress=self.progress)

    def iterate(self, items: Iterable[Any], desc: str, total: int | None = None) -> Iterable[Any]:
        """``items``, wrapped in a tqdm bar when ``progress`` is on."""
        return progress_iter(items, self.progress, desc, total)

    def decodable_layers(self) -> list[LayerInfo]:
        """The layers a decode-based pass (shift, bitstack, low-rank) can replace; the others
        are recorded as skipped with the reason (:func:`zero_padding_problem`)."""
        out = []
        for layer in self.layers:
            problem = zero_padding_problem(layer)
            if problem:
                self.skip(layer.name, problem)
            else:
                out.append(layer)
        return out

    def require_calib(self, needs: list[str], why: str = "",
                      instead: str = "use the defaults") -> None:
        """Refuse to run without calibration data, or with too little of it, when one of the
        options named in ``needs`` is on (``why``: what the data is for; ``instead``: the
        options that do without).

        Raises:
            CompressError: ``needs`` is not empty and ``calib`` is None, empty or too short
                (:func:`edgestack.compress.calib.check_calib_tokens`).
        """
        if not needs:
            return
        if self.calib is None:
            raise CompressError(
                f"{self.method}: {' and '.join(needs)} need(s) calibration data{why}; pass "
                "calib=[...] (e.g. edgestack.compress.calib.text_calib(model_dir)) or "
                f"{instead}"
            )

        check_calib_tokens(self.calib)


def _matches(name: str, prefixes: tuple[str, ...]) -> str | None:
    for p in prefixes:
        if name == p or name.startswith(p + ".") or p == "":
            return p
    return None


def zero_padding_problem(layer: LayerInfo) -> str | None:
    """Why a decode-based layer (shift, bitstack, low-rank) cannot replace ``layer``, or None."""
    mode = getattr(layer.module, "padding_mode", "zeros")
    if mode != "zeros":
        return f"padding_mode {mode!r} (only 'zeros' is supported by compressed layers)"
    return None


# --------------------------------------------------------------------------- calibration


class InputStats:
    """Running per-channel statistics of one layer's input (bounded memory).

    Channels are the last dimension for linear layers and dimension 1 for convolutions; a
    conv's statistics are over batch and positions. With ``gram`` the Gram matrix
    ``X^T X`` of the layer's matrix input is kept too (for a conv, of the unfolded patches,
    columns in the order of ``weight.reshape(out, -1)``).

    Attributes:
        count: number of vectors seen per channel.
        sum, sum_abs, sum_sq: float64 ``[channels]``.
        gram: float64 ``[n, n]`` or None; ``gram_count`` rows went into it.
        gram_requested: whether the Gram matrix was asked for (``gram`` may still be None:
            a convolution with string padding has no unfolded form here).
    """

    def __init__(self, layer: LayerInfo, channels: int, gram: bool) -> None:
        self.layer = layer
        self.gram_requested = gram
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sum_abs = torch.zeros(channels, dtype=torch.float64)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64)
        self.want_gram = gram
        self.gram: torch.Tensor | None = None
        self.gram_count = 0

    @property
    def mean(self) -> torch.Tensor:
        """Mean input per channel."""
        return self.sum / max(1, self.count)

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean absolute input per channel."""
        return self.sum_abs / max(1, self.count)

    @property
    def mean_sq(self) -> torch.Tensor:
        """Mean squared input per channel."""
        return self.sum_sq / max(1, self.count)

    @property
    def var(self) -> torch.Tensor:
        """Variance of the input per channel (FLAP's fluctuation uses this)."""
        return (self.mean_sq - self.mean**2).clamp_min(0)

    def column_mean_sq(self, n_columns: int) -> torch.Tensor:
        """Mean squared input per weight column of the ``[out, in*kernel]`` view, float64.

        Returns ``[n_columns]``, or ``[out, n_columns]`` for a grouped convolution, whose
        rows read different input channels.
        """
        ms = self.mean_sq
        groups = int(getattr(self.layer.module, "groups", 1))
        per_group = ms.numel() // groups
        if n_columns % per_group:
            raise CompressError(
                f"layer {self.layer.name!r}: {n_columns} weight columns do not match "
                f"{ms.numel()} input channels seen in calibration"
            )
        reps = n_columns // per_group
        if groups == 1:
            return ms.repeat_interleave(reps)
        out = int(self.layer.module.weight.shape[0])
        per_row = ms.reshape(groups, per_group).repeat_interleave(reps, dim=1)
        return per_row.repeat_interleave(out // groups, dim=0)

    def update(self, x: torch.Tensor) -> None:
        """Add one input tensor of the layer."""
        kind = self.layer.kind
        x = x.detach()
        if kind == "linear":
            rows = x.reshape(-1, x.shape[-1])
        else:
            spatial = 1 if kind == "conv1d" else 2
            if x.dim() == spatial + 1:  # unbatched input
                x = x.unsqueeze(0)
            rows = x.movedim(1, -1).reshape(-1, x.shape[1])
        rows64 = rows.to(torch.float64)
        self.count += rows64.shape[0]
        self.sum += rows64.sum(0).cpu()
        self.sum_abs += rows64.abs().sum(0).cpu()
        self.sum_sq += (rows64 * rows64).sum(0).cpu()
        if self.want_gram:
            mat = rows64 if kind == "linear" else self._patches(x).to(torch.float64)
            if mat is None:
                self.want_gram = False
                self.gram = None
                return
            g = (mat.t() @ mat).cpu()
            self.gram = g if self.gram is None else self.gram + g
            self.gram_count += mat.shape[0]

    def _patches(self, x: torch.Tensor) -> torch.Tensor | None:
        m = self.layer.module
        if isinstance(m.padding, str):  # 'same'/'valid': no unfold equivalent kept here
            return None
        if self.layer.kind == "conv1d":
            x = x.unsqueeze(-1)
            ks, st, pd, dl = ((m.kernel_size[0], 1), (m.stride[0], 1), (m.padding[0], 0),
                              (m.dilation[0], 1))
        else:
            ks, st, pd, dl = m.kernel_size, m.stride, m.padding, m.dilation
        cols = F.unfold(x.float(), ks, dilation=dl, padding=pd, stride=st)  # [B, C*k, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _input_channels(layer: LayerInfo) -> int:
    w = layer.module.weight
    if layer.transposed:
        return int(w.shape[0])
    if layer.kind == "linear":
        return int(w.shape[1])
    return int(w.shape[1]) * int(layer.module.groups)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def inputs_to(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``inputs`` with every tensor moved to ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model output (a tensor, ModelOutput, dict, tuple or list)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise CompressError(f"fine-tune: the model output ({type(out).__name__}) holds no tensor")


def check_calib(calib: Any) -> list[dict[str, Any]] | None:
    """Validate the ``calib`` argument: None or a non-empty list of input dicts."""
    if calib is None:
        return None
    if isinstance(calib, Mapping):
        raise CompressError(
            "calib: expected a list of input dicts (kwargs for model(**x)), found a single "
            "dict; wrap it in a list: calib=[inputs]"
        )
    if not isinstance(calib, (list, tuple)) or not all(isinstance(x, Mapping) for x in calib):
        raise CompressError(
            f"calib: expected a list of input dicts (kwargs for model(**x)), found "
            f"{type(calib).__name__}"
            + (f" of {type(calib[0]).__name__}" if isinstance(calib, (list, tuple)) and calib
               else "")
        )
    if not calib:
        raise CompressError("calib: the list of calibration inputs is empty; pass calib=None "
                            "to compress without calibration data")
    return [dict(x) for x in calib]


def run_calib(model: nn.Module, calib: list[dict[str, Any]], progress: Progress,
              desc: str = "calibration") -> None:
    """Run ``model(**x)`` for every calibration input (no grad), moving tensors to the model."""
    device = _model_device(model)
    for i, inputs in enumerate(progress_iter(calib, progress, desc)):
        kwargs = inputs_to(inputs, device)
        try:
            model(**kwargs)
        except Exception as exc:  # re-raised with context
            raise CompressError(
                f"calibration input #{i} (keys {', '.join(inputs)}) failed in the model: "
                f"{type(exc).__name__}: {exc}; pass inputs the model's forward accepts"
            ) from exc


def collect_input_stats(
    model: nn.Module,
    calib: list[dict[str, Any]],
    layers: Iterable[LayerInfo],
    gram: Callable[[LayerInfo], bool] | bool = False,
    progress: Progress = False,
) -> dict[str, InputStats]:
    """Run the calibration inputs and return input statistics for each layer, by name.

    Args:
        model: the model (unchanged).
        calib: calibration inputs, ``model(**x)``.
        layers: the layers whose inputs to watch.
        gram: whether (or a predicate saying for which layer) to keep the Gram matrix.
        progress: show a progress bar.
    """
    stats: dict[str, InputStats] = {}
    handles = []
    for layer in layers:
        want = gram(layer) if callable(gram) else bool(gram)
        st = InputStats(layer, _input_channels(layer), want)
        stats[layer.name] = st

        def hook(_mod: nn.Module, args: tuple[Any, ...], st: InputStats = st) -> None:
            if args and isinstance(args[0], torch.Tensor):
                st.update(args[0])

        handles.append(layer.module.register_forward_pre_hook(hook))
    try:
        run_calib(model, calib, progress)
    finally:
        for h in handles:
            h.remove()
    return stats


class StatsCache:
    """Calibration statistics shared by several :func:`compress` calls on one model and one
    calibration set (``compress(..., stats_cache=cache)``), so that the calibration batches
    run once instead of once per call: what compressing one layer at a time needs
    (:mod:`edgestack.profiler.sensitivity`).

    The first request runs the calibration and keeps the input statistics of the requested
    layers and of every layer named in ``watch``; later requests for those layers are
    answered from the cache. A pass that does not want a layer's Gram matrix gets the cached
    statistics without it, so a pass sees exactly what it would have collected itself.

    Valid only while the inputs of the cached layers do not change: the caller promises the
    same ``calib`` and that no layer upstream of a cached one is changed between the calls
    (each call compresses layers whose outputs no other cached layer reads, and the model
    is restored after it).

    Attributes:
        watch: names of the layers collected along with any request.
        stats: the cached statistics by layer name.
        runs: how many times the calibration batches were run.
    """

    def __init__(self, watch: Iterable[str] = ()) -> None:
        self.watch = tuple(watch)
        self.stats: dict[str, InputStats] = {}
        self.runs = 0

    def get(self, model: nn.Module, calib: list[dict[str, Any]], layers: Iterable[LayerInfo],
            gram: Callable[[LayerInfo], bool] | bool = False, progress: Progress = False
            ) -> dict[str, InputStats]:
        """Statistics of ``layers`` (as :func:`collect_input_stats` would return them),
        running the calibration only for layers not cached yet (with every uncached
        ``watch`` layer)."""
        def wants(layer: LayerInfo) -> bool:
            return bool(gram(layer) if callable(gram) else gram)

        layers = list(layers)
        missing = [lay for lay in layers if lay.name not in self.stats
                   or (wants(lay) and not self.stats[lay.name].gram_requested)]
        if missing:
            asked = {lay.name for lay in missing}
            extra = [lay for lay in iter_layers(model) if lay.name in self.watch
                     and lay.name not in asked and lay.name not in self.stats]
            self.stats.update(collect_input_stats(model, calib, missing + extra, gram=gram,
                                                  progress=progress))
            self.runs += 1
        out = {}
        for lay in layers:
            st = self.stats[lay.name]
            if st.gram is not None and not wants(lay):
                st = copy.copy(st)
                st.gram, st.gram_count, st.want_gram, st.gram_requested = None, 0, False, False
            out[lay.name] = st
        return out


# --------------------------------------------------------------------------- entry point


def select_layers(model: nn.Module, skip: tuple[str, ...] = (),
                  only: tuple[str, ...] | None = None
                  ) -> tuple[list[LayerInfo], list[SkippedLayer], list[str], int]:
    """Layers a pass may touch; skipped ones with reasons; unsupported names; supported count
    (what :func:`compress` runs before a pass).

    ``skip``: module-name prefixes left dense; ``only`` (the ``layers`` option): None, or the
    exact names of the layers a pass may touch (each must be a supported layer of the model;
    the others are recorded as skipped)."""
    unsupported = unsupported_layers(model)
    unsupported_names = [n for n, _ in unsupported]
    skipped = [SkippedLayer(n, f"unsupported layer type {t}: left dense") for n, t in unsupported]
    tied = {name: group for group in tied_parameters(model) for name in group}
    layers: list[LayerInfo] = []
    n_supported = 0
    found: set[str] = set()
    for layer in iter_layers(model):
        inside = _matches(layer.name, tuple(unsupported_names))
        if inside is not None:  # e.g. MultiheadAttention.out_proj: its parent reads .weight
            skipped.append(SkippedLayer(layer.name, f"inside unsupported module {inside!r}"))
            continue
        n_supported += 1
        found.add(layer.name)
        group = tied.get(f"{layer.name}.weight")
        if group is not None:  # e.g. an LM head tied to the input embedding
            others = ", ".join(n for n in group if n != f"{layer.name}.weight")
            skipped.append(SkippedLayer(layer.name, f"weight tied to {others}: left dense so "
                                        "the tie holds and the export stores the tensor once"))
            continue
        prefix = _matches(layer.name, skip)
        if prefix is not None:
            skipped.append(SkippedLayer(layer.name, f"matches skip prefix {prefix!r}"))
            continue
        if only is not None and layer.name not in only:
            skipped.append(SkippedLayer(layer.name, "not in the layers option"))
            continue
        layers.append(layer)
    missing = [n for n in only or () if n not in found]
    if missing:
        hint = difflib.get_close_matches(missing[0], sorted(found), n=1)
        raise CompressError(
            f"option layers: {missing[0]!r} is not a supported layer of the model "
            f"({type(model).__name__}, {len(found)} supported layers"
            + (f"; did you mean {hint[0]!r}?" if hint else "") + "); expected exact module "
            "names as model.named_modules() gives them (nn.Linear, nn.Conv1d, nn.Conv2d, "
            "GPT-2 Conv1D)"
        )
    return layers, skipped, [f"{n} ({t})" for n, t in unsupported], n_supported


def compress(
    model: nn.Module,
    method: str,
    *,
    calib: list[dict[str, Any]] | None = None,
    progress: Progress = False,
    stats_cache: StatsCache | None = None,
    **options: Any,
) -> CompressReport:
    """Compress ``model`` in place with ``method`` and report what changed.

    Args:
        model: a torch model; put in eval mode and modified in place.
        method: one of :data:`METHODS`: ``"none"`` (no change), ``"prune"`` (structured
            pruning of heads and channels), ``"shift"`` (power-of-two codes), ``"lowrank"``
            (SVD factors) or ``"bitstack"`` (sign + rank-k residual blocks).
        calib: optional calibration inputs, a list of dicts (``model(**x)``); passes use
            activation statistics from them (collected with hooks as running sums).
        progress: tqdm progress bars on stderr: ``True`` (even when stderr is not a
            terminal), ``False`` (default: none) or ``None`` (when stderr is a terminal);
            see :mod:`edgestack.core.progress`.
        stats_cache: calibration statistics shared with other calls on the same model and
            ``calib`` (:class:`StatsCache`; its validity is the caller's promise).
        **options: method options (see :func:`method_options`); every method takes
            ``skip``, a tuple of module-name prefixes to leave dense, and ``layers``: None
            (default: every supported layer) or the exact module names of the only layers
            the pass may touch (e.g. ``{"encoder.layer.0.attention.self.query"}``; a name
            that is not a supported layer of the model is refused; pruning touches a
            structure only when all its layers are named), and every method but
            ``"none"`` takes ``extra_texts``: 0 (default) or a number of sentences of
            edgestack's text corpus (:func:`edgestack.compress.calib.corpus_sentences`: the
            shipped corpus, then sentences from Python standard-library docstrings; never
            the held evaluation set) appended to ``calib``, tokenized with the model's own
            ``tokenizer.json`` like the ``calib`` batches (Hugging Face text models loaded
            from a folder only; sentences already in ``calib`` are left out). More
            calibration text, no download: on MiniLM the shipped corpus (836 sentences)
            lifted shift GPTQ 0.970 -> 0.976 and BitStack at 4.5 bits 0.955 -> 0.970
            (docs/quality.md); the docstring prose beyond it made GPTQ worse.

    Returns:
        The :class:`~edgestack.compress.report.CompressReport`.

    Raises:
        CompressError: unknown method or option, option out of range, no supported layer,
            or a weight holding NaN/Inf (checked before anything is changed).
    """
    opts = check_options(method, **options)
    calib = check_calib(calib)
    if not isinstance(model, nn.Module):
        raise CompressError(
            f"compress: expected a torch.nn.Module, found {type(model).__name__}"
        )
    model.eval()
    if method == "none":
        return CompressReport("none", opts)
    layers, skipped, unsupported, n_supported = select_layers(model, opts["skip"],
                                                               opts["layers"])
    if n_supported == 0:
        found = f"; found only unsupported layers: {', '.join(unsupported)}" if unsupported else ""
        raise CompressError(
            f"method {method!r}: the model ({type(model).__name__}) has no supported layer "
            f"(nn.Linear, nn.Conv1d, nn.Conv2d, GPT-2 Conv1D){found}; use method 'none' to "
            "export it dense"
        )
    if not layers:
        raise CompressError(
            f"method {method!r}: all {n_supported} supported layer(s) match skip={opts['skip']!r}"
            + (f" or are not in layers={opts['layers']!r}" if opts["layers"] else "")
            + "; remove some prefixes from skip, or use method 'none'"
        )
    for layer in layers:
        check_finite_weight(layer)
    if opts["extra_texts"] > 0:
        calib = list(calib or []) + model_text_calib(model, opts["extra_texts"], calib)
    ctx = PassContext(model, method, opts, layers, calib, progress, stats_cache)
    ctx.report.skipped.extend(skipped)
    if unsupported:
        msg = (f"{len(unsupported)} layer(s) of unsupported type left dense: "
               f"{', '.join(unsupported)}")
        ctx.report.warnings.append(msg)
        warnings.warn(msg, stacklevel=2)
    with torch.no_grad():
        _pass_module(method).run(ctx)
    return ctx.report


__all__ = [
    "METHODS",
    "compress",
    "method_options",
    "PassContext",
    "InputStats",
    "collect_input_stats",
    "StatsCache",
    "select_layers",
    "run_calib",
    "check_calib",
    "progress_iter",
]
