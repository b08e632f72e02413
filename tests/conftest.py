"""Shared test helpers (keep this file small)."""

from __future__ import annotations

from typing import Any

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding a ``slow`` test run first (a stable sort: the order within a file and
    among the other files is kept), so that `make test`'s workers (pytest-xdist,
    ``--dist loadfile``) start on the long files and the short ones even out the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


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


# ---- all-MiniLM-L6-v2, shared by the test modules that compress or export it ----------------
def _fingerprint(model: Any, inputs: dict[str, Any]) -> list[float]:
    """A cheap checksum of every tensor of ``model`` (state dict) and of ``inputs``."""
    import torch

    with torch.no_grad():
        tensors = [*model.state_dict().values(), *inputs.values()]
        return [float(t.double().sum()) for t in tensors]


@pytest.fixture(scope="session")
def minilm_s16():
    """``(model, inputs)``: all-MiniLM-L6-v2 (real weights) at batch 1, seq 16, loaded once
    per test session. Shared and read-only: compress a ``copy.deepcopy`` of it (or ask
    :func:`minilm_compressed`); the session's end checks that nothing changed it."""
    from edgestack import zoo

    model, inputs = zoo.minilm(seq=16)
    before = _fingerprint(model, inputs)
    yield model, inputs
    assert _fingerprint(model, inputs) == before, "a test modified the shared MiniLM"


@pytest.fixture(scope="session")
def minilm_compressed(minilm_s16):
    """``minilm_compressed(method, calib=True, **options) -> (model, inputs, report)``: a copy
    of :func:`minilm_s16` compressed with ``method`` and ``options`` (``calib=[inputs]`` when
    ``calib``), once per configuration and test session. Read-only like ``minilm_s16`` (export
    leaves a model as it found it); the session's end checks that nothing changed one."""
    import copy
    import warnings

    from edgestack.compress import compress

    original, inputs = minilm_s16
    made: dict[tuple, tuple[Any, dict[str, Any], Any]] = {}
    prints: dict[tuple, list[float]] = {}

    def get(method: str, calib: bool = True, **options: Any) -> tuple[Any, dict[str, Any], Any]:
        key = (method, calib, tuple(sorted(options.items())))
        if key not in made:
            model = copy.deepcopy(original)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = compress(model, method, calib=[inputs] if calib else None, **options)
            made[key] = (model, inputs, report)
            prints[key] = _fingerprint(model, inputs)
        return made[key]

    yield get
    changed = [key for key, (model, inputs, _) in made.items()
               if _fingerprint(model, inputs) != prints[key]]
    assert not changed, f"tests modified the shared compressed MiniLM {changed}"
