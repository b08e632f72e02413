"""Graph passes that lower an exported model for a target (one pass per module).

Every pass is an onnx-ir :class:`~onnx_ir.passes.InPlacePass`; its docstring lists the
rewrites it makes and it records what it did in :attr:`report` (a dict that ends up in the
artifact's ``report``). :func:`run_passes` runs a list and, when one fails, names the passes
that ran before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from edgestack.errors import TargetError
from edgestack.targets.passes.inline import InlineFunctionsPass
from edgestack.targets.passes.int8_dynamic import DynamicInt8MatMulPass
from edgestack.targets.passes.materialize import MaterializePass
from edgestack.targets.passes.shift_int8 import ShiftToInt8Pass
from edgestack.targets.passes.transformer import TransformerFusionPass


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> dict[str, Any]:
    """Run ``passes`` in order on ``model`` (in place); returns ``{pass name: report}``.

    Raises:
        TargetError: a pass failed; the message names it and the passes before it.
    """
    reports: dict[str, Any] = {}
    done: list[str] = []
    for p in passes:
        name = type(p).__name__
        try:
            result = p(model)
        except Exception as exc:  # re-raised with the pass history
            raise TargetError(f"lowering pass {name} failed after "
                              f"[{', '.join(done) or 'none'}]: {type(exc).__name__}: {exc}"
                              ) from exc
        model = result.model
        reports[name] = dict(getattr(p, "report", {}) or {}, modified=bool(result.modified))
        done.append(name)
    return reports


__all__ = ["InlineFunctionsPass", "DynamicInt8MatMulPass", "MaterializePass", "ShiftToInt8Pass",
           "TransformerFusionPass", "run_passes"]
