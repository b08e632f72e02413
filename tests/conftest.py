"""Shared test helpers (keep this file small)."""

from __future__ import annotations

from typing import Any

import pytest


def _main_output(out: Any) -> Any:
    """The main tensor of a model output (HF outputs: ``last_hidden_state``)."""
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


@pytest.fixture
def run_model():
    """``run_model(model, inputs) -> Tensor``: no-grad forward, main output tensor."""
    import torch

    def run(model: Any, inputs: dict[str, Any]) -> Any:
        with torch.no_grad():
            return _main_output(model(**inputs))

    return run


@pytest.fixture
def cosine():
    """``cosine(a, b) -> float``: cosine similarity of two tensors, flattened, in float64."""

    def cos(a: Any, b: Any) -> float:
        a, b = a.flatten().double(), b.flatten().double()
        return float(a @ b / (a.norm() * b.norm()))

    return cos


@pytest.fixture(scope="session", autouse=True)
def _calibration_cache(tmp_path_factory):
    """Memory calibrations (edgestack.runtime.calibrate) go to a fresh folder of this test
    session, not the user's cache: each test session measures this machine anew, and the
    subprocesses the tests start see the same folder through the environment."""
    folder = tmp_path_factory.mktemp("calibration")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGESTACK_CACHE_DIR", str(folder))
    yield folder
    mp.undo()
