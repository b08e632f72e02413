"""End to end with torch: compress (bitstack) -> export -> pack -> Runtime, per tier vs torch."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def test_exported_bitstack_mlp_tiers_match_torch(tmp_path):
    from edgestack.compress import compress
    from edgestack.compress.bitstack import set_tier
    from edgestack.exporter import export
    from edgestack.packer.pack import pack
    from edgestack.runtime import Runtime

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.ReLU(),
                                torch.nn.Linear(80, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 16))
    x = torch.randn(3, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress(model, "bitstack", calib=[{"input": x}], n_blocks=3, k=2)
    export(model, {"input": x}, tmp_path / "m.onnx", parity=False)
    result = pack(tmp_path / "m.onnx", tmp_path / "m.pkg")
    assert result.order_source == "model"
    with Runtime(tmp_path / "m.pkg", form="fp32") as rt:
        assert [(r.layer, r.block) for r in rt.package.block_index] == [
            (n, b) for n, b in report.importance_order]
        assert rt.self_test()["passed"]
        for levels in (1, 2, 3):
            tier = next(t.index for t in rt.package.tiers
                        if set(t.blocks.values()) == {levels})
            rt.retier(tier=tier)
            set_tier(model, levels=levels)
            with torch.no_grad():
                ref = model(x).numpy()
            got = rt.infer({"input": x.numpy()})
            out = next(iter(got.values()))
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_pack_from_model_source_exports_first(tmp_path):
    import pytest

    from edgestack.errors import PackageError
    from edgestack.package import Package
    from edgestack.packer.pack import pack

    factory = tmp_path / "fac.py"
    factory.write_text(
        "import torch\n"
        "def make(batch=None, seq=None):\n"
        "    torch.manual_seed(0)\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(),\n"
        "                            torch.nn.Linear(48, 8))\n"
        "    return m, {'input': torch.randn(2, 32)}\n")
    from edgestack.pipeline import pack_model

    with pytest.raises(PackageError, match="pipeline.pack_model"):   # the package layer: ONNX
        pack(f"{factory}:make", tmp_path / "q.pkg")
    result = pack_model(f"{factory}:make", tmp_path / "p.pkg", options={"n_blocks": 2, "k": 2})
    assert result.n_layers == 2 and result.n_blocks == 4 and result.order_source == "model"
    with Package.open(tmp_path / "p.pkg") as pkg:
        pkg.verify()
        assert pkg.golden()[0]["input"].shape == (2, 32)  # the source's example inputs
        assert pkg.manifest.model.method == "bitstack"
