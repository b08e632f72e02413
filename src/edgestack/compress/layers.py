"""Compressed layer modules.

A compressed layer is a :class:`CompressedLayer` (linear or convolution arithmetic, bias)
holding a *weight module* that decodes its weight from compressed buffers on every forward:
:class:`ShiftWeight` or :class:`BitStackWeight`. The decode runs through the
``torch.ops.edgestack.*`` custom ops, which the exporter turns into ``edgestack``-domain ONNX
nodes, so the packed buffers become the ONNX initializers and the weight stays compressed.

Low-rank layers (:class:`LowRankLinear`, :class:`LowRankConv`) are two ordinary layers in a
row and export as standard ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgestack.compress import ops  # noqa: F401  (registers torch.ops.edgestack.*)
from edgestack.compress.walk import LayerInfo
from edgestack.errors import CompressError
from edgestack.formats import BitStackStack, LowRankFactors, ShiftCodes


class _DecodedWeight(nn.Module):
    """A weight module that decodes on every forward, or, inside :func:`decoded_weights`,
    once per state of its buffers (never while torch compiles or exports: a traced graph
    always holds the decode)."""

    _decoded: list[Any] | None = None

    def decode(self) -> torch.Tensor:
        raise NotImplementedError

    def state_key(self) -> tuple[Any, ...]:
        """What the decoded weight depends on: every buffer's identity and version."""
        return tuple((b.data_ptr(), b._version) for b in self.buffers())

    def forward(self) -> torch.Tensor:
        cache = self._decoded
        if cache is None or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self.decode()
        key = self.state_key()
        if cache[0] != key:
            cache[:] = [key, self.decode().detach()]
        return cache[1]


