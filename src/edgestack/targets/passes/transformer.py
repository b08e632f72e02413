"""Transformer fusions for ONNX Runtime's CPU kernels (``com.microsoft`` contrib ops), done by
onnxscript's stock ORT fusion rules.

ONNX Runtime's own attention fusion (C++ and ``onnxruntime.transformers.optimizer``) does not
recognize the self-attention that ``torch.onnx.export(dynamo=True)`` writes (keys transposed with
``perm=[0, 2, 3, 1]``, the scale after ``Q @ K^T``, a ``Where`` mask; ``optimize_model(
model_type="bert")`` reports 0 ``Attention`` on MiniLM). onnxscript's ``ort_fusions`` rules do,
so this pass runs a chosen subset of them (``onnxscript.rewriter.ort_fusions.optimize_for_ort``
runs all of them plus a global optimizer; see "Not used" below). Rewrites (``q``, ``k``, ``v``:
``[B, S, D]`` tensors, whatever computes them: fp32 MatMul + Add, integer matmuls, ...):

- ``sdpa``: ``Softmax(Add(Mul|Div(MatMul(Q, K^T), c), mask), axis=-1) @ V`` with ``Q``/``K``
  optionally pre-scaled and an optional ``Where(IsNaN(P), 0, P)`` guard (both as in gpt2's
  ``attn_implementation="sdpa"`` export) -> a temporary ``ai.onnxruntime._fusion.SDPA`` node;
- ``mha``: SDPA with its ``Reshape``/``Transpose`` head split and merge ->
  ``com.microsoft.MultiHeadAttention(q, k, v, attention_bias=mask, num_heads, scale)`` (head
  count and head size from the inferred shapes; ``scale`` omitted when it is the default
  ``1/sqrt(d)``); ``mha_bias``: the q/k/v bias additions move into MHA's ``bias`` input;
  ``sdpa_via_mha``: an SDPA whose heads are not merged back to ``[B, S, D]`` (e.g. GPT-2's
  ``Gemm`` reads ``[B*S, D]``) -> ``MultiHeadAttention`` between 4-D/3-D ``Reshape``s;
- ``gelu``: the erf/tanh GELU formulas -> ``com.microsoft.Gelu``/``FastGelu``;
  ``bias_gelu``: ``Gelu(Add(x, b))`` with a 1-D ``b`` -> ``BiasGelu(x, b)``, and (a rule of
  this module: onnxscript skips the tanh form) ``Gelu(Add(x, b), approximate="tanh")`` ->
  ``FastGelu(x, b)``.

Two guards are added to onnxscript's rules (subclasses below): an SDPA is only formed when the
head count is a static integer (otherwise no later rule can lower it and an
``ai.onnxruntime._fusion.SDPA`` node, which no runtime runs, would stay), and the MHA rule only
replaces a head merge whose output is 3-D (onnxscript 0.7.2 does not check it and wrote a 3-D
MHA output where gpt2_tiny's pruned export reads a 2-D ``[32, 96]``: ORT refused the model).

Around the rules: onnx-ir's ``ShapeInferencePass`` (the rules read shapes; it only annotates
values), then onnx-ir's ``RemoveUnusedNodesPass`` (the replaced nodes and the initializers only
they read). **Not used**, with the evidence: onnxscript's ``_pre_optimize``/``optimize``
(it inlines every model-local function, so ``weights=keep``'s ``ShiftWeight`` calls became
inlined decodes with partly folded uint8 constants: 8x the uint8 bytes on the test BERT; it
left the int8 ``DequantizeLinear``/``MatMulInteger`` weights alone);
``fuse_skip_layer_normalization`` (ORT's ``SkipLayerNormalization`` CPU kernel measured ~3.5x
slower than ``Add + LayerNormalization`` here; the ort-cpu target disables ORT's own
``SkipLayerNormFusion`` for that reason); ``fuse_attention`` (packs Q/K/V weights into one
fp32 ``Attention`` op: it would undo the int8 matmuls). Weights are never touched: the int8
lowering's exact shift weights stay as they are.

Pinned: the ``ort_fusions`` modules used (``sdpa``, ``mha``, ``mha_bias``, ``gelu``,
``bias_gelu``, ``sdpa_via_mha``) and ``rewriter._basics.MatchFailureError`` are not
onnxscript's public API, so the pass runs only with the onnxscript minor version it was
checked with (:data:`ONNXSCRIPT_TESTED`). onnxscript is the ``export`` extra: without it, or
with another version, the pass changes nothing and reports why.

A graph with no attention match is left alone; every ``Softmax`` left unfused is reported with a
reason (``attention_skipped``) and logged, so non-transformer models compile unchanged.
Measured against the hand-written matcher this replaced (docs/targets.md): same fused op counts
and initializer bytes on MiniLM (dense and shift x int8 off/weights/dynamic), fp32 outputs
within 1e-6 relative, same latency; gpt2_tiny's SDPA-form attention now fuses too.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from edgestack.errors import InternalError

try:  # the ``export`` extra; without it the pass reports why and changes nothing
    import onnxscript
    from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet
    from onnxscript.rewriter._basics import MatchFailureError
    from onnxscript.rewriter.ort_fusions import (
        bias_gelu,
        gelu,
        mha,
        mha_bias,
        sdpa,
        sdpa_via_mha,
    )
except ImportError as exc:  # tests: monkeypatched (onnxscript is installed there)
    onnxscript = None
    _IMPORT_ERROR = f"onnxscript's ORT fusions cannot be imported ({exc})"

log = logging.getLogger(__name__)
MS_DOMAIN = "com.microsoft"
FUSION_DOMAIN = "ai.onnxruntime._fusion"
#: the onnxscript minor version whose (non-public) ort_fusions modules this pass was checked with
ONNXSCRIPT_TESTED = "0.7"
NO_MATCH = "onnxscript's SDPA/MHA patterns did not match this Softmax"


def _unavailable() -> str | None:
    """Why onnxscript's fusions cannot run here, with the fix; ``None`` when they can."""
    if onnxscript is None:
        return (f"{_IMPORT_ERROR}. To fix: pip install 'onnxscript=={ONNXSCRIPT_TESTED}.*' "
                "(the export extra)")
    version = onnxscript.__version__
    if version.split(".")[:2] != ONNXSCRIPT_TESTED.split("."):
        return (f"onnxscript {version} is not the {ONNXSCRIPT_TESTED}.x this pass was checked "
                "with (it uses onnxscript.rewriter.ort_fusions modules that are not public API). "
                f"To fix: pip install 'onnxscript=={ONNXSCRIPT_TESTED}.*', or check the fusions "
                "on the new version (tests/targets/test_transformer_fusion.py) and update "
                "ONNXSCRIPT_TESTED")
    return None


