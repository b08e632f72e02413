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


def _check_folder(folder: Path, task: str | None) -> None:
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


def _folder_config(folder: Path, task: str | None) -> Any:
    """The transformers config of a model folder (checked), for ``task``."""
    from transformers import AutoConfig

    _check_folder(folder, task)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError, ...
        why = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read {str(folder / 'config.json')!r} as a transformers config "
            f"({type(exc).__name__}: {why}); expected a config.json written by "
            "save_pretrained of a model type this transformers knows"
        ) from None
    config._attn_implementation = "eager"
    if hasattr(config, "use_cache"):
        config.use_cache = False
    return config


def model_from_config(folder: str | Path, task: str | None = None) -> Any:
    """The architecture of a Hugging Face model folder, built from its config.json alone:
    random weights (an importer loads them from a checkpoint), fp32, eager attention, eval
    mode, offline. The folder may hold no weights (a config-only ``--base``).

    ``task`` picks the auto class as in :func:`load_hf_model` (default: from the class the
    model was saved as, ``config.architectures``), so a task head is part of the model.

    Raises:
        CheckpointError: the folder does not exist, has no readable config.json, or an
            unknown task.
    """
    import torch
    import transformers

    config = _folder_config(Path(folder), task)
    auto = getattr(transformers, TASKS[task or detect_task(config)])
    model = auto.from_config(config, dtype=torch.float32)
    return model.float().eval()


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

    folder = Path(folder)
    if config is None:
        config = _folder_config(folder, task)
    else:
        _check_folder(folder, task)
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
