"""Importers for the checkpoints that upstream compression code produces.

``load_checkpoint(kind, checkpoint, base=None)`` reads a checkpoint written by DeepShift,
WeLore, FLAP or BitStack and returns the compressed torch model built from edgestack's own
layers (so :func:`edgestack.exporter.export` keeps it compressed) and an
:class:`ImportReport`. Each importer's module docstring is the spec of the upstream layout
it reads (with the upstream files it follows):

    deepshift  ``<layer>.shift``/``.sign`` (PS) or power-of-two ``<layer>.weight`` (Q)
               -> ``CompressedLayer(ShiftWeight)``, exact, zero-capable shift codes.
    welore     ``<layer>.U.weight`` [out, k], ``<layer>.V.weight`` [k, in] -> ``LowRankLinear``.
    flap       HF folder with an unpruned config.json and smaller tensors -> smaller dense
               layers, added o_proj/down_proj biases, updated head counts.
    bitstack   ``<layer>.qweight_{i}``, ``u_{i}``, ``vt_{i}``
               -> ``CompressedLayer(BitStackWeight)``; the block order from BitStack's
               ``compression_config.json`` / ``reduced_ppl_average.json`` beside them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from torch import nn

from edgestack.compress.importers import bitstack, deepshift, flap, welore
from edgestack.compress.importers.common import (
    ImportReport,
    align_keys,
    build_model,
    load_dense,
    read_checkpoint,
)
from edgestack.errors import CheckpointError

IMPORTERS = ("deepshift", "welore", "flap", "bitstack")
_MODULES: dict[str, ModuleType] = {
    "deepshift": deepshift, "welore": welore, "flap": flap, "bitstack": bitstack,
}


def load_checkpoint(kind: str, checkpoint: Any, base: Any = None,
                    **options: Any) -> tuple[nn.Module, ImportReport]:
    """Import an upstream checkpoint as an edgestack-compressed torch model.

    Args:
        kind: one of :data:`IMPORTERS`.
        checkpoint: a folder (config.json + ``*.safetensors`` or ``pytorch_model*.bin``, or
            ``*.pt``/``*.pth`` files), a single weights file (``.safetensors``; ``.pt``,
            ``.pth``, ``.bin``, ``.tar``, ``.ckpt`` holding a state dict or
            ``{"state_dict": ...}``/``{"model": ...}``), or an in-memory state dict.
        base: the architecture, an ``nn.Module`` (or a zoo factory's ``(model, inputs)``);
            it is modified in place and returned. None: build the model from the folder's
            config.json (the class it was saved as, its head included; ``AutoModel`` when
            config.json names none; fp32, eager attention, offline).
        **options: ``strict`` (default True: every model tensor must be in the checkpoint),
            and the importer's own options (deepshift: ``weight_bits``, ``clamp``;
            bitstack: ``importance``, BitStack's ``compression_config.json`` or
            ``reduced_ppl_average.json`` or their folder, default: beside the checkpoint).

    Returns:
        ``(model, report)`` with the model in eval mode.

    Raises:
        CheckpointError: unknown kind or option, unreadable or missing checkpoint, no
            architecture, keys or shapes that do not fit the model, missing companion
            tensors, or values the edgestack formats cannot hold exactly.
    """
    if kind not in _MODULES:
        raise CheckpointError(
            f"unknown checkpoint kind {kind!r}; expected one of {', '.join(IMPORTERS)}"
        )
    module = _MODULES[kind]
    strict = options.pop("strict", True)
    unknown = sorted(set(options) - set(module.OPTIONS))
    if unknown:
        known = ", ".join(["strict", *module.OPTIONS]) or "strict"
        raise CheckpointError(
            f"{kind}: unknown option(s) {', '.join(unknown)}; this importer takes {known}"
        )
    ckpt = read_checkpoint(checkpoint)
    report = ImportReport(kind=kind, source=ckpt.source)
    report.skipped = dict(ckpt.skipped)
    report.warnings += ckpt.notes
    model, notes = build_model(base, ckpt)
    report.warnings += notes
    state = align_keys(ckpt.state, model, report)
    replaced, consumed = module.convert(model, state, report, **options)
    load_dense(model, state, consumed, replaced, report, strict=bool(strict))
    finish = getattr(module, "finish", None)
    if finish is not None:  # e.g. BitStack's importance files beside the weights
        finish(model, ckpt, report, **options)
    return model.eval(), report


__all__ = ["IMPORTERS", "ImportReport", "load_checkpoint"]