if onnxscript is not None:
    class _StaticHeadsSDPA(sdpa.SDPA):
        """onnxscript's SDPA rule, forming an SDPA only when its head count is static, and
        recording why it rejected a matched Softmax (``why``: Softmax node -> reason)."""

        def __init__(self, why: dict[ir.Node, str]) -> None:
            super().__init__()
            self.why = why

        def check(self, context, query, key, value, mask, key_format, **bindings):
            softmax = next((n for n in context.nodes if n.op_type == "Softmax"), None)
            try:
                result = super().check(context, query, key, value, mask, key_format,
                                       **bindings)
            except MatchFailureError as err:
                result = MatchResult().fail(err.reason)
            if result and not isinstance(query.shape[1], int):
                result = MatchResult().fail(
                    f"the head count {query.shape[1]} of the attention's query is not static "
                    "(export with static shapes)")
            if not result and softmax is not None:
                self.why[softmax] = f"{NO_MATCH}: {result.reason}"
            return result

    class _MergedHeadsMHA(mha.MultiHeadAttention):
        """onnxscript's MHA rule, only where the heads are merged back to 3-D ``[B, S, D]``
        (else ``sdpa_via_mha`` lowers the SDPA and keeps the graph's own reshapes)."""

        def check(self, op, attention_reshaped=None, **bindings):
            result = super().check(op, **bindings)
            shape = attention_reshaped.shape if attention_reshaped is not None else None
            if result and (shape is None or shape.rank() != 3):
                return result.fail(f"heads merged to {shape}, not [B, S, D]")
            return result

    class _BiasFastGelu(RewriteRuleClassBase):
        """``Gelu(Add(x, b), approximate="tanh")`` with a 1-D ``b`` -> ``FastGelu(x, b)``."""

        def pattern(self, op, x, b):
            return op.Gelu(op.Add(x, b), approximate="tanh")

        def check(self, context, x, b, **_):
            if b.shape is None or b.shape.rank() != 1:
                return MatchResult().fail("bias is not 1-D", b)
            return MatchResult()

        def rewrite(self, op, x, b, **_):
            return op.FastGelu(x, b, _domain=MS_DOMAIN)


