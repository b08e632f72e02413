"""Loading Hugging Face model folders offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgestack.errors import CheckpointError

TASKS = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "fill-mask": "AutoModelForMaskedLM",
    "text-generation": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
}
"""Tasks as Optimum names them -> the transformers auto class that loads the model with its
head (``feature-extraction``: the bare model, no head)."""

_HEADS = (("ForSequenceClassification", "text-classification"),
          ("ForTokenClassification", "token-classification"),
          ("ForMaskedLM", "fill-mask"), ("ForCausalLM", "text-generation"),
          ("LMHeadModel", "text-generation"), ("ForImageClassification", "image-classification"))


def detect_task(config: Any) -> str:
    """The task of a model from its ``config.architectures`` (the class it was saved as):
    ``BertForSequenceClassification`` -> ``text-classification``; a bare model, or no
    architectures, -> ``feature-extraction``."""
    for arch in getattr(config, "architectures", None) or ():
        for suffix, task in _HEADS:
            if str(arch).endswith(suffix):
                return task
    return "feature-extraction"


def load_hf_model(folder: str | Path, config: Any = None, task: str | None = None) -> Any:
    """Load a Hugging Face model folder (config.json + weights) as an fp32 eval-mode model.

    ``task`` (see :data:`TASKS`; default: :func:`detect_task`, from the class the model was
    saved as) picks the auto class, so a task head is loaded with the body, never dropped
    (``feature-extraction``: ``AutoModel``, the bare encoder/decoder). Eager attention, so
    that the graph exports to plain ONNX ops; never touches the network.

    Raises:
        CheckpointError: the folder does not exist or has no config.json, or an unknown task.
    """
    import torch
    import transformers
    from transformers import AutoConfig

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
    if task is not None and task not in TASKS:
        raise CheckpointError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if config is None:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    auto = getattr(transformers, TASKS[task or detect_task(config)])
    config._attn_implementation = "eager"
    if hasattr(config, "use_cache"):
        config.use_cache = False
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load is noise here
    try:
        model = auto.from_pretrained(
            folder, config=config, local_files_only=True, dtype=torch.float32
        )
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model.eval()