@contextlib.contextmanager
def decoded_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Serve every compressed weight of ``model`` from memory while the context is open.

    A compressed layer decodes its weight on every forward (as the exported graph does);
    an evaluation loop that runs the model many times (greedy generation, a calibration
    sweep) decodes the same weight again each time. Inside this context each weight is
    decoded once and kept (a float32 copy per layer: dense memory, host-side only) until its
    buffers or its active blocks change; torch.export and torch.compile still trace the
    decode. Nested use is allowed; leaving the outermost context drops the copies.
    """
    mods = [m for m in model.modules() if isinstance(m, _DecodedWeight) and m._decoded is None]
    for m in mods:
        m._decoded = [None, None]
    try:
        yield model
    finally:
        for m in mods:
            m._decoded = None


class ShiftWeight(_DecodedWeight):
    """Decodes a :class:`~edgestack.formats.ShiftCodes` weight (buffers ``codes``, ``scale``)."""

    def __init__(self, codes: ShiftCodes) -> None:
        super().__init__()
        self.bits = codes.bits
        self.zero = codes.zero
        self.shape = list(codes.shape)
        self.register_buffer("codes", torch.from_numpy(codes.codes.copy()))
        self.register_buffer("scale", torch.from_numpy(codes.scale.copy()))

    def decode(self) -> torch.Tensor:
        """The dense float32 weight."""
        return torch.ops.edgestack.shift_weight(
            self.codes, self.scale, self.bits, self.zero, self.shape
        )

    def to_format(self) -> ShiftCodes:
        """The numpy container for the current buffers."""
        return ShiftCodes(self.codes.cpu().numpy(), self.scale.cpu().numpy(),
                          tuple(self.shape), self.bits, self.zero)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, zero={self.zero}"


class BitStackWeight(_DecodedWeight):
    """Decodes a :class:`~edgestack.formats.BitStackStack` (buffers ``signs``, ``u``, ``v``).

    ``active_blocks`` (default: all) selects a prefix of the stack, which is how a tier is
    evaluated in torch; the exporter exports the active prefix.
    """

    def __init__(self, stack: BitStackStack, active_blocks: int | None = None) -> None:
        super().__init__()
        self.shape = list(stack.shape)
        self.register_buffer("signs", torch.from_numpy(stack.signs.copy()))
        self.register_buffer("u", torch.from_numpy(stack.u.copy()))
        self.register_buffer("v", torch.from_numpy(stack.v.copy()))
        self.active_blocks = stack.n_blocks if active_blocks is None else int(active_blocks)
        if not 1 <= self.active_blocks <= stack.n_blocks:
            raise CompressError(
                f"bitstack: active blocks must be in 1..{stack.n_blocks}, "
                f"found {self.active_blocks}"
            )

    @property
    def n_blocks(self) -> int:
        return int(self.signs.shape[0])

    def state_key(self) -> tuple[Any, ...]:
        return (*super().state_key(), self.active_blocks)

    def decode(self) -> torch.Tensor:
        """The dense float32 weight of the active blocks."""
        b = self.active_blocks
        if b == self.n_blocks:
            # No slice when every block is active: the exported graph then feeds the
            # buffers themselves (named after the layer) to the decode node.
            return torch.ops.edgestack.bitstack_weight(self.signs, self.u, self.v, self.shape)
        return torch.ops.edgestack.bitstack_weight(
            self.signs[:b], self.u[:b], self.v[:b], self.shape
        )

    def to_format(self) -> BitStackStack:
        """The numpy container for all stored blocks."""
        return BitStackStack(self.signs.cpu().numpy(), self.u.cpu().numpy(),
                             self.v.cpu().numpy(), tuple(self.shape))

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, blocks={self.active_blocks}/{self.n_blocks}, "
                f"k={int(self.u.shape[2])}")


class CompressedLayer(nn.Module):
    """A linear or convolution layer whose weight comes from a weight module.

    Args:
        weight: a :class:`ShiftWeight` or :class:`BitStackWeight` producing ``[out, in, *k]``.
        bias: the bias, or None.
        kind: ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
        conv: convolution settings (stride, padding, dilation, groups) for conv kinds.
    """

    def __init__(self, weight: nn.Module, bias: torch.Tensor | None, kind: str,
                 conv: dict[str, Any] | None = None) -> None:
        super().__init__()
        if kind not in ("linear", "conv1d", "conv2d"):
            raise CompressError(f"compressed layer kind must be linear/conv1d/conv2d, found {kind}")
        self.kind = kind
        self.weight_module = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                            requires_grad=False)
        self.conv = dict(conv or {})

    @classmethod
    def like(cls, layer: LayerInfo, weight: nn.Module) -> CompressedLayer:
        """A compressed layer with ``layer``'s bias, kind and convolution settings."""
        m = layer.module
        conv = None
        if layer.kind != "linear":
            conv = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation,
                    "groups": m.groups}
            if m.padding_mode != "zeros":
                raise CompressError(
                    f"layer {layer.name!r}: padding_mode {m.padding_mode!r} is not supported; "
                    "only 'zeros'"
                )
        return cls(weight, getattr(m, "bias", None), layer.kind, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_module()
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        fn = F.conv1d if self.kind == "conv1d" else F.conv2d
        return fn(x, w, self.bias, **self.conv)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, bias={self.bias is not None}, conv={self.conv}"


class LowRankLinear(nn.Module):
    """``y = u(v(x))``: ``v`` is ``Linear(in, k, bias=False)``, ``u`` is ``Linear(k, out)``."""

    def __init__(self, factors: LowRankFactors, bias: torch.Tensor | None) -> None:
        super().__init__()
        out, k = factors.u.shape
        n = factors.v.shape[1]
        self.v = nn.Linear(n, k, bias=False)
        self.u = nn.Linear(k, out, bias=bias is not None)
        with torch.no_grad():
            self.v.weight.copy_(torch.from_numpy(factors.v.astype(np.float32)))
            self.u.weight.copy_(torch.from_numpy(factors.u.astype(np.float32)))
            if bias is not None:
                self.u.bias.copy_(bias.detach())
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))


