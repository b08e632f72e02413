"""Fixtures: synthetic BitStack ONNX models packed once per session (no torch)."""

from __future__ import annotations

import pytest

from runtime_helpers import small_model, small_pkg, synthetic_onnx  # noqa: F401 - fixtures


@pytest.fixture(scope="session")
def big_model(tmp_path_factory):
    """A 4-layer 1024-wide MLP, 4 blocks of rank 16 (MiB-sized layers for memory tests)."""
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    return path, synthetic_onnx(path, dims=(1024,) * 5, n_blocks=4, k=16, batch=1)


@pytest.fixture(scope="session")
def big_pkg(tmp_path_factory, big_model):
    from edgestack.packer.pack import pack

    out = tmp_path_factory.mktemp("big_pkg") / "big.pkg"
    pack(big_model[0], out)
    return out


@pytest.fixture(scope="session")
def calib_cache():
    """The calibration cache of this test session (tests/conftest.py points
    ``EDGESTACK_CACHE_DIR`` at a fresh folder, shared with subprocesses)."""
    import os
    from pathlib import Path

    return Path(os.environ["EDGESTACK_CACHE_DIR"])
