"""Small models for the sensitivity tests (``path/to/this.py:factory`` model sources)."""

from __future__ import annotations

import torch
from torch import nn

OUTLIER_LAYER = "body.2"


def outlier_mlp(batch: int = 64):
    """A 3-layer MLP whose middle layer has one huge weight per output row: its per-row
    scale is set by the outlier, so shift codes (powers of two below the scale) crush every
    other weight of the row, while the other layers quantize well."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                          nn.Linear(48, 8))
    with torch.no_grad():
        w = model[2].weight
        w[:, 0] = 1e4 * w[:, 0].sign()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    g = torch.Generator().manual_seed(1)
    return Net().eval(), {"x": torch.randn(batch, 16, generator=g)}