def _mha_rules() -> RewriteRuleSet:
    # onnxscript's fuse_mha1 (past key/value) then fuse_mha2 variants, with the 3-D guard
    combos = [(rotary, past, cross) for past in (True, False) for rotary in (False, True)
              for cross in ((False,) if past else (False, True))]
    return RewriteRuleSet([
        _MergedHeadsMHA.rule(f"MHA{'_Rotary' * r}{'_Past' * p}{'_CrossAttention' * c}",
                             is_rotary=r, has_past_present=p, is_cross_attention=c)
        for r, p, c in combos])


def _mha_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.domain == MS_DOMAIN
            and n.op_type == "MultiHeadAttention"]


def _hint(softmax: ir.Node) -> str:
    if not any(u.node.op_type == "MatMul" for u in softmax.outputs[0].uses()):
        return f"{NO_MATCH} (its output is not read by a MatMul(P, V): not an attention)"
    return NO_MATCH


class TransformerFusionPass(ir.passes.InPlacePass):
    """Fuse self-attention into ``MultiHeadAttention`` and ``Add + Gelu`` into ``BiasGelu``
    with onnxscript's ORT fusion rules (module docstring).

    ``report``: ``attention_fused``, ``num_heads`` (sorted, read from the fused nodes),
    ``attention_skipped`` (Softmax node -> reason), ``bias_gelu_fused``, ``rules`` (rewrites
    per rule) and ``onnxscript`` (its version); instead ``unavailable`` (why, and the fix)
    when onnxscript's fusions cannot run here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        softmaxes = [n for n in model.graph if n.op_type == "Softmax"
                     and n.domain in ("", "ai.onnx")]
        why_not = _unavailable()
        if why_not is not None:
            log.log(logging.WARNING if softmaxes else logging.INFO,
                    "attention fusion skipped: %s", why_not)
            self.report = {"attention_fused": 0, "num_heads": [], "bias_gelu_fused": 0,
                           "attention_skipped": {n.name: why_not for n in softmaxes},
                           "unavailable": why_not}
            return ir.passes.PassResult(model, False)
        mha_before = set(_mha_nodes(model))
        why: dict[ir.Node, str] = {}
        rules = dict.fromkeys(("sdpa", "mha", "mha_bias", "sdpa_via_mha"), 0)
        if softmaxes:
            ShapeInferencePass()(model)     # the attention rules read shapes
            rules["sdpa"] = RewriteRuleSet([_StaticHeadsSDPA.rule(why=why)]).apply_to_model(
                model)
            ShapeInferencePass()(model)     # as onnxscript does after its SDPA fusion
            rules["mha"] = _mha_rules().apply_to_model(model)
            rules["mha_bias"] = mha_bias.fuse_mha_bias(model)
        rules["gelu"] = gelu.fuse_gelu(model)
        rules["bias_gelu"] = (bias_gelu.fuse_bias_gelu(model) + RewriteRuleSet(
            _BiasFastGelu.rule().commute()).apply_to_model(model))
        if softmaxes:
            rules["sdpa_via_mha"] = sdpa_via_mha.replace_sdpa_by_mha(model)
        left = [n.name for n in model.graph if n.domain == FUSION_DOMAIN]
        if left:
            raise InternalError(f"onnxscript's SDPA nodes {left} were not lowered to "
                                "MultiHeadAttention: the static-heads guard should prevent it")
        model.opset_imports.pop(FUSION_DOMAIN, None)
        modified = any(rules.values())
        if modified:
            RemoveUnusedNodesPass()(model)
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        fused = [n for n in _mha_nodes(model) if n not in mha_before]
        alive = set(model.graph)
        skipped = {n.name: why.get(n) or _hint(n) for n in softmaxes if n in alive}
        if not fused:
            log.info("attention fusion skipped: %s", "; ".join(sorted(set(skipped.values())))
                     if skipped else "no Softmax in the graph (not a transformer)")
        self.report = {"attention_fused": len(fused), "attention_skipped": skipped,
                       "num_heads": sorted({n.attributes["num_heads"].as_int() for n in fused}),
                       "bias_gelu_fused": rules["bias_gelu"], "rules": rules,
                       "onnxscript": onnxscript.__version__}
        return ir.passes.PassResult(model, modified)
