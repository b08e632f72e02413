"""Dynamic int8 lowering quantizes each activation once, however many matmuls read it."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import torch

from edgestack.compress import compress
from edgestack.exporter import export
from edgestack.targets import get_target, load_runner


class ThreeHeads(torch.nn.Module):
    """q/k/v-style: three linear layers reading the same activation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(37, 29) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) + self.k(x) * self.v(x)


def test_matmuls_on_one_activation_share_its_quantizer(tmp_path):
    model = ThreeHeads().eval()
    x = torch.randn(2, 5, 37)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress(model, "shift", bits=4, zero=True)  # 7 levels: exact int8
    export(model, {"x": x}, tmp_path / "m.onnx")
    art = get_target("ort-cpu").lower(tmp_path / "m.onnx", tmp_path / "art", int8="dynamic")
    graph = onnx.load(str(art.path())).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 3
    assert ops.count("DynamicQuantizeLinear") == 1
    with torch.no_grad():
        ref = model(x).numpy()
    with load_runner(tmp_path / "art") as runner:
        out = next(iter(runner.infer({"x": x.numpy()}).values()))
    # int8 activations: close, not exact
    cos = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    assert cos > 0.99