class LowRankConv(nn.Module):
    """A convolution factored as ``conv(in -> k, kernel)`` then ``conv(k -> out, 1)``."""

    def __init__(self, layer: LayerInfo, factors: LowRankFactors) -> None:
        super().__init__()
        m = layer.module
        if m.groups != 1:
            raise CompressError(
                f"layer {layer.name!r}: low-rank needs groups=1, found groups={m.groups}"
            )
        conv = nn.Conv1d if layer.kind == "conv1d" else nn.Conv2d
        out, k = factors.u.shape
        self.v = conv(m.in_channels, k, m.kernel_size, m.stride, m.padding, m.dilation,
                      bias=False)
        self.u = conv(k, out, 1, bias=m.bias is not None)
        with torch.no_grad():
            self.v.weight.copy_(torch.from_numpy(
                factors.v.astype(np.float32).reshape(self.v.weight.shape)))
            self.u.weight.copy_(torch.from_numpy(
                factors.u.astype(np.float32).reshape(self.u.weight.shape)))
            if m.bias is not None:
                self.u.bias.copy_(m.bias.detach())
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))


class MonarchLinear(nn.Module):
    """A linear layer whose weight is a Monarch matrix (two block-diagonal factors).

    For ``out = B*A`` and ``in = C*D`` and rank ``T`` per block pair::

        W[b*A + a, c*D + d] = sum_t L[b, a, c*T + t] * R[c, b*T + t, d]

    ``R`` ``[C, B*T, D]`` and ``L`` ``[B, A, C*T]`` are block-diagonal factors with a
    permutation between them. ``forward`` is reshapes, transposes and two batched MatMuls,
    so the layer exports to standard ONNX ops (Reshape, Transpose, MatMul, Add).
    Parameters: ``B*C*T*(A + D)``.
    """

    def __init__(self, left: torch.Tensor, right: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        b, a, ct = left.shape
        c, bt, d = right.shape
        if ct % c or bt % b or ct // c != bt // b:
            raise CompressError(
                f"monarch: factors L {tuple(left.shape)} and R {tuple(right.shape)} do not fit "
                "(expected L [B, A, C*T] and R [C, B*T, D])"
            )
        self.blocks = (b, a, c, d, ct // c)
        self.left = nn.Parameter(left.detach().float().clone(), requires_grad=False)
        self.right = nn.Parameter(right.detach().float().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                            requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.blocks[2] * self.blocks[3]

    @property
    def out_features(self) -> int:
        return self.blocks[0] * self.blocks[1]

    def dense(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight."""
        b, a, c, d, t = self.blocks
        l4 = self.left.reshape(b, a, c, t)
        r4 = self.right.reshape(c, b, t, d)
        w = torch.einsum("bact,cbtd->bacd", l4, r4)
        return w.reshape(b * a, c * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, a, c, d, t = self.blocks
        lead = x.shape[:-1]
        y = x.reshape(-1, c, d).transpose(0, 1)                       # [C, N, D]
        y = torch.matmul(y, self.right.transpose(1, 2))               # [C, N, B*T]
        y = y.reshape(c, -1, b, t).permute(2, 1, 0, 3).reshape(b, -1, c * t)
        z = torch.matmul(y, self.left.transpose(1, 2))                # [B, N, A]
        z = z.permute(1, 0, 2).reshape(*lead, b * a)
        return z if self.bias is None else z + self.bias

    def extra_repr(self) -> str:
        b, a, c, d, t = self.blocks
        return f"in={c * d}, out={b * a}, blocks={b}x{c}, rank={t}"


def monarch_factors(w2: torch.Tensor, b: int, c: int, t: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best Frobenius Monarch approximation of ``w2 [B*A, C*D]`` (factors ``L``, ``R``).

    The Monarch projection splits into independent rank-``t`` problems, one per block
    ``W[b*A:(b+1)*A, c*D:(c+1)*D]``, each solved by a truncated SVD (singular values split
    evenly between the factors).
    """
    m, n = w2.shape
    if m % b or n % c:
        raise CompressError(f"monarch: a {m}x{n} weight does not split into {b}x{c} blocks")
    a, d = m // b, n // c
    t = max(1, min(t, a, d))
    blocks = w2.float().reshape(b, a, c, d).permute(0, 2, 1, 3)   # [B, C, A, D]
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
    root = s[..., :t].clamp_min(0).sqrt()
    lf = u[..., :t] * root[..., None, :]                          # [B, C, A, T]
    rf = root[..., :, None] * vh[..., :t, :]                      # [B, C, T, D]
    left = lf.permute(0, 2, 1, 3).reshape(b, a, c * t)
    right = rf.permute(1, 0, 2, 3).reshape(c, b * t, d)
    return left, right
