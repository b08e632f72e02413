"""Tied weights in an export: which torch parameters are one tensor, and storing it once.

A causal LM whose head reads the word embedding (GPT-2, Qwen2) has one parameter under two
names (:func:`edgestack.compress.walk.tied_parameters`). The compression passes leave such a
layer dense; :func:`retie` runs :class:`~edgestack.exporter.passes.RetiePass` so that the
exported graph stores the tensor once, and :func:`tied_weights` reports how the graph holds
each group (model metadata :data:`META_TIED`, ``ExportResult.tied_weights``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgestack.exporter.passes import RetiePass, tensor_relation

META_TIED = "edgestack.tied_weights"
"""Model metadata key: JSON list of :func:`tied_weights` entries."""


def retie(model: Any, model_ir: Any, say: Callable[[str], None]) -> None:
    """Store each tied tensor of ``model`` once in ``model_ir`` (in place; one ``say`` line
    per copy dropped), :class:`~edgestack.exporter.passes.RetiePass`."""
    from edgestack.compress.walk import tied_parameters  # lazy: torch at import

    groups = tied_parameters(model)
    if not groups:
        return
    rewrite = RetiePass(groups)
    rewrite(model_ir)
    for entry in rewrite.report["groups"]:
        for removed in entry["removed"]:
            what = ("a MatMul reads it through Gemm(transB=1) instead of the Transpose node "
                    if removed["as"] == "transpose node"
                    else f"dropped the {removed['as']} copy ")
            say(f"export: tied weight {' = '.join(entry['parameters'])}: {what}"
                f"{removed['name']}, reading {entry['kept']}")


def tied_weights(model: Any, model_ir: Any) -> list[dict[str, Any]]:
    """How the exported graph stores each group of tied torch parameters.

    Returns one entry per group (:func:`edgestack.compress.walk.tied_parameters`):
    ``parameters`` (the qualified names), ``initializers`` (the graph initializers holding
    the tensor or its transpose, under any name), ``copies`` (how many; 1 when the file
    keeps the tie) and ``bytes`` (of one copy).
    """
    from edgestack.compress.walk import tied_parameters  # lazy: torch at import

    groups = tied_parameters(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for group in groups:
        ref = params[group[0]].detach().cpu().numpy()
        held = [name for name, value in model_ir.graph.initializers.items()
                if value.const_value is not None
                and tensor_relation(value.const_value, ref) is not None]
        out.append({"parameters": list(group), "initializers": held, "copies": len(held),
                    "bytes": int(ref.nbytes)})
    return out


__all__ = ["META_TIED", "retie", "tied_weights"]
