"""On-device runtime: plan memory for a budget, load exactly the plan, serve, re-tier.

Serving imports numpy, onnxruntime (or openvino, for ``openvino-cpu`` packages: see
:mod:`edgestack.runtime.openvino`), psutil and edgestack's core/package/formats/profiles
only, never torch and never onnx (tests/runtime proves it in a fresh interpreter, and the
import contracts in pyproject.toml check it); budgets are
planned with this machine's measured fixed costs (:mod:`edgestack.runtime.calibrate`)::

    from edgestack.runtime import Runtime, plan_memory
    rt = Runtime("minilm.pkg", budget="40MB")
    out = rt.infer({"input_ids": ids, "attention_mask": mask})
    rt.retier("50MB")         # grow: reads only the new block records
    rt.retier("36MB")         # shrink: gives the dropped rows back
    gen = Runtime("gpt2.pkg", budget="300MB").generate([[464, 2068]], 32, temperature=0.8,
                                                      top_p=0.9, seed=0)  # a decoder package

See docs/runtime.md.
"""

from edgestack.runtime.budget import available_memory, cgroup_limit_left, resolve_budget
from edgestack.runtime.calibrate import calibrate
from edgestack.runtime.generate import Generation, package_tokenizer
from edgestack.runtime.openvino import ENGINES, PRECISIONS, check_engine
from edgestack.runtime.plan import (
    DECODE_TEMP_BYTES,
    DEFAULT_COSTS,
    KV_ALIVE,
    MATERIALISE_TEMP_BYTES,
    RUNTIME_OVERHEAD,
    Costs,
    LayerPlan,
    MemoryPlan,
    context_fit,
    kv_cache_bytes,
    plan_memory,
    plan_tier,
    smallest_plan,
)
from edgestack.runtime.runtime import RetierResult, Runtime

__all__ = ["Runtime", "RetierResult", "MemoryPlan", "LayerPlan", "plan_memory", "calibrate",
           "Costs", "DEFAULT_COSTS", "plan_tier", "smallest_plan", "resolve_budget",
           "available_memory", "cgroup_limit_left", "RUNTIME_OVERHEAD", "DECODE_TEMP_BYTES",
           "MATERIALISE_TEMP_BYTES", "ENGINES", "PRECISIONS", "check_engine", "Generation",
           "package_tokenizer", "KV_ALIVE", "kv_cache_bytes", "context_fit"]
