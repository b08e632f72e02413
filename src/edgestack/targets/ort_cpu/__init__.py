"""``ort-cpu``: ONNX Runtime, CPU execution provider, on x86_64.

Lowering (:func:`lower_for_ort`), passes in this order:

1. ``int8`` (``auto``: ``dynamic`` when the profile's precision is int8, or without a profile
   when the model has shift codes; else ``off``):
   ``weights`` runs :class:`~edgestack.targets.passes.ShiftToInt8Pass` (shift codes with
   <= 7 exponent levels per channel -> exact ``DequantizeLinear(int8, 2^k scale)``; 4x smaller
   than fp32, same results as fp32); ``dynamic`` adds
   :class:`~edgestack.targets.passes.DynamicInt8MatMulPass` (integer matmuls with activations
   quantized per call: the fast path, int8 tolerance); ``off`` does neither.
2. ``weights``: ``materialize`` (default) folds every remaining ``edgestack`` node to a float32
   initializer (fastest: no decode per run); ``keep`` leaves them as function calls that ORT
   inlines and decodes each run (smallest file and memory).
3. ``transformer`` (``ort-cpu`` only; ``auto`` default, ``off``, ``require``):
   :class:`~edgestack.targets.passes.TransformerFusionPass` (onnxscript's ORT fusion rules)
   fuses each self-attention block into ``com.microsoft.MultiHeadAttention`` and
   ``Add + Gelu`` into ``BiasGelu`` (ORT's own attention fusions do not match the dynamo
   exporter's graph). ``auto`` fuses what matches and records (and logs) why the rest was
   skipped, so a CNN compiles unchanged; ``require`` fails with
   :class:`~edgestack.errors.TargetError` when no attention block was fused. The head count
   comes from the graph's shapes; the former ``num_heads`` option is refused with an error
   saying so (removed after one release). Weights are untouched (the int8 weights stay the
   exact shift codes).
4. A check that every node is in a domain ORT's CPU EP runs.

Session options come from the profile: ``threads`` (intra-op), ``graph_optimization``; and
``disabled_optimizers`` (``ort-cpu`` only): ORT graph optimizers turned off in the session,
default :data:`DEFAULT_DISABLED_OPTIMIZERS` (``SkipLayerNormFusion``: in ORT 1.32 on x86 the
fused ``SkipLayerNormalization`` kernel took ~350 us on a ``[1, 128, 384]`` tensor where
``Add + LayerNormalization`` took ~90 us, with 1 or 2 threads; bench/targets_latency.py).
``spinning`` (``ort-cpu`` only; ``on`` default = ORT's, ``off``: idle pool threads sleep
instead of spinning; on a loaded machine (other processes on the same cores) ``off`` was
much faster, see docs/targets.md). ``ort-arm`` keeps none of these (portable graph, ORT
defaults).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgestack.core.ort import cpu_session, disabled_optimizers, session_options
from edgestack.errors import TargetError
from edgestack.targets.base import Artifact, Runner, Target, host_arch, io_spec

ORT_DOMAINS = ("", "ai.onnx", "com.microsoft", "ai.onnx.ml")
TRANSFORMER_MODES = ("auto", "off", "require")
#: ORT graph optimizers the ort-cpu runner disables by default (measured slower, see above).
DEFAULT_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def resolve_int8(option: str, profile: Any | None, shift: bool = False) -> str:
    """The ``int8`` mode: ``auto`` is ``dynamic`` for an int8 profile, ``off`` for another
    profile, and without a profile ``dynamic`` when the model has shift codes (``shift``:
    its weights are exact int8 already, and the integer kernels were 2x faster than its fp32
    graph on MiniLM for 0.006 of mean sentence cosine: docs/targets.md), else ``off``."""
    if option not in ("auto", "off", "weights", "dynamic"):
        raise TargetError(f"int8 must be one of auto, off, weights, dynamic; found {option!r}")
    if option == "auto":
        if profile is None:
            return "dynamic" if shift else "off"
        return "dynamic" if profile.precision == "int8" else "off"
    return option


def lower_for_ort(model_path: Path, options: dict[str, Any], profile: Any | None,
                  auto_shift: bool = True):
    """Load ``model_path`` and run the ORT lowering passes. Returns ``(ir model, report,
    int8 mode)``. ``auto_shift``: ``int8=auto`` without a profile lowers shift codes to the
    integer kernels (ort-cpu; ort-arm keeps float32 unless its profile says int8)."""
    import onnx_ir as ir

    from edgestack.targets import passes as P  # lazy: onnx at import

    if options["weights"] not in ("materialize", "keep"):
        raise TargetError(f"weights must be 'materialize' or 'keep', found "
                          f"{options['weights']!r}")
    transformer = options.get("transformer", "off")
    if transformer not in TRANSFORMER_MODES:
        raise TargetError(f"transformer must be one of {', '.join(TRANSFORMER_MODES)}, found "
                          f"{transformer!r}")
    if options.get("num_heads") is not None:
        raise TargetError(
            f"num_heads={options['num_heads']!r}: the option was removed; the transformer "
            "fusion (onnxscript's rules) reads the head count from the graph's shapes, and an "
            "attention whose head count is not static is skipped with that reason in "
            "report.passes.TransformerFusionPass.attention_skipped. To fix: drop num_heads "
            "(and export with static shapes if the attention is skipped).")
    model = ir.load(model_path)
    int8 = resolve_int8(options["int8"], profile, shift=auto_shift and any(
        n.domain == "edgestack" and n.op_type == "ShiftWeight" for n in model.graph))
    chain: list = []
    if int8 in ("weights", "dynamic"):
        chain.append(P.ShiftToInt8Pass())
    if int8 == "dynamic":
        chain.append(P.DynamicInt8MatMulPass())
    if options["weights"] == "materialize":
        chain.append(P.MaterializePass())
    if transformer != "off":
        chain.append(P.TransformerFusionPass())
    report = P.run_passes(model, chain)
    fusion = report.get("TransformerFusionPass")
    if transformer == "require" and not fusion["attention_fused"]:
        skipped = fusion["attention_skipped"]
        if "unavailable" in fusion:
            why = f"({fusion['unavailable']})"
        elif skipped:
            first = next(iter(skipped))
            why = f"({len(skipped)} Softmax node(s); first: {first!r}: {skipped[first]})"
        else:
            why = "(the graph has no Softmax: not a transformer)"
        raise TargetError(
            f"transformer=require: no self-attention block of {model_path} was fused {why}. "
            "To fix: compile with transformer=auto (fuse what matches) or off"
            + ("" if "unavailable" in fusion else
               ", or export the attention with static shapes (torch.onnx.export(dynamo=True) "
               "of an eager or sdpa attention)") + ".")
    check_domains(model, "ort", ORT_DOMAINS + (("edgestack",) if model.functions else ()))
    return model, report, int8


def check_domains(model: Any, target: str, domains: tuple[str, ...]) -> None:
    """Raise TargetError naming the first node whose op domain the target cannot run."""
    funcs = set(model.functions)
    for node in model.graph:
        if node.domain in domains and (node.domain != "edgestack" or
                                       (node.domain, node.op_type, node.overload) in funcs):
            continue
        raise TargetError(
            f"target {target} cannot run node {node.name!r}: op {node.domain}.{node.op_type} "
            f"is not an ONNX Runtime op (domains it runs: "
            f"{', '.join(repr(d) for d in domains)}) and the model has no function for it. "
            f"To fix: export it with edgestack ops only, or add a function body.")


def save_model(model: Any, path: Path) -> None:
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)
    if size > 1 << 30:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)


def _precision(int8: str, report: dict) -> str:
    rewritten = report.get("DynamicInt8MatMulPass", {}).get("rewritten", 0)
    return "int8" if int8 == "dynamic" and rewritten else "fp32"


def portable_options(profile: Any | None) -> dict[str, Any]:
    """The lowering options every ONNX Runtime target takes (ort-cpu and ort-arm), from the
    ``profile`` or their defaults."""
    return {"int8": "auto", "weights": "materialize",
            "threads": profile.threads if profile else 1,
            "graph_optimization": profile.graph_optimization if profile else "all"}


class OrtCpuRunner(Runner):
    """ONNX Runtime session on this machine (x86_64 for ort-cpu artifacts)."""

    def activate_impl(self) -> None:
        self._check_arch(host_arch())
        opts = self.artifact.options
        try:
            self.session = cpu_session(self.artifact.path(), opts.get("threads", 1),
                                       opts.get("graph_optimization", "all"),
                                       opts.get("spinning", "on"),
                                       opts.get("disabled_optimizers"))
        except TargetError:
            raise
        except Exception as exc:  # ORT raises its own types
            raise TargetError(f"ONNX Runtime could not load {self.artifact.path()}: {exc}"
                              ) from exc
        self.names = [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, feeds), strict=True))

    def release_impl(self) -> None:
        self.session = None


class OrtCpuTarget(Target):
    """ONNX Runtime CPU on x86_64 (options: ``int8``, ``weights``, ``threads``,
    ``graph_optimization``, ``transformer``, ``num_heads``, ``disabled_optimizers``,
    ``spinning``; see the module docstring)."""

    name = "ort-cpu"
    arch = "x86_64"
    precisions = ("fp32", "int8")

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return False, f"onnxruntime cannot be imported ({exc}); pip install onnxruntime"
        if host_arch() != "x86_64":
            return False, f"this machine is {host_arch()}, ort-cpu artifacts are x86_64"
        return True, ""

    def default_options(self, profile: Any | None) -> dict[str, Any]:
        # the portable options plus the x86 tuning (ort-arm keeps ORT's defaults)
        # num_heads: removed (refused with an error when given); drop the key next release
        return {**portable_options(profile), "transformer": "auto", "num_heads": None,
                "disabled_optimizers": list(DEFAULT_DISABLED_OPTIMIZERS), "spinning": "on"}

    def lower_impl(self, model_path: Path, out_dir: Path, profile: Any | None,
                   options: dict[str, Any]) -> Artifact:
        options["disabled_optimizers"] = disabled_optimizers(options.get("disabled_optimizers"))
        session_options(options["threads"], options["graph_optimization"],
                        options.get("spinning", "on"))       # bad values fail at compile time
        model, report, int8 = lower_for_ort(model_path, options, profile)
        save_model(model, out_dir / "model.onnx")
        inputs, outputs = io_spec(model)
        return Artifact(out_dir, self.name, self.arch, _precision(int8, report),
                        {"model": "model.onnx"}, inputs, outputs,
                        dict(options, int8=int8), {"passes": report})

    def runner_class(self) -> type[Runner]:
        return OrtCpuRunner


__all__ = ["OrtCpuTarget", "OrtCpuRunner", "lower_for_ort", "session_options", "cpu_session",
           "disabled_optimizers", "portable_options", "DEFAULT_DISABLED_OPTIMIZERS"]
