"""Structured pruning pass: attention heads and hidden channels removed, layers made smaller.

Rewrites (in place): for each prunable *structure* (producers whose output units a consumer
reads), the lowest-importance ``floor(ratio * units)`` units are removed: the producers lose
those output rows, the consumer loses those input columns, each via
:func:`~edgestack.compress.resize.shrink_layer` (physically smaller ``nn.Linear`` /
``nn.Conv*`` / ``Conv1D``), and attention modules get their head counts updated
(:func:`~edgestack.compress.resize.sync_attention_heads`). At least one unit always stays.

Structures found (:func:`find_structures`):

- BERT-family attention (``*.attention.self.{query,key,value}`` -> ``*.attention.output.
  dense``): units are heads of ``attention_head_size`` channels.
- BERT-family MLP (``*.intermediate.dense`` -> ``*.output.dense``): units are channels.
- GPT-2 attention (``*.attn.c_attn`` fused q|k|v ``Conv1D`` -> ``*.attn.c_proj``): heads,
  removed from the q, k and v sections alike. Cross-attention is left alone.
- GPT-2 MLP (``*.mlp.c_fc`` -> ``*.mlp.c_proj``): channels.
- Gated MLP of Llama-style decoders (Llama, Qwen2, Mistral: ``*.mlp.{gate_proj,up_proj}``
  -> ``*.mlp.down_proj``): channels, removed from gate and up alike. Their attention (grouped
  key/value heads, rotary) is left whole, so the KV-cache shapes of an export stay those of
  the config.
- Generic chains inside ``nn.Sequential``: a ``Linear``/``Conv`` producer followed, through
  elementwise modules (activations, dropout, identity) and per-channel ``BatchNorm`` (sliced
  too), by a consumer of the same family with ``groups=1``. A grouped-conv producer loses
  the same number of channels in every group; a grouped consumer makes the chain unprunable.

Importance (:data:`IMPORTANCE`, option ``metric``; ``"auto"`` picks ``"activation"`` with
calibration data, else ``"weight"``), per channel ``c`` of the consumer input, summed over a
unit's channels:

- ``"weight"``: ``||P[c, :]|| * ||C[:, c]||``, the L2 norm of the channel's incoming producer
  weights (for heads: the value projection's rows) times that of its outgoing consumer
  weights: how much the channel can carry from input to output (times
  ``|gamma_c| / sqrt(var_c + eps)`` of a BatchNorm in between).
- ``"activation"``: ``E|a_c| * ||C[:, c]||``, the mean absolute consumer input from
  calibration times the outgoing weight norm (for heads, ``a`` is the context vector that the
  output projection reads).

- ``"fluctuation"`` (FLAP): ``Var[a_c] * ||C[:, c]||^2``, the variance of the consumer's
  input channel over the calibration data times the squared outgoing weight norm: the
  output error left after removing the channel and compensating its mean in the bias.

A metric gets the structure and its consumer's :class:`~edgestack.compress.api.InputStats`.

Adaptive ratios (``adaptive=True``, FLAP's global standardized score): each structure's unit
scores are standardized (``(s - mean) / std`` within the structure), then the units of all
structures of one unit kind (heads together, channels together) are ranked together and the
lowest ``floor(ratio * total)`` are removed, so sensitive blocks keep more units and
insensitive ones lose more (at least one unit per structure stays). The overall fraction
removed per unit kind is still ``ratio``.

Bias compensation (with ``calib`` and ``bias_compensation=True``, the default): the removed
channels' mean contribution is folded into the consumer bias,
``b += C[:, removed] @ E[a_removed]`` (for a conv, ``C`` summed over the kernel), creating a
bias where there was none. For heads this is the mean of the removed heads' context vectors.

Saving: a pruned Hugging Face model is written as a model folder with per-layer sizes by
:func:`edgestack.compress.pruned.save_pruned` and read back by
:func:`~edgestack.compress.pruned.load_pruned` (the HF config alone cannot express fewer
BERT heads of the same size or per-layer MLP widths; see that module).

Options:
    ratio: fraction of units removed per structure, in [0, 0.9] (default 0.25), so about
        that fraction of its parameters: the meaning ``ratio`` has for every method.
    metric: ``"auto"`` (``"activation"`` with calib, else ``"weight"``), ``"weight"``,
        ``"activation"`` or ``"fluctuation"`` (both need calib).
    adaptive: False (default: the same ratio in every structure) or True (global
        standardized ranking, see above).
    bias_compensation: fold removed channels' means into the consumer bias (needs calib).
    extra_texts: more sentences of the shipped corpus appended to ``calib`` (an option of
        every method; see :func:`edgestack.compress.compress`).
    skip: module-name prefixes to leave dense (a structure with a skipped layer is kept).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgestack.compress.api import (
    InputStats,
    PassContext,
)
from edgestack.compress.options import IMPORTANCE_METRICS
from edgestack.compress.report import LayerReport
from edgestack.compress.resize import shrink_layer, sync_attention_heads
from edgestack.compress.walk import LayerInfo, dense_weight, layer_kind, replace_module
from edgestack.errors import CompressError

_ELEMENTWISE: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
)
_PER_CHANNEL: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Structure:
    """Producers whose output units one consumer reads; pruning removes whole units.

    Attributes:
        name: the structure's name (attention/MLP module, or ``seq[i]->seq[j]``).
        unit: ``"head"`` or ``"channel"``.
        n_units: number of units; ``unit_size`` channels each.
        producers: ``(layer, offsets)``: unit ``u`` is output rows
            ``offset + u*unit_size + [0, unit_size)`` for each offset.
        value: ``(layer, offset)`` of the producer rows the consumer reads (weight metric).
        consumer: unit ``u`` is its input columns ``u*unit_size + [0, unit_size)``.
        between: ``(name, module)`` of per-channel modules (BatchNorm) between producer and
            consumer; sliced with the producer, and their scale enters the weight metric.
        groups: a grouped-conv producer's group count (same removal in every group).
    """

    name: str
    unit: str
    n_units: int
    unit_size: int
    producers: list[tuple[LayerInfo, tuple[int, ...]]]
    value: tuple[LayerInfo, int]
    consumer: LayerInfo
    between: list[tuple[str, nn.Module]] = field(default_factory=list)
    groups: int = 1

    @property
    def layers(self) -> list[LayerInfo]:
        return [p for p, _ in self.producers] + [self.consumer]

    def channels(self, units: torch.Tensor) -> torch.Tensor:
        """Consumer input columns of ``units`` (sorted units give sorted columns)."""
        base = units[:, None] * self.unit_size + torch.arange(self.unit_size)[None, :]
        return base.reshape(-1)

    def rows(self, units: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
        """Producer output rows of ``units`` for each section offset, sorted."""
        ch = self.channels(units)
        return torch.cat([off + ch for off in offsets])


Metric = Callable[[Structure, "InputStats | None"], torch.Tensor]


def _consumer_col_norm(st: Structure) -> torch.Tensor:
    w = dense_weight(st.consumer).cpu()
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)[: st.n_units * st.unit_size]


def weight_importance(st: Structure, stats: InputStats | None) -> torch.Tensor:
    """Per unit: sum over its channels of ``||P[c,:]|| * ||C[:,c]||`` (no calibration)."""
    layer, offset = st.value
    pw = dense_weight(layer).cpu()
    pw = pw.reshape(pw.shape[0], -1)
    rows = offset + torch.arange(st.n_units * st.unit_size)
    ch = pw[rows].norm(dim=1) * _consumer_col_norm(st)
    for _, bn in st.between:  # BatchNorm rescales each channel on the way
        gain = torch.ones(ch.numel())
        if bn.track_running_stats and bn.running_var is not None:
            gain = gain / (bn.running_var.detach().float().cpu() + bn.eps).sqrt()
        if bn.affine:
            gain = gain * bn.weight.detach().float().cpu().abs()
        ch = ch * gain
    return ch.reshape(st.n_units, st.unit_size).sum(1)


def activation_importance(st: Structure, stats: InputStats | None) -> torch.Tensor:
    """Per unit: sum over its channels of ``E|a_c| * ||C[:,c]||`` (calibration)."""
    if stats is None:
        raise CompressError(
            f"prune metric 'activation' needs calibration data for {st.name!r}; pass calib=[...]"
            " or metric='weight'"
        )
    ch = stats.mean_abs.to(torch.float32) * _consumer_col_norm(st)
    return ch.reshape(st.n_units, st.unit_size).sum(1)


def fluctuation_importance(st: Structure, stats: InputStats | None) -> torch.Tensor:
    """FLAP's fluctuation: per unit, sum over its channels of ``Var[a_c] * ||C[:,c]||^2``.

    A channel whose input barely varies around its mean carries little information: after
    its removal the bias compensation restores its mean contribution, and the output error
    left is exactly ``Var[a_c] * ||C[:,c]||^2`` (for one channel alone).
    """
    if stats is None:
        raise CompressError(
            f"prune metric 'fluctuation' needs calibration data for {st.name!r}; pass "
            "calib=[...] or metric='weight'"
        )
    ch = stats.var.to(torch.float32) * _consumer_col_norm(st).pow(2)
    return ch.reshape(st.n_units, st.unit_size).sum(1)


#: Importance metrics by name; each returns one score per unit (higher = keep).
IMPORTANCE: dict[str, Metric] = {
    "weight": weight_importance,
    "activation": activation_importance,
    "fluctuation": fluctuation_importance,
}
assert tuple(IMPORTANCE) == IMPORTANCE_METRICS, "options.IMPORTANCE_METRICS is out of date"


# --------------------------------------------------------------------------- discovery


def _info(model: nn.Module, name: str) -> LayerInfo | None:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    kind = layer_kind(mod)
    return LayerInfo(name, mod, kind[0], kind[1]) if kind else None


def _out_features(layer: LayerInfo) -> int:
    w = layer.module.weight
    return int(w.shape[1] if layer.transposed else w.shape[0])


def _in_features(layer: LayerInfo) -> int:
    w = layer.module.weight
    if layer.transposed:
        return int(w.shape[0])
    return int(w.shape[1]) * int(getattr(layer.module, "groups", 1))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_elementwise(mod: nn.Module) -> bool:
    return isinstance(mod, _ELEMENTWISE) or type(mod).__module__ == "transformers.activations"


def find_structures(model: nn.Module) -> tuple[list[Structure], dict[str, str]]:
    """Prunable structures of ``model`` and, by layer name, why a candidate was refused."""
    found: list[Structure] = []
    refused: dict[str, str] = {}
    for name, mod in model.named_modules():
        # BERT-family self-attention: query/key/value, output projection in a sibling.
        if all(hasattr(mod, a) for a in ("query", "key", "value", "num_attention_heads",
                                         "attention_head_size")):
            parent = name.rpartition(".")[0]
            q, k, v = (_info(model, _join(name, p)) for p in ("query", "key", "value"))
            o = _info(model, _join(parent, "output.dense"))
            heads, size = int(mod.num_attention_heads), int(mod.attention_head_size)
            if None in (q, k, v, o) or any(_out_features(x) != heads * size for x in (q, k, v)) \
                    or _in_features(o) != heads * size:
                refused[name] = "attention layout not recognised"
                continue
            found.append(Structure(name, "head", heads, size,
                                   [(q, (0,)), (k, (0,)), (v, (0,))], (v, 0), o))
        # BERT-family MLP: intermediate.dense -> output.dense.
        elif hasattr(mod, "intermediate") and hasattr(mod, "output"):
            p = _info(model, _join(name, "intermediate.dense"))
            c = _info(model, _join(name, "output.dense"))
            if p and c and _out_features(p) == _in_features(c):
                found.append(Structure(_join(name, "intermediate"), "channel",
                                       _out_features(p), 1, [(p, (0,))], (p, 0), c))
        # GPT-2 attention: fused q|k|v Conv1D.
        elif all(hasattr(mod, a) for a in ("c_attn", "c_proj", "num_heads", "head_dim",
                                           "split_size")):
            heads, size = int(mod.num_heads), int(mod.head_dim)
            e = heads * size
            p, c = _info(model, _join(name, "c_attn")), _info(model, _join(name, "c_proj"))
            if hasattr(mod, "q_attn") or getattr(mod, "is_cross_attention", False):
                refused[name] = "cross-attention is not pruned"
                continue
            if not p or not c or _out_features(p) != 3 * e or _in_features(c) != e:
                refused[name] = "attention layout not recognised"
                continue
            found.append(Structure(name, "head", heads, size, [(p, (0, e, 2 * e))],
                                   (p, 2 * e), c))
        # Gated MLP (Llama, Qwen2, Mistral): act(gate_proj(x)) * up_proj(x) -> down_proj.
        elif all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")):
            g, u, c = (_info(model, _join(name, a)) for a in ("gate_proj", "up_proj",
                                                              "down_proj"))
            if g and u and c and _out_features(g) == _out_features(u) == _in_features(c):
                found.append(Structure(name, "channel", _out_features(u), 1,
                                       [(g, (0,)), (u, (0,))], (u, 0), c))
            else:
                refused[name] = "gated MLP layout not recognised"
        # GPT-2 MLP.
        elif hasattr(mod, "c_fc") and hasattr(mod, "c_proj"):
            p, c = _info(model, _join(name, "c_fc")), _info(model, _join(name, "c_proj"))
            if p and c and _out_features(p) == _in_features(c):
                found.append(Structure(name, "channel", _out_features(p), 1, [(p, (0,))],
                                       (p, 0), c))
        if isinstance(mod, nn.Sequential):
            found.extend(_sequential_chains(name, mod, refused))
    return found, refused


def _sequential_chains(seq_name: str, seq: nn.Sequential, refused: dict[str, str]
                       ) -> list[Structure]:
    children = list(seq.named_children())
    chains = []
    for i, (pname, pmod) in enumerate(children):
        pk = layer_kind(pmod)
        if pk is None:
            continue
        producer = LayerInfo(_join(seq_name, pname), pmod, *pk)
        width = _out_features(producer)
        between = []
        j = i + 1
        while j < len(children):
            mod = children[j][1]
            if _is_elementwise(mod):
                j += 1
            elif isinstance(mod, _PER_CHANNEL) and mod.num_features == width:
                between.append((_join(seq_name, children[j][0]), mod))
                j += 1
            else:
                break
        if j == len(children):
            continue
        cname, cmod = children[j]
        ck = layer_kind(cmod)
        if ck is None:
            continue
        consumer = LayerInfo(_join(seq_name, cname), cmod, *ck)
        link = f"{producer.name}->{consumer.name}"
        if ck[0] != pk[0] or _in_features(consumer) != width:
            continue  # not a channel chain (e.g. conv feeding a linear over positions)
        if getattr(cmod, "groups", 1) != 1:
            refused[link] = (f"consumer {consumer.name!r} is a grouped convolution "
                             f"(groups={cmod.groups}); its input channels cannot be pruned")
            continue
        groups = int(getattr(pmod, "groups", 1))
        chains.append(Structure(link, "channel", width, 1, [(producer, (0,))], (producer, 0),
                                consumer, between, groups))
    return chains


# --------------------------------------------------------------------------- planning


def select_units(scores: torch.Tensor, ratio: float, groups: int = 1) -> torch.Tensor:
    """Sorted indices of the units to keep: drop the ``floor(ratio*n)`` lowest scores.

    With ``groups``, units are split into equal contiguous groups and each group drops the
    same count. At least one unit per group stays; ties keep the lower index.
    """
    n = scores.numel()
    per = n // groups
    drop = min(math.floor(ratio * per + 1e-9), per - 1)
    keep = []
    for g in range(groups):
        s = scores[g * per:(g + 1) * per]
        order = torch.argsort(s, descending=True, stable=True)
        keep.append(order[: per - drop] + g * per)
    return torch.sort(torch.cat(keep)).values


def adaptive_keep(structures: list[Structure], scores: dict[str, torch.Tensor], ratio: float
                  ) -> dict[str, torch.Tensor]:
    """FLAP-style global selection: standardized scores ranked across structures of a kind.

    Grouped structures (``groups > 1``) keep the per-structure rule. Returns the sorted
    units to keep per structure name.
    """
    keep: dict[str, torch.Tensor] = {}
    for unit in ("head", "channel"):
        group = [st for st in structures if st.unit == unit and st.groups == 1]
        if not group:
            continue
        pooled = []
        for st in group:
            s = scores[st.name].to(torch.float64)
            z = (s - s.mean()) / s.std().clamp_min(1e-12) if s.numel() > 1 else s * 0
            for u in range(st.n_units):
                pooled.append((float(z[u]), st.name, u))
        total = len(pooled)
        drop = math.floor(ratio * total + 1e-9)
        pooled.sort()
        left = {st.name: st.n_units for st in group}
        dropped: dict[str, set[int]] = {st.name: set() for st in group}
        for _z, name, u in pooled:
            if drop == 0:
                break
            if left[name] > 1:
                dropped[name].add(u)
                left[name] -= 1
                drop -= 1
        for st in group:
            keep[st.name] = torch.tensor(
                [u for u in range(st.n_units) if u not in dropped[st.name]], dtype=torch.int64)
    return keep


@dataclass
class _LayerPlan:
    layer: LayerInfo
    keep_out: torch.Tensor | None = None
    keep_in: torch.Tensor | None = None
    bias_delta: torch.Tensor | None = None
    structures: dict[str, dict[str, Any]] = field(default_factory=dict)


def _compensation(st: Structure, stats: InputStats, removed: torch.Tensor) -> torch.Tensor:
    w = dense_weight(st.consumer).cpu()
    cols = st.channels(removed)
    wr = w.index_select(1, cols)
    if wr.dim() > 2:
        wr = wr.reshape(wr.shape[0], wr.shape[1], -1).sum(-1)
    return wr.to(torch.float64) @ stats.mean.index_select(0, cols)


def _slice_norm(model: nn.Module, name: str, keep: torch.Tensor) -> None:
    bn = model.get_submodule(name)
    new = type(bn)(keep.numel(), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight.index_select(0, keep))
            new.bias.copy_(bn.bias.index_select(0, keep))
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean.index_select(0, keep))
            new.running_var.copy_(bn.running_var.index_select(0, keep))
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.to(device=bn.weight.device if bn.affine else None).eval().requires_grad_(False)
    replace_module(model, name, new)


def run(ctx: PassContext) -> None:
    """Prune every structure of ``ctx.model`` whose layers are all in ``ctx.layers``."""
    o = ctx.options
    allowed = {layer.name: layer for layer in ctx.layers}
    structures, refused = find_structures(ctx.model)
    reasons: dict[str, str] = {}
    usable: list[Structure] = []
    used_out: set[str] = set()
    used_in: set[str] = set()
    for st in structures:
        names = [layer.name for layer in st.layers]
        missing = [n for n in names if n not in allowed]
        prod_names = {p.name for p, _ in st.producers}
        if missing:
            for n in names:
                reasons.setdefault(n, f"structure {st.name!r} has a layer left dense "
                                      f"({missing[0]})")
        elif prod_names & used_out or st.consumer.name in used_in:
            for n in names:
                reasons.setdefault(n, f"structure {st.name!r} overlaps another structure")
        else:
            used_out |= prod_names
            used_in.add(st.consumer.name)
            usable.append(st)
    for link, why in refused.items():
        for n in allowed:
            if n == link or n.startswith(link + ".") or n in link.split("->"):
                reasons.setdefault(n, why)

    metric_name = o["metric"]
    if metric_name == "auto":
        metric_name = "activation" if ctx.calib is not None else "weight"
    metric = IMPORTANCE[metric_name]
    stats: dict[str, InputStats] = {}
    if ctx.calib is not None and usable:
        consumers = {st.consumer.name: st.consumer for st in usable}
        stats = ctx.input_stats(consumers.values())
    elif metric_name != "weight" and usable:
        metric(usable[0], None)  # raises the "needs calibration" error

    plans: dict[str, _LayerPlan] = {}
    shrink_norms: list[tuple[str, torch.Tensor]] = []
    all_scores = {st.name: metric(st, stats.get(st.consumer.name)) for st in usable}
    global_keep = adaptive_keep(usable, all_scores, o["ratio"]) if o["adaptive"] else {}
    for st in ctx.iterate(usable, "prune"):
        cst = stats.get(st.consumer.name)
        scores = all_scores[st.name]
        keep = global_keep[st.name] if st.name in global_keep else \
            select_units(scores, o["ratio"], st.groups)
        if keep.numel() == st.n_units:
            for layer in st.layers:
                reasons.setdefault(layer.name, f"ratio {o['ratio']} removes no {st.unit} of "
                                               f"{st.n_units} in {st.name!r}")
            continue
        removed = torch.tensor(sorted(set(range(st.n_units)) - set(keep.tolist())),
                               dtype=torch.int64)
        info = {"unit": st.unit, "units": st.n_units, "kept": int(keep.numel()),
                "removed": removed.tolist(), "metric": metric_name}
        for layer, offsets in st.producers:
            plan = plans.setdefault(layer.name, _LayerPlan(layer))
            plan.keep_out = st.rows(keep, offsets)
            plan.structures[st.name] = info
        plan = plans.setdefault(st.consumer.name, _LayerPlan(st.consumer))
        plan.keep_in = st.channels(keep)
        plan.structures[st.name] = info
        if cst is not None and o["bias_compensation"]:
            plan.bias_delta = _compensation(st, cst, removed)
            info["bias_compensated"] = True
        for bn, _ in st.between:
            shrink_norms.append((bn, st.channels(keep)))

    for layer in ctx.layers:  # model order, so the report lists layers as the model does
        if layer.name in plans:
            _apply(ctx, plans[layer.name])
    for bn, keep in shrink_norms:
        _slice_norm(ctx.model, bn, keep)
    heads = sync_attention_heads(ctx.model)
    for rep in ctx.report.layers:
        for attn, count in heads:
            if rep.name.startswith(attn + "."):
                rep.details["heads"] = count
    for layer in ctx.layers:
        if layer.name not in plans:
            ctx.skip(layer.name, reasons.get(layer.name, "not part of a prunable structure"))
    if not plans:
        msg = "prune: no structure was pruned; see report.skipped for the reasons"
        ctx.report.warnings.append(msg)
        warnings.warn(msg, stacklevel=3)


def _apply(ctx: PassContext, plan: _LayerPlan) -> None:
    layer = plan.layer
    w = dense_weight(layer)
    bias = None
    if plan.bias_delta is not None:
        old = getattr(layer.module, "bias", None)
        full = torch.zeros(w.shape[0], dtype=torch.float64) if old is None else \
            old.detach().to(torch.float64).cpu()
        full = full + plan.bias_delta
        if plan.keep_out is not None:
            full = full.index_select(0, plan.keep_out)
        bias = full.to(w.dtype)
    keep_out = None if plan.keep_out is None else plan.keep_out.to(w.device)
    keep_in = None if plan.keep_in is None else plan.keep_in.to(w.device)
    new = shrink_layer(ctx.model, layer, keep_out, keep_in, bias)
    new_numel = new.weight.numel()
    out_new = w.shape[0] if keep_out is None else keep_out.numel()
    in_new = _in_features(layer) if keep_in is None else keep_in.numel()
    ctx.report.layers.append(LayerReport(
        layer.name, layer.kind, tuple(w.shape), 4 * w.numel(), 4 * new_numel,
        {"out": [int(w.shape[0]), int(out_new)], "in": [_in_features(layer), int(in_new)],
         "bias_compensated": plan.bias_delta is not None,
         "structures": plan.structures},
    ))
