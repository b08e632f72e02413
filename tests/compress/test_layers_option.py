"""compress(layers=...): a pass touches only the named layers; StatsCache shares one
calibration run between calls."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgestack.compress import compress
from edgestack.compress.api import StatsCache
from edgestack.compress.layers import CompressedLayer
from edgestack.errors import CompressError


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 8)).eval()


def calib() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input": torch.randn(64, 16, generator=g)} for _ in range(4)]


def test_only_the_named_layers_are_compressed():
    model = mlp()
    report = compress(model, "shift", layers={"2"})
    assert [r.name for r in report.layers] == ["2"]
    assert isinstance(model[2], CompressedLayer)
    assert isinstance(model[0], nn.Linear) and isinstance(model[4], nn.Linear)
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons == {"0": "not in the layers option", "4": "not in the layers option"}
    assert report.options["layers"] == ("2",)


def test_layers_and_skip_together_and_prune_needs_whole_structures():
    model = mlp()
    with pytest.raises(CompressError, match="not in layers="):
        compress(model, "shift", layers=["2"], skip=("2",))
    # a prune structure (producer 0 -> consumer 2) is pruned only when both are named
    with pytest.warns(UserWarning, match="no structure was pruned"):
        assert compress(copy.deepcopy(model), "prune", layers={"0"}).layers == []
    pruned = compress(copy.deepcopy(model), "prune", layers={"0", "2"})
    assert sorted(r.name for r in pruned.layers) == ["0", "2"]


@pytest.mark.parametrize("bad, match", [
    ({"3"}, r"'3' is not a supported layer of the model \(Sequential, 3 supported layers"),
    ({"2x"}, "did you mean '2'"),
    (set(), "empty"),
    ([2], "expected None or a collection of module names"),
])
def test_bad_layers_are_refused_before_any_change(bad, match):
    model = mlp()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(CompressError, match=match):
        compress(model, "shift", layers=bad)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("method, opts", [("shift", {"rounding": "gptq"}),
                                          ("lowrank", {"ratio": 0.5}),
                                          ("bitstack", {"n_blocks": 2})])
def test_stats_cache_runs_calibration_once_and_changes_nothing(method, opts):
    names = ["0", "2", "4"]
    data = calib()
    cache = StatsCache(watch=names)
    for name in names:
        alone, shared = mlp(), mlp()
        r1 = compress(alone, method, calib=data, layers={name}, **opts)
        r2 = compress(shared, method, calib=data, layers={name}, stats_cache=cache, **opts)
        assert [r.to_dict() for r in r1.layers] == [r.to_dict() for r in r2.layers]
        x = data[0]["input"]
        with torch.no_grad():
            assert torch.equal(alone(x), shared(x))
    assert cache.runs == 1 and set(cache.stats) == set(names)
