"""Torch implementations of the ``edgestack`` weight-decode ops.

Each op is a ``torch.library.custom_op`` so that ``torch.export`` keeps it as one opaque node,
which the exporter translates to the ``edgestack``-domain ONNX node of the same name. The
bit layouts are those of :mod:`edgestack.formats.shift` and :mod:`edgestack.formats.bitstack`;
tests check these kernels against the numpy references there, bit for bit on the codes.

Ops:
    ``edgestack::shift_weight(codes, scale, bits, zero, shape) -> Tensor``
    ``edgestack::bitstack_weight(signs, u, v, shape) -> Tensor``
"""

from __future__ import annotations

import torch

_NAMESPACE = "edgestack"


def unpack_bits_torch(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Unpack ``count`` MSB-first bits from a flat uint8 tensor into uint8 0/1 values."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:count]


def unpack_uint_torch(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack ``count`` ``bits``-wide MSB-first fields into int64 values."""
    planes = unpack_bits_torch(packed, count * bits).reshape(count, bits).to(torch.int64)
    weights = 1 << torch.arange(bits - 1, -1, -1, device=packed.device, dtype=torch.int64)
    return (planes * weights).sum(dim=1)


@torch.library.custom_op(f"{_NAMESPACE}::shift_weight", mutates_args=())
def shift_weight(
    codes: torch.Tensor, scale: torch.Tensor, bits: int, zero: bool, shape: list[int]
) -> torch.Tensor:
    """Decode packed shift codes to a dense float32 weight of ``shape``."""
    numel = 1
    for d in shape:
        numel *= d
    c = unpack_uint_torch(codes, bits, numel)
    sign = c >> (bits - 1)
    e = c & ((1 << (bits - 1)) - 1)
    mag = torch.exp2(-e.to(torch.float32))
    if zero:
        mag = torch.where(e == (1 << (bits - 1)) - 1, torch.zeros_like(mag), mag)
    val = torch.where(sign == 1, -mag, mag)
    w = val.reshape(shape[0], -1) * scale.to(torch.float32).reshape(-1, 1)
    return w.reshape(shape)


@shift_weight.register_fake
def _shift_weight_fake(codes, scale, bits, zero, shape):
    return scale.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op(f"{_NAMESPACE}::bitstack_weight", mutates_args=())
def bitstack_weight(
    signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor, shape: list[int]
) -> torch.Tensor:
    """Decode a BitStack stack (all blocks given) to a dense float32 weight of ``shape``."""
    nb, m, _ = u.shape
    n = v.shape[2]
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=signs.device)
    bits = ((signs.reshape(-1, 1) >> shifts) & 1).reshape(nb, -1)[:, : m * n]
    sign = bits.to(torch.float32).reshape(nb, m, n) * 2 - 1
    mag = torch.bmm(u.to(torch.float32), v.to(torch.float32))
    return (sign * mag).sum(dim=0).reshape(shape)


@bitstack_weight.register_fake
def _bitstack_weight_fake(signs, u, v, shape):
    return u.new_empty(shape, dtype=torch.float32)


__all__ = ["shift_weight", "bitstack_weight", "unpack_bits_torch", "unpack_uint_torch"]
