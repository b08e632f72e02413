"""Bit-exact round trips and error messages of the numpy codecs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgestack.errors import FormatError
from edgestack.formats import (
    BitStackStack,
    LowRankFactors,
    PruneMap,
    ShiftCodes,
    get_format,
    pack_bits,
    pack_uint,
    registered_formats,
    unpack_bits,
    unpack_uint,
)
from edgestack.formats.bitpack import packed_size
from edgestack.formats.shift import levels

from random_weights import random_stack


def test_pack_bits_is_msb_first():
    assert pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1])).tolist() == [0x80, 0x80]
    assert pack_bits(np.array([0, 0, 0, 0, 0, 0, 1, 1])).tolist() == [0x03]


@given(st.lists(st.integers(0, 1), min_size=0, max_size=77))
def test_pack_bits_round_trip(bits):
    arr = np.array(bits, dtype=np.uint8)
    packed = pack_bits(arr)
    assert packed.size == packed_size(arr.size)
    assert np.array_equal(unpack_bits(packed, arr.size), arr)


@given(st.integers(1, 8), st.lists(st.integers(0, 255), min_size=1, max_size=41))
def test_pack_uint_round_trip(bits, values):
    vals = np.array(values) % (1 << bits)
    packed = pack_uint(vals, bits)
    assert packed.size == packed_size(vals.size, bits)
    assert np.array_equal(unpack_uint(packed, bits, vals.size), vals)


def test_pack_uint_field_layout():
    # two 3-bit fields 0b101, 0b011 -> stream 101011 + padding 00
    assert pack_uint(np.array([5, 3]), 3).tolist() == [0b10101100]


def test_pack_errors_say_what_was_found():
    with pytest.raises(FormatError, match=r"values must be in \[0, 8\), found \[0, 9\]"):
        pack_uint(np.array([0, 9]), 3)
    with pytest.raises(FormatError, match="need 2 bytes, found 1"):
        unpack_bits(np.zeros(1, np.uint8), 9)
    with pytest.raises(FormatError, match="only 0/1"):
        pack_bits(np.array([0, 2]))


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("shape", [(7, 5), (13, 3, 3, 3), (1, 9), (3,)])
def test_shift_round_trip_bit_exact(bits, zero, shape):
    rng = np.random.default_rng(bits * 10 + zero)
    w = rng.standard_normal(shape).astype(np.float32)
    codes = ShiftCodes.encode(w, bits, zero)
    again = ShiftCodes.encode(codes.decode(), bits, zero, scale=codes.scale)
    # re-encoding a decoded weight gives the same codes: the grid is a fixed point
    assert np.array_equal(again.codes, codes.codes)
    rebuilt = ShiftCodes.from_arrays(codes.arrays(), codes.attrs())
    assert np.array_equal(rebuilt.decode(), codes.decode())
    assert codes.codes.nbytes == packed_size(int(np.prod(shape)), bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_shift_decode_values_are_signed_powers_of_two(bits):
    w = np.random.default_rng(1).standard_normal((6, 11)).astype(np.float32)
    for zero in (False, True):
        c = ShiftCodes.encode(w, bits, zero)
        d = c.decode() / c.scale[:, None]
        nz = d[d != 0]
        exps = -np.log2(np.abs(nz))
        assert np.allclose(exps, np.round(exps))
        assert exps.min() >= 0 and exps.max() <= levels(bits, zero) - 1
        if not zero:
            assert (d != 0).all()
        assert np.array_equal(np.sign(d[d != 0]), np.sign(w[d != 0]))


def test_shift_rounds_to_nearest_level_linearly():
    # levels 1, 1/2, 1/4 ... with scale 1: 0.74 is nearer 0.5, 0.76 nearer 1
    w = np.array([[1.0, 0.74, 0.76, -0.3]], np.float32)
    d = ShiftCodes.encode(w, 4, False).decode()
    assert d.tolist() == [[1.0, 0.5, 1.0, -0.25]]


def test_shift_with_zero_codes_small_values_as_zero():
    w = np.array([[1.0, 1e-6, -1e-6, 0.0]], np.float32)
    d = ShiftCodes.encode(w, 2, True).decode()  # ternary: one level plus zero
    assert d.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_shift_errors():
    w = np.ones((2, 2), np.float32)
    with pytest.raises(FormatError, match=r"bits must be an integer in 2\.\.5, found 6"):
        ShiftCodes.encode(w, 6)
    bad = w.copy()
    bad[1, 0] = np.nan
    with pytest.raises(FormatError, match=r"NaN/Inf value\(s\), first at index \(1, 0\)"):
        ShiftCodes.encode(bad, 4)
    c = ShiftCodes.encode(w, 4)
    with pytest.raises(FormatError, match="need 2 bytes, found 3"):
        ShiftCodes(np.zeros(3, np.uint8), c.scale, (2, 2), 4, False)
    with pytest.raises(FormatError, match="expected dtype float32, found float64"):
        ShiftCodes(c.codes, c.scale.astype(np.float64), (2, 2), 4, False)


@pytest.mark.parametrize("shape", [(7, 5), (9, 3, 3, 3), (1, 13)])
def test_bitstack_decode_is_sum_of_signed_blocks(shape):
    s = random_stack(np.random.default_rng(0), shape, 3, 2)
    m, n = s.matrix_shape
    manual = np.zeros((m, n), np.float32)
    for i in range(3):
        bits = np.unpackbits(s.signs[i], count=m * n).reshape(m, n)
        manual += np.where(bits == 1, 1, -1) * (s.u[i].astype(np.float32)
                                                 @ s.v[i].astype(np.float32))
    assert np.allclose(s.decode(), manual.reshape(shape), atol=1e-5)
    assert np.allclose(s.decode(1), s.block(0).reshape(shape))
    assert np.array_equal(s.prefix(2).decode(), s.decode(2))
    rebuilt = BitStackStack.from_arrays(s.arrays(), s.attrs())
    assert np.array_equal(rebuilt.decode(), s.decode())


def test_bitstack_size_matches_formula():
    m, n, k, nb = 64, 48, 4, 3
    s = random_stack(np.random.default_rng(0), (m, n), nb, k)
    assert s.nbytes == nb * BitStackStack.bytes_per_block(m, n, k)
    assert s.bits_per_weight == pytest.approx(
        BitStackStack.theoretical_bits_per_weight(m, n, k, nb))


def test_bitstack_shape_errors_name_expected_and_found():
    s = random_stack(np.random.default_rng(0), (5, 7), 2, 2)
    with pytest.raises(FormatError,
                       match=r"bitstack v: expected shape \(2, 2, 7\).*found \(2, 2, 6\)"):
        BitStackStack(s.signs, s.u, s.v[:, :, :6], (5, 7))
    with pytest.raises(FormatError, match=r"asked for 3 blocks, the stack holds 0\.\.2"):
        s.decode(3)


def test_lowrank_encode_is_best_rank_k():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((9, 2)) @ rng.standard_normal((2, 13))
    f = LowRankFactors.encode(a.astype(np.float32), 2)
    assert np.allclose(f.decode(), a, atol=1e-4)
    assert f.rank == 2
    conv = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    f4 = LowRankFactors.encode(conv, 6)  # full rank of [6, 36]
    assert np.allclose(f4.decode(), conv, atol=1e-4)
    with pytest.raises(FormatError, match=r"rank must be an integer in 1\.\.6"):
        LowRankFactors.encode(conv, 7)


def test_prune_map_apply_and_decode():
    w = np.arange(20, dtype=np.float32).reshape(5, 4)
    pm = PruneMap.from_mask(np.array([1, 0, 1, 1, 0]), dim=0, shape=w.shape)
    small = pm.apply(w)
    assert small.shape == (3, 4)
    pm.weight = small
    back = pm.decode()
    assert np.array_equal(back[[0, 2, 3]], w[[0, 2, 3]]) and not back[[1, 4]].any()
    rebuilt = PruneMap.from_arrays(pm.arrays(), pm.attrs())
    assert np.array_equal(rebuilt.keep, pm.keep)
    with pytest.raises(FormatError, match="sorted unique indices"):
        PruneMap(np.array([2, 1]), 5)


def test_registry():
    assert set(registered_formats()) >= {"shift", "bitstack", "lowrank", "pruning"}
    assert get_format("shift") is ShiftCodes
    with pytest.raises(FormatError, match="registered formats are bitstack, lowrank"):
        get_format("nope")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 17), st.integers(2, 5), st.booleans())
def test_shift_property_any_shape(out, inp, bits, zero):
    w = np.random.default_rng(out * inp).standard_normal((out, inp)).astype(np.float32)
    c = ShiftCodes.encode(w, bits, zero)
    d = c.decode()
    assert d.shape == w.shape and np.isfinite(d).all()
    assert np.all(np.abs(d) <= c.scale[:, None] + 1e-7)
