"""The one comparison rule (edgestack.core.compare) that export parity, target parity and the
runtime's self-test share."""

from __future__ import annotations

import math

import numpy as np

from edgestack.core.compare import agree


def test_absolute_or_relative_to_the_reference_peak():
    ref = np.array([1000.0, 0.001], np.float32)
    got = ref + np.array([0.05, 0.0], np.float32)        # 0.05 abs, 5e-5 of the peak
    assert not agree(got, ref, atol=1e-2, rtol=1e-5).passed
    assert agree(got, ref, atol=1e-2, rtol=1e-4).passed    # relative to max|ref|
    assert agree(got, ref, atol=0.1, rtol=0.0).passed      # absolute alone
    r = agree(got, ref, 0, 0)
    assert math.isclose(r.max_abs, 0.05, rel_tol=1e-3)
    assert math.isclose(r.max_rel, 5e-5, rel_tol=1e-3)


def test_shape_mismatch_nan_and_empty():
    a = np.zeros((2, 3), np.float32)
    r = agree(a, np.zeros((3, 2), np.float32), 1.0, 1.0)
    assert not r.passed and r.shape == (2, 3) and r.ref_shape == (3, 2) and r.max_abs == math.inf
    nan = a.copy()
    nan[0, 0] = np.nan
    assert not agree(nan, a, 1e9, 1e9).passed
    e = agree(np.zeros((0, 4)), np.zeros((0, 4)), 0, 0)
    assert e.passed and e.cosine == 1.0


def test_zero_reference():
    z = np.zeros(4)
    assert agree(z, z, 0, 0).passed
    r = agree(z + 1e-3, z, 0, 1e9)                        # max_rel is inf on a zero reference
    assert r.max_rel == math.inf and not r.passed
    assert agree(z + 1e-3, z, 1e-2, 0).passed
