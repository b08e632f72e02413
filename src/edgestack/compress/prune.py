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
- Llama-style attention (Llama, Mistral, Qwen2: ``q_proj``, ``k_proj``, ``v_proj`` ->
  ``o_proj``, ``head_dim``): a unit is one key/value head together with the
  ``num_attention_heads / num_key_value_heads`` query heads that read it, so grouped-query
  attention stays valid (``num_key_value_groups`` unchanged; the modules compute the head
  counts from the projection sizes). With one key/value head nothing is removed.
- Llama-style gated MLP (``gate_proj``, ``up_proj`` -> ``down_proj``): channels, removed
  from the gate and up rows and the down columns together. Llama's projections have no
  bias; bias compensation gives ``o_proj`` / ``down_proj`` one (saved by
  :func:`~edgestack.compress.pruned.save_pruned`, exported as any bias).
- Any other model that ``torch.fx`` can trace (plain torch CNNs and MLPs), or else that
  ``torch.export`` can on the first calibration input (transformers' CNNs, which check
  shapes in Python): *channel spaces* (:mod:`edgestack.compress.prune_graph`). A residual
  stream is one structure: every conv that writes it (the stem, each block's last conv,
  projection shortcuts) loses the same output channels and every layer that reads it the
  same input channels, with the BatchNorms on the way; depthwise convolutions inside a space
  lose the removed channels' filters (``groups`` shrinks with them); grouped producers and
  consumers lose the same count in every group (the space is split into ``lcm`` of their
  group counts equal blocks); squeeze-and-excitation gates (``x * gate``) join the gate's
  producer to the space. Channels that reach the model input or output, a concatenation, a
  reshape, a normalisation across channels or any operation not known to keep channels in
  place are left whole, with the reason in ``report.skipped``.
- Models that cannot be traced (data-dependent control flow, or no calibration input for
  ``torch.export``): chains inside ``nn.Sequential`` only: a ``Linear``/``Conv`` producer
  followed, through elementwise modules and per-channel ``BatchNorm`` (sliced too), by a
  consumer of the same family with ``groups=1``; a grouped-conv producer loses the same
  number of channels in every group.

Importance (:data:`IMPORTANCE`, option ``metric``; ``"auto"`` picks ``"activation"`` with
calibration data, else ``"weight"``), per channel ``c`` of the consumer input, summed over a
unit's channels:

