"""Channel spaces of a traced torch model: which layers must lose the same channels.

The structured-pruning pass (:mod:`edgestack.compress.prune`) uses this for models without
named Hugging Face blocks: on the module-level graph of ``torch.fx`` (:func:`trace`; plain
torch CNNs and MLPs) or, when that fails, on the ATen graph ``torch.export`` records on an
example input (:func:`export_graph`; transformers' CNNs, whose Python checks shapes). Every
tensor of the traced graph belongs to a *channel space*; operations that keep channels in
place (activations, dropout, BatchNorm, pooling, depthwise convolutions, global pooling
followed by a flatten) pass the space on, and elementwise operations on two tensors (``x +
y``, ``x * y``: residual connections, squeeze-and-excitation gates) merge the spaces of
their inputs. A space is the set of channels that must be pruned together:

- producers: ``nn.Linear`` / ``nn.Conv*`` whose output starts it (every conv that writes a
  residual stream is a producer of that stream's space);
- consumers: layers that read it (their input channels are removed);
- per-channel modules: BatchNorm (sliced) and depthwise convolutions (``groups ==
  in_channels == out_channels``: a removed channel removes its filter, so ``groups``
  shrinks with the channels);
- grouped convolutions among producers and consumers: every group must lose the same number
  of channels, so the space is split into ``lcm`` of their group counts equal blocks.

Residual streams are pruned consistently (all writers and readers of the stream lose the
same channels) rather than left alone. A space is *pinned* (left whole, with the reason)
when a channel reaches something whose channel layout is not known here: the model input or
output, an operation not listed above (a reshape, a concatenation, LayerNorm, attention), a
module called twice, a tensor whose channels are not where a consumer reads them (a linear
layer over a conv's positions), or members that disagree on the channel count.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgestack.compress.walk import layer_kind

PER_CHANNEL: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
ELEMENTWISE: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d)
_UNARY_FNS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid,
              torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish,
              F.dropout, F.hardtanh, torch.nn.functional.relu_, F.max_pool1d, F.max_pool2d,
              F.avg_pool1d, F.avg_pool2d, torch.neg, operator.neg}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "neg"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
           operator.isub, operator.imul, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}
_ADAPTIVE_FNS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
                 F.adaptive_max_pool2d}
_NON_TENSOR_METHODS = {"size", "dim"}


def is_elementwise(mod: nn.Module) -> bool:
    """Whether ``mod`` acts on each element alone (activations, dropout, identity)."""
    return isinstance(mod, ELEMENTWISE) or type(mod).__module__ == "transformers.activations"


def is_depthwise(mod: nn.Module) -> bool:
    """A depthwise convolution: one filter per channel (``groups == in == out > 1``)."""
    return (isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups > 1
            and mod.groups == mod.in_channels == mod.out_channels)


@dataclass
class Space:
    """One channel space (see the module docstring).

    Attributes:
        channels: its channel count.
        producers: names of the layers whose output channels it is.
        consumers: names of the layers that read it.
        depthwise: names of depthwise convolutions inside it.
        norms: names of BatchNorm modules inside it.
        groups: ``lcm`` of the group counts of its grouped producers and consumers.
    """

    channels: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    groups: int = 1


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return layer_kind(m) is not None or super().is_leaf_module(m, qualname)


@dataclass
class _Acc:
    producers: list[tuple[str, int, int]] = field(default_factory=list)  # name, n, groups
    consumers: list[tuple[str, int, int]] = field(default_factory=list)
    depthwise: list[tuple[str, int]] = field(default_factory=list)
    norms: list[tuple[str, int]] = field(default_factory=list)
    pinned: str | None = None


class _Spaces:
    """Union-find over channel spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.acc: list[_Acc] = []

    def new(self, pinned: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.acc.append(_Acc(pinned=pinned))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            x, y = self.acc[a], self.acc[b]
            x.producers += y.producers
            x.consumers += y.consumers
            x.depthwise += y.depthwise
            x.norms += y.norms
            x.pinned = x.pinned or y.pinned
        return a

    def pin(self, i: int, why: str) -> None:
        acc = self.acc[self.find(i)]
        acc.pinned = acc.pinned or why


@dataclass
class _T:
    """What the analysis knows of one graph value: its space, where its channels are."""

    space: int
    layout: str  # "c1": channels at dim 1 (conv); "last": channels last (linear)
    pooled: bool = False  # spatial dims reduced to 1 (a flatten keeps the channels)


def trace(model: nn.Module) -> fx.Graph:
    """The ``torch.fx`` graph of ``model``, supported layers kept as leaves."""
    return _Tracer().trace(model)


def export_graph(model: nn.Module, example: dict[str, Any]) -> tuple[fx.Graph, dict[str, str]]:
    """The ATen graph of ``model`` run on ``example`` (``torch.export``, for models that
    ``torch.fx`` cannot trace symbolically, e.g. Hugging Face CNNs checking shapes), and the
    placeholder names of its parameters and buffers -> their module names."""
    ep = torch.export.export(model, (), dict(example), strict=False)
    sig = ep.graph_signature
    owners = {ph: fqn.rpartition(".")[0] for ph, fqn in
              {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items()}
    return ep.graph, owners


_A = torch.ops.aten
_ATEN_LAYERS = {_A.conv1d.default, _A.conv2d.default, _A.linear.default}
_ATEN_NORMS = {_A.batch_norm.default, _A._native_batch_norm_legit_no_training.default}
_ATEN_UNARY = {
    _A.relu.default, _A.relu_.default, _A.hardtanh.default, _A.hardtanh_.default,
    _A.gelu.default, _A.silu.default, _A.silu_.default, _A.sigmoid.default,
    _A.sigmoid_.default, _A.tanh.default, _A.hardswish.default, _A.hardswish_.default,
    _A.hardsigmoid.default, _A.leaky_relu.default, _A.leaky_relu_.default, _A.elu.default,
    _A.mish.default, _A.dropout.default, _A.dropout_.default, _A.clone.default,
    _A.contiguous.default, _A.alias.default, _A.neg.default, _A.max_pool1d.default,
    _A.max_pool2d.default, _A.avg_pool1d.default, _A.avg_pool2d.default,
}
_ATEN_BINARY = {_A.add.Tensor, _A.add_.Tensor, _A.sub.Tensor, _A.mul.Tensor, _A.mul_.Tensor,
                _A.div.Tensor}
_ATEN_TUPLES = {_A.max_pool2d_with_indices.default, _A.max_pool1d_with_indices.default,
                _A._native_batch_norm_legit_no_training.default}  # [0] is the tensor


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    shape = getattr(val, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _aten(sp: _Spaces, node: fx.Node, x: _T | None, modules: dict[str, nn.Module],
          owners: dict[str, str], calls: dict[str, int], values: Any, unknown: Any,
          only_first: Any) -> _T | None:
    """One ATen node of an exported graph (see :func:`export_graph`)."""
    target = node.target
    label = str(target)
    if target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and src.target in _ATEN_TUPLES and node.args[1] == 0:
            return x
        return None if x is None else unknown(node, label)
    if x is None and not values((node.args, node.kwargs)):
        return None  # sizes, constants
    if target in _ATEN_LAYERS or target in _ATEN_NORMS:
        weight = node.args[1] if target in _ATEN_LAYERS or node.args[1] is not None \
            else node.args[3]  # a BatchNorm without affine: its running mean
        name = owners.get(getattr(weight, "name", ""), "")
        mod = modules.get(name)
        if mod is None:
            return unknown(node, f"{label} with weights of no module")
        if target in _ATEN_LAYERS and layer_kind(mod) is None:
            return unknown(node, f"{label} of module {name!r}")
        return _module(sp, name, mod, x, calls.get(name, 1), lambda what: unknown(node, what),
                       only_first(node))
    if target in _ATEN_BINARY:
        return _binary(sp, values((node.args, node.kwargs)), lambda: unknown(node, label))
    if x is None:
        return unknown(node, label)
    if (target in _ATEN_UNARY or target in _ATEN_TUPLES) and only_first(node):
        return x
    if target in (_A.pad.default, _A.constant_pad_nd.default) and only_first(node):
        shape, pads = _shape(node.args[0]), node.args[1]
        if shape is not None and x.layout == "c1" and len(pads) <= 2 * (len(shape) - 2):
            return x  # pads spatial dims only
    if target in (_A.adaptive_avg_pool2d.default, _A.adaptive_avg_pool1d.default,
                  _A.adaptive_max_pool2d.default) and only_first(node):
        sizes = node.args[1]
        return _T(x.space, x.layout, x.pooled or all(v == 1 for v in sizes))
    if target is _A.mean.dim and x.layout == "c1" and only_first(node) and \
            _spatial_dims(node.args[1]):
        keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim"))
        return _T(x.space, "c1" if keep else "last", True)
    shape_in, shape_out = _shape(node.args[0]), _shape(node)
    if x.pooled and only_first(node) and shape_in and shape_out and len(shape_out) == 2 \
            and shape_out == shape_in[:2]:  # flatten/view/squeeze of [B, C, 1, 1]
        return _T(x.space, "last", True)
    return unknown(node, label)


def channel_spaces(model: nn.Module, graph: fx.Graph, owners: dict[str, str] | None = None
                   ) -> tuple[list[Space], dict[str, str]]:
    """The unpinned channel spaces of ``model`` and, by producer name, why a space is pinned.

    ``graph``: the module-level graph of :func:`trace`, or with ``owners`` the ATen graph of
    :func:`export_graph`."""
    sp = _Spaces()
    env: dict[fx.Node, _T | None] = {}
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif owners is not None and node.target in _ATEN_LAYERS:
            name = owners.get(getattr(node.args[1], "name", ""), "")
            calls[name] = calls.get(name, 0) + 1

    def values(args: Any) -> list[_T]:
        found: list[_T] = []
        fx.node.map_arg(args, lambda n: found.append(env[n]) if env.get(n) else None)
        return found

    def unknown(node: fx.Node, what: str) -> _T:
        for t in values((node.args, node.kwargs)):
            sp.pin(t.space, f"its channels reach {what}")
        return _T(sp.new(pinned=f"made by {what}"), "c1")

    def first(node: fx.Node) -> _T | None:
        arg = node.args[0] if node.args else None
        return env.get(arg) if isinstance(arg, fx.Node) else None

    def only_first(node: fx.Node) -> bool:
        return len(values((node.args[1:], node.kwargs))) == 0

    for node in graph.nodes:
        op, target = node.op, node.target
        x = first(node) if op in ("call_module", "call_function", "call_method") else None
        out: _T | None
        if op == "placeholder" and owners is not None and node.name in owners:
            out = None  # a parameter or buffer of the exported program
        elif op == "placeholder":
            out = _T(sp.new(pinned="the model input"), "c1")
        elif op == "get_attr":
            out = _T(sp.new(pinned=f"parameter {target}"), "c1")
        elif op == "output":
            for t in values(node.args):
                sp.pin(t.space, "its channels reach the model output")
            continue
        elif op == "call_module":
            out = _module(sp, str(target), modules[target], x, calls[target],
                          lambda what, node=node: unknown(node, what), only_first(node))
        elif op == "call_function" and owners is not None:
            out = _aten(sp, node, x, modules, owners, calls, values, unknown, only_first)
        elif op in ("call_function", "call_method"):
            out = _function(sp, node, x, values, unknown, only_first)
        else:
            out = unknown(node, f"{op} {target}")
        env[node] = out
    return _collect(sp)


def _module(sp: _Spaces, name: str, mod: nn.Module, x: _T | None, n_calls: int,
            unknown: Any, only_first: bool) -> _T | None:
    """A call of module ``name`` on ``x`` (``unknown(what)`` pins; ``only_first``: no other
    argument carries channels)."""
    kind = layer_kind(mod)
    if x is None or not only_first:
        return unknown(f"module {name!r} ({type(mod).__name__})")
    if kind is not None:
        if n_calls > 1:
            return unknown(f"layer {name!r}, called {n_calls} times")
        if kind[0] == "linear":
            width_in, width_out, groups, layout = _linear_sizes(mod, kind[1]) + (1, "last")
        elif is_depthwise(mod):
            if x.layout != "c1":
                return unknown(f"depthwise convolution {name!r} over channels-last data")
            sp.acc[sp.find(x.space)].depthwise.append((name, mod.in_channels))
            return _T(x.space, "c1")
        else:
            width_in, width_out, groups, layout = (mod.in_channels, mod.out_channels,
                                                   mod.groups, "c1")
        if x.layout != layout:
            sp.pin(x.space, f"{name!r} reads it along another dimension than its channels")
        else:
            sp.acc[sp.find(x.space)].consumers.append((name, width_in, groups))
        out = sp.new()
        sp.acc[out].producers.append((name, width_out, groups))
        return _T(out, layout)
    if isinstance(mod, PER_CHANNEL):
        sp.acc[sp.find(x.space)].norms.append((name, mod.num_features))
        return x
    if is_elementwise(mod) or isinstance(mod, _POOLS):
        return x
    if isinstance(mod, _ADAPTIVE):
        size = mod.output_size
        sizes = size if isinstance(size, (tuple, list)) else (size,)
        return _T(x.space, x.layout, x.pooled or all(s == 1 for s in sizes))
    if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and x.pooled:
        return _T(x.space, "last", True)
    return unknown(f"module {name!r} ({type(mod).__name__})")


def _linear_sizes(mod: nn.Module, transposed: bool) -> tuple[int, int]:
    w = mod.weight
    return (int(w.shape[0]), int(w.shape[1])) if transposed else (int(w.shape[1]),
                                                                   int(w.shape[0]))


def _spatial_dims(dims: Any) -> bool:
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return bool(dims) and all(isinstance(d, int) and (d >= 2 or d < 0) for d in dims)


def _function(sp: _Spaces, node: fx.Node, x: _T | None, values: Any, unknown: Any,
              only_first: Any) -> _T | None:
    op, target = node.op, node.target
    method = target if op == "call_method" else None
    label = method or getattr(target, "__name__", str(target))
    if (method in _NON_TENSOR_METHODS) or (target is getattr and node.args[1] in (
            "shape", "dtype", "device", "ndim")):
        return None
    if x is None and not values((node.args, node.kwargs)):
        return None  # arithmetic on sizes
    if target in _BINARY or method in _BINARY_METHODS:
        return _binary(sp, values((node.args, node.kwargs)), lambda: unknown(
            node, f"{label} of tensors with channels in different places"))
    if x is None:
        return unknown(node, label)
    if (target in _UNARY_FNS or method in _UNARY_METHODS) and only_first(node):
        return x
    if target in _ADAPTIVE_FNS and only_first(node):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        sizes = size if isinstance(size, (tuple, list)) else (size,)
        return _T(x.space, x.layout, x.pooled or all(s == 1 for s in sizes))
    if (target is torch.mean or method == "mean") and x.layout == "c1" and only_first(node):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if _spatial_dims(dims):
            keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2
                                        else False))
            return _T(x.space, "c1" if keep else "last", True)
    if x.pooled and only_first(node):
        args = node.args[1:]
        if (target is torch.flatten or method == "flatten") and (
                args[:1] == (1,) or node.kwargs.get("start_dim") == 1):
            return _T(x.space, "last", True)
        if method in ("view", "reshape") and len(args) == 2 and args[1] == -1:
            return _T(x.space, "last", True)
        if method == "squeeze" or target is torch.squeeze:
            return _T(x.space, "last", True)
    return unknown(node, label)


def _binary(sp: _Spaces, ts: list[_T], mismatch: Any) -> _T:
    """An elementwise operation on tensors ``ts``: their spaces merge."""
    if len({t.layout for t in ts}) > 1:
        return mismatch()
    space = ts[0].space
    for t in ts[1:]:
        space = sp.union(space, t.space)
    return _T(space, ts[0].layout, all(t.pooled for t in ts))


def _collect(sp: _Spaces) -> tuple[list[Space], dict[str, str]]:
    spaces: list[Space] = []
    refused: dict[str, str] = {}
    for i in range(len(sp.parent)):
        if sp.find(i) != i:
            continue
        acc = sp.acc[i]
        if not acc.producers:
            continue
        names = [p for p, _, _ in acc.producers]
        widths = {n for _, n, _ in acc.producers + acc.consumers} | \
            {n for _, n in acc.depthwise + acc.norms}
        why = acc.pinned
        if why is None and len(widths) > 1:
            why = f"its layers disagree on the channel count ({sorted(widths)})"
        if why is None and not acc.consumers:
            why = "no layer reads its channels"
        if why is not None:
            for p in names:
                refused[p] = f"output channels left whole: {why}"
            continue
        groups = math.lcm(*(g for _, _, g in acc.producers + acc.consumers))
        spaces.append(Space(widths.pop(), names, [c for c, _, _ in acc.consumers],
                            [d for d, _ in acc.depthwise], [b for b, _ in acc.norms], groups))
    return spaces, refused


__all__ = ["Space", "channel_spaces", "trace", "export_graph", "is_depthwise",
           "is_elementwise"]
