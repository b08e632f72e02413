"""Loading Hugging Face model folders offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgestack.errors import CheckpointError


def load_hf_model(folder: str | Path, config: Any = None) -> Any:
    """Load a Hugging Face model folder (config.json + weights) as an fp32 eval-mode model.

    Uses ``AutoModel`` (the bare encoder/decoder without a task head), eager attention so that
    the graph exports to plain ONNX ops, and never touches the network.

    Raises:
        CheckpointError: the folder does not exist or has no config.json.
    """
    import torch
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"model folder {str(folder)!r} does not exist; pass a Hugging Face model folder "
            "(with config.json), an upstream checkpoint with --from, or module:factory"
        )
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"model folder {str(folder)!r} has no config.json; expected a Hugging Face model "
            "folder, found files: " + ", ".join(sorted(p.name for p in folder.iterdir())[:10])
        )
    if config is None:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    config._attn_implementation = "eager"
    if hasattr(config, "use_cache"):
        config.use_cache = False
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load is noise here
    try:
        model = AutoModel.from_pretrained(
            folder, config=config, local_files_only=True, dtype=torch.float32
        )
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model.eval()