- ``"weight"``: ``||P[c, :]|| * ||C[:, c]||``, the L2 norm of the channel's incoming producer
  weights (for heads: the value projection's rows; for a channel space: its first
  producer's) times that of its outgoing consumer weights: how much the channel can carry
  from input to output (times ``|gamma_c| / sqrt(var_c + eps)`` of a BatchNorm in between).
- ``"activation"``: ``E|a_c| * ||C[:, c]||``, the mean absolute consumer input from
  calibration times the outgoing weight norm (for heads, ``a`` is the context vector that the
  output projection reads).

- ``"fluctuation"`` (FLAP): ``Var[a_c] * ||C[:, c]||^2``, the variance of the consumer's
  input channel over the calibration data times the squared outgoing weight norm: the
  output error left after removing the channel and compensating its mean in the bias.

A metric gets the structure and its consumer's :class:`~edgestack.compress.api.InputStats`;
a structure with several consumers (a residual stream) scores the sum over its consumers.

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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from edgestack.compress.api import (
    InputStats,
    PassContext,
    inputs_to,
)
from edgestack.compress.options import IMPORTANCE_METRICS
from edgestack.compress.prune_graph import (
    PER_CHANNEL,
    channel_spaces,
    export_graph,
    is_elementwise,
    trace,
)
from edgestack.compress.report import LayerReport
from edgestack.compress.resize import shrink_layer, sync_attention_heads
from edgestack.compress.walk import (
    LayerInfo,
    dense_weight,
    iter_layers,
    layer_kind,
    replace_module,
)
from edgestack.errors import CompressError


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
        groups: the units split into this many equal blocks, each losing the same count
            (``lcm`` of the group counts of grouped-conv producers and consumers).
        more_consumers: other layers reading the same units (a residual stream's readers).
        depthwise: depthwise convolutions the units pass through (one filter per unit,
            removed with it).
        sizes: per producer name, its rows per unit when they differ from ``unit_size``
            (grouped-query attention: a unit is one key/value head of ``head_dim`` rows in
            ``k_proj``/``v_proj`` and its query heads, ``group * head_dim`` rows of
            ``q_proj`` and columns of ``o_proj``).
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
    sizes: dict[str, int] = field(default_factory=dict)
    more_consumers: list[LayerInfo] = field(default_factory=list)
    depthwise: list[LayerInfo] = field(default_factory=list)

    @property
    def consumers(self) -> list[LayerInfo]:
        """Every layer that reads the units (input columns removed)."""
        return [self.consumer, *self.more_consumers]

    @property
    def layers(self) -> list[LayerInfo]:
        return [p for p, _ in self.producers] + self.consumers + self.depthwise

    def reading(self, consumer: LayerInfo) -> Structure:
        """This structure as seen by one of its consumers (what a metric scores)."""
        return replace(self, consumer=consumer, more_consumers=[])

    def channels(self, units: torch.Tensor) -> torch.Tensor:
        """Consumer input columns of ``units`` (sorted units give sorted columns)."""
        base = units[:, None] * self.unit_size + torch.arange(self.unit_size)[None, :]
        return base.reshape(-1)

    def size_of(self, layer: LayerInfo) -> int:
        """Rows per unit of producer ``layer``."""
        return self.sizes.get(layer.name, self.unit_size)

    def rows(self, units: torch.Tensor, offsets: tuple[int, ...], size: int | None = None
             ) -> torch.Tensor:
        """Producer output rows of ``units`` for each section offset, sorted (``size``: the
        producer's rows per unit, default ``unit_size``)."""
        size = self.unit_size if size is None else size
        ch = (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)
        return torch.cat([off + ch for off in offsets])


Metric = Callable[[Structure, "InputStats | None"], torch.Tensor]


def _by_group(layer: LayerInfo) -> torch.Tensor:
    """The weight as ``[groups, out per group, in per group, kernel]`` (float32, CPU)."""
    w = dense_weight(layer).cpu()
    g = int(getattr(layer.module, "groups", 1))
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1)


def _consumer_col_norm(st: Structure) -> torch.Tensor:
    """Per input channel of the consumer (all groups), the norm of the weights reading it."""
    w = _by_group(st.consumer)
    return w.pow(2).sum(dim=(1, 3)).sqrt().reshape(-1)


def weight_importance(st: Structure, stats: InputStats | None) -> torch.Tensor:
    """Per unit: sum over its channels of ``||P[c,:]|| * ||C[:,c]||`` (no calibration)."""
    layer, offset = st.value
    pw = dense_weight(layer).cpu()
    pw = pw.reshape(pw.shape[0], -1)
    size = st.size_of(layer)  # GQA: a value head feeds the ``unit_size // size`` query heads
    rows = offset + torch.arange(st.n_units * size)
    norms = pw[rows].norm(dim=1).reshape(st.n_units, 1, size)
    norms = norms.expand(st.n_units, st.unit_size // size, size).reshape(-1)
    ch = norms * _consumer_col_norm(st)
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


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


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


def find_structures(model: nn.Module, example: dict[str, Any] | None = None
                    ) -> tuple[list[Structure], dict[str, str]]:
    """Prunable structures of ``model`` and, by layer name, why a candidate was refused.

    Hugging Face attention and MLP blocks are found by their module names. A model with none
    of them is traced with ``torch.fx`` and pruned by channel spaces
    (:mod:`edgestack.compress.prune_graph`: residual streams, depthwise and grouped
    convolutions); when ``torch.fx`` cannot trace it (control flow on shapes, as in Hugging
    Face CNNs) and an ``example`` input is given, the ``torch.export`` graph of the model on
    it is used; else chains inside ``nn.Sequential``.
    """
    found, refused, chains, chain_refused = _named_structures(model)
    if found:  # a Hugging Face model: its named blocks and any nn.Sequential chains
        return found + chains, {**refused, **chain_refused}
    try:
        graph, owners = trace(model), None
    except Exception as exc:  # any tracing failure: torch.export, else Sequential chains
        graph, owners, why = None, None, _first_line(exc)
        if example is not None:
            try:
                graph, owners = export_graph(model, example)
            except Exception as exc2:  # reported as the reason
                why += f"; torch.export on the calibration input: {_first_line(exc2)}"
    if graph is None:
        in_chain = {layer.name for st in chains for layer in st.layers}
        refused.update(chain_refused)
        for layer in iter_layers(model):
            if layer.name not in in_chain:
                refused.setdefault(layer.name, "not part of a prunable structure (torch.fx "
                                   f"cannot trace the model: {why})")
        return chains, refused
    return _graph_structures(model, graph, owners, refused), refused


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _graph_structures(model: nn.Module, graph: Any, owners: dict[str, str] | None,
                      refused: dict[str, str]) -> list[Structure]:
    spaces, pinned = channel_spaces(model, graph, owners)
    refused.update(pinned)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    found = []
    for space in spaces:
        prod, cons, dws, norms = (sorted(names, key=order.__getitem__) for names in (
            space.producers, space.consumers, space.depthwise, space.norms))
        producers = [_info(model, n) for n in prod]
        consumers = [_info(model, n) for n in cons]
        depthwise = [_info(model, n) for n in dws]
        if any(x is None for x in producers + consumers + depthwise):
            continue  # not a supported layer (cannot happen for traced leaves)
        name = "+".join(prod) + "->" + "+".join(cons)
        found.append(Structure(
            name, "channel", space.channels, 1, [(p, (0,)) for p in producers],
            (producers[0], 0), consumers[0],
            [(n, model.get_submodule(n)) for n in norms], space.groups,
            more_consumers=consumers[1:], depthwise=depthwise))
    return found


def _named_structures(model: nn.Module) -> tuple[list[Structure], dict[str, str],
                                                 list[Structure], dict[str, str]]:
    """Structures found by module names, their refusals, the ``nn.Sequential`` chains and
    theirs."""
    found: list[Structure] = []
    chains: list[Structure] = []
    refused: dict[str, str] = {}
    chain_refused: dict[str, str] = {}
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
        # GPT-2 MLP.
        elif hasattr(mod, "c_fc") and hasattr(mod, "c_proj"):
            p, c = _info(model, _join(name, "c_fc")), _info(model, _join(name, "c_proj"))
            if p and c and _out_features(p) == _in_features(c):
                found.append(Structure(name, "channel", _out_features(p), 1, [(p, (0,))],
                                       (p, 0), c))
        # Llama-style attention (Llama, Mistral, Qwen2, ...): q/k/v/o_proj, head_dim.
        elif all(hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            st = _llama_attention(model, name, mod)
            if isinstance(st, str):
                refused[name] = st
            else:
                found.append(st)
        # Llama-style gated MLP: down_proj(act(gate_proj(x)) * up_proj(x)).
        elif all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")):
            g, u, d = (_info(model, _join(name, p)) for p in ("gate_proj", "up_proj",
                                                               "down_proj"))
            if g and u and d and _out_features(g) == _out_features(u) == _in_features(d):
                found.append(Structure(name, "channel", _out_features(u), 1,
                                       [(g, (0,)), (u, (0,))], (u, 0), d))
            else:
                refused[name] = "gated MLP layout not recognised"
        if isinstance(mod, nn.Sequential):
            chains.extend(_sequential_chains(name, mod, chain_refused))
    return found, refused, chains, chain_refused


def _llama_attention(model: nn.Module, name: str, mod: nn.Module) -> Structure | str:
    """The structure of a Llama-style attention module, or why it has none.

    A unit is one key/value head with the ``group = heads // kv_heads`` query heads that read
    it (grouped-query attention): removing it takes ``head_dim`` rows out of ``k_proj`` and
    ``v_proj`` and ``group * head_dim`` rows of ``q_proj`` / columns of ``o_proj``, so every
    remaining query head still has its key/value head and ``num_key_value_groups`` is
    unchanged. With one key/value head (multi-query attention) nothing can go.
    """
    hd = int(mod.head_dim)
    q, k, v, o = (_info(model, _join(name, p)) for p in ("q_proj", "k_proj", "v_proj",
                                                          "o_proj"))
    if None in (q, k, v, o) or q.transposed or q.kind != "linear":
        return "attention layout not recognised (q/k/v/o_proj are not nn.Linear)"
    heads, kv = _out_features(q) // hd, _out_features(k) // hd
    if (_out_features(q) != heads * hd or _out_features(k) != kv * hd
            or _out_features(v) != kv * hd or _in_features(o) != heads * hd
            or kv < 1 or heads % kv):
        return (f"attention layout not recognised (q_proj {_out_features(q)}, k_proj "
                f"{_out_features(k)}, v_proj {_out_features(v)} rows, o_proj "
                f"{_in_features(o)} columns, head_dim {hd})")
    group = heads // kv
    if getattr(mod, "num_key_value_groups", group) != group:
        return (f"num_key_value_groups {mod.num_key_value_groups} does not match "
                f"{heads} query / {kv} key-value heads")
    return Structure(name, "kv_group", kv, group * hd,
                     [(q, (0,)), (k, (0,)), (v, (0,))], (v, 0), o,
                     sizes={k.name: hd, v.name: hd})


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
            if is_elementwise(mod):
                j += 1
            elif isinstance(mod, PER_CHANNEL) and mod.num_features == width:
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
    for unit in dict.fromkeys(st.unit for st in structures):
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
    """``C[:, removed] @ E[a_removed]`` (kernel summed; each group's rows read only its own
    input channels)."""
    w = _by_group(st.consumer).sum(-1).to(torch.float64)  # [groups, out/g, in/g]
    groups, per_out, per_in = w.shape
    cols = st.channels(removed)
    mean = stats.mean.index_select(0, cols)
    delta = torch.zeros(groups, per_out, dtype=torch.float64)
    for g in range(groups):
        mine = (cols // per_in) == g
        if mine.any():
            delta[g] = w[g].index_select(1, cols[mine] % per_in) @ mean[mine]
    return delta.reshape(-1)


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
    example = inputs_to(ctx.calib[0], _device(ctx.model)) if ctx.calib else None
    structures, refused = find_structures(ctx.model, example)
    reasons: dict[str, str] = {}
    usable: list[Structure] = []
    used_out: set[str] = set()
    used_in: set[str] = set()
    for st in structures:
        names = [layer.name for layer in st.layers]
        missing = [n for n in names if n not in allowed]
        prod_names = {p.name for p, _ in st.producers} | {d.name for d in st.depthwise}
        cons_names = {c.name for c in st.consumers} | {d.name for d in st.depthwise}
        if missing:
            for n in names:
                reasons.setdefault(n, f"structure {st.name!r} has a layer left dense "
                                      f"({missing[0]})")
        elif prod_names & used_out or cons_names & used_in:
            for n in names:
                reasons.setdefault(n, f"structure {st.name!r} overlaps another structure")
        else:
            used_out |= prod_names
            used_in |= cons_names
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
        consumers = {c.name: c for st in usable for c in st.consumers}
        stats = ctx.input_stats(consumers.values())
    elif metric_name != "weight" and usable:
        metric(usable[0], None)  # raises the "needs calibration" error

    plans: dict[str, _LayerPlan] = {}
    shrink_norms: list[tuple[str, torch.Tensor]] = []
    all_scores = {st.name: sum(metric(st.reading(c), stats.get(c.name)) for c in st.consumers)
                  for st in usable}
    global_keep = adaptive_keep(usable, all_scores, o["ratio"]) if o["adaptive"] else {}
    for st in ctx.iterate(usable, "prune"):
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
        if st.unit == "kv_group":  # each unit holds unit_size // head_dim query heads
            per = st.unit_size // st.size_of(st.value[0])
            info["query_heads"] = [st.n_units * per, int(keep.numel()) * per]
        for layer, offsets in st.producers:
            plan = plans.setdefault(layer.name, _LayerPlan(layer))
            plan.keep_out = st.rows(keep, offsets, st.size_of(layer))
            plan.structures[st.name] = info
        for consumer in st.consumers:
            plan = plans.setdefault(consumer.name, _LayerPlan(consumer))
            plan.keep_in = st.channels(keep)
            plan.structures[st.name] = info
            cst = stats.get(consumer.name)
            if cst is not None and o["bias_compensation"]:
                plan.bias_delta = _compensation(st.reading(consumer), cst, removed)
                info["bias_compensated"] = True
        for dw in st.depthwise:  # one filter per channel: the removed channels' filters go
            plan = plans.setdefault(dw.name, _LayerPlan(dw))
            plan.keep_out = plan.keep_in = st.channels(keep)
            plan.structures[st.name] = info
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
