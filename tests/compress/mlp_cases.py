"""Small calibrated models shared by the compression tests."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Two-layer MLP over ``x [batch, tokens, 32]`` with correlated, uneven inputs."""

    def __init__(self, d: int = 32, h: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d, h)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp_calib(n: int = 8, seed: int = 1, d: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    gain = torch.linspace(0.2, 3.0, d)
    return [{"x": (torch.randn(4, 16, d, generator=g) @ mix) * gain} for _ in range(n)]


def out_err(model, ref_model, data) -> float:
    with torch.no_grad():
        return sum(float((model(**x) - ref_model(**x)).pow(2).sum()) for x in data)
