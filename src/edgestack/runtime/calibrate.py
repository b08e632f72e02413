"""Measure a package's fixed memory costs on the machine that serves it (once, cached).

The memory plan (:mod:`edgestack.runtime.plan`) models what it can count (blocks, dense
weights, activations) and needs two numbers it cannot: the **fixed overhead** of serving
(ONNX Runtime's session and kernels for this graph, the code pages they touch, the runtime's
Python objects) and the **decode temporaries** per weight per block of an on-the-fly layer.
Both depend on the machine: the ONNX Runtime build, the C library and its allocator, the
page cache. Constants carried from one machine were 2 MiB low and 20% high on another, so the
planner measures them where it runs:

1. a fresh interpreter imports :mod:`edgestack.runtime`, then numpy and onnxruntime, and
   reports its peak RSS (``VmHWM``): the baseline every plan is counted above. The order
   matters: importing onnxruntime first made the baseline 3 MB larger (58.3 vs 55.2 MB
   here) while the peak after loading a package stayed the same, so plans calibrated on that
   baseline were 3 MB short for a process that imports the runtime first (the bench's and
   the demo's probes). The smaller baseline makes the plans conservative for either order;
2. a fresh interpreter serves the package's **top tier with every layer materialised**:
   int8 on the mixed graph, and each dense graph in its form (int8, nbits8, fp32), and runs
   the golden inputs three times (a decoder package: one request that fills the KV cache
   to ``max_context`` for ``max_batch`` sequences, the prompt in prefill chunks, then a
   decode step): its peak minus the baseline, minus what the plan counts without overhead
   (the ``kv_cache`` line included), is that graph's fixed overhead;
3. **tier 0 and the top tier with every layer decoded on the fly** (plain graph): the
   difference of what is left above the two plans, divided by the difference of the largest
   layer's decode work, is the decode temporaries per weight per block; what tier 0 leaves
   after them is the plain graph's fixed overhead.

The result is cached as JSON under :func:`cache_dir`, keyed by the package's manifest hash
and the machine (architecture, Python, numpy and ONNX Runtime versions, C library, page
size, CPU count, threads, optimization level) and a digest of the runtime's own source, so
each package is measured once per machine and setting. Where a measurement cannot run (no
subprocess, a crash) :func:`calibrate` warns and returns the documented constants
(:data:`~edgestack.runtime.plan.DEFAULT_COSTS`).

``edgestack plan PKG --budget B`` calibrates on first use (``--recalibrate`` measures again,
``--no-calibrate`` plans with the documented constants).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgestack import __version__
from edgestack.runtime.plan import DEFAULT_COSTS, Costs, graph_sizes, plan_tier

DECODE_TEMP_RANGE = (2.0, 64.0)
"""Bounds for a measured decode-temporary coefficient (bytes per weight per block): outside
them the measurement is noise (a layer too small to show its temporaries), and the bound is
used."""

PROBE_CALLS = 3
"""Inference calls each probe makes (the peak is reached on the first)."""

_PROBE = r"""
import edgestack.runtime as R
import json, sys
import numpy as np
engine, precision = sys.argv[2], (None if sys.argv[3] == '-' else sys.argv[3])
if engine == 'openvino':
    import openvino
else:
    import onnxruntime
from edgestack.profiler.probe import peak_rss
if sys.argv[1] == 'base':
    print(json.dumps({'hwm': peak_rss()}))
    sys.exit(0)
pkg, tier, mat = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
threads, opt = int(sys.argv[7]), sys.argv[8]
graph = sys.argv[10] if sys.argv[10] != 'auto' else None
extra = {'engine': engine, 'precision': precision} if engine == 'openvino' else {}
rt = R.Runtime(pkg, tier=tier, materialize=mat, threads=threads or None, optimization=opt,
               graph=graph, form=sys.argv[11], prepack=sys.argv[12], **extra)
dec = rt.package.manifest.runtime.decoder
if dec is not None:   # a decoder: fill the cache to max_context, max_batch sequences
    n, vocab = dec.max_context, dec.decoder_contract().vocab_size
    rt.generate([[(7 * i + j) % min(vocab, 100) for j in range(max(1, n - 2))]
                 for i in range(dec.max_batch)], min(2, n - 1) or 1, stop=())
else:
    feeds = rt.package.golden()[0]
    for _ in range(int(sys.argv[9])):
        rt.infer(feeds)
print(json.dumps({'hwm': peak_rss(), 'tier': rt.tier}))
"""


def cache_dir() -> Path:
    """Where calibrations are kept: ``$EDGESTACK_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/edgestack/calibration``, else ``~/.cache/edgestack/calibration``."""
    env = os.environ.get("EDGESTACK_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgestack" / "calibration"


def machine_key(threads: int | None = None, optimization: str = "all",
                engine: str = "onnxruntime", precision: str | None = None,
                prepack: str = "on") -> dict[str, Any]:
    """What the fixed costs depend on, besides the package (``prepack``: the runtime's
    option, see :class:`~edgestack.runtime.Runtime`)."""
    import numpy

    if engine == "openvino":
        import openvino

        lib = {"openvino": openvino.__version__, "precision": precision}
    else:
        import onnxruntime

        lib = {"onnxruntime": onnxruntime.__version__}
    return {"edgestack": __version__, "code": _code_digest(), "machine": platform.machine(),
            "python": platform.python_version(), "numpy": numpy.__version__, **lib,
            "libc": "-".join(platform.libc_ver()),
            "page": mmap.PAGESIZE, "cpus": os.cpu_count(), "threads": int(threads or 0),
            "optimization": optimization, "prepack": prepack}


def _code_digest() -> str:
    """A digest of the runtime's own source: a change in how the runtime serves or plans
    invalidates the measurements made with the old code."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cache_path(package: Any, key: dict[str, Any]) -> Path:
    # the files and the runtime section the planner reads (a repack may change only the latter)
    ident = [sorted((name, e.sha256, e.size) for name, e in package.files.items()),
             json.dumps(package.manifest.runtime.to_dict(), sort_keys=True)]
    digest = hashlib.sha256(json.dumps([ident, key], sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"{digest[:32]}.json"


def _probe(*args: Any) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], capture_output=True,
                         text=True, timeout=600, check=False)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"probe {args[0]} exited {out.returncode}: {tail[0][:300]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(package: Any, *, threads: int | None = None, optimization: str = "all",
            log: Callable[[str], None] | None = None, engine: str = "onnxruntime",
            precision: str | None = None, prepack: str = "on") -> dict[str, Any]:
    """Run the probes (see the module doc) on ``package``; the costs and the raw
    measurements as a JSON-able dict. Raises RuntimeError when a probe fails.

    Tier 0 and the top tier with every layer on the fly (plain graph) give the decode
    temporaries (from the difference, so independent of the overhead) and then the plain
    overhead; with a mixed graph (``model.mixed.onnx``), the top tier with every layer
    materialised (int8) gives the mixed overhead. With ``engine="openvino"`` only the dense
    graphs are measured (OpenVINO serves nothing else), over a baseline that has imported
    openvino instead of onnxruntime.
    """
    man = package.manifest
    top, n_layers = len(man.tiers) - 1, len(man.layers)
    zero = Costs(overhead=0, decode_temp_bytes=0.0, source="probe")
    say = log or (lambda _m: None)
    say(f"calibrate: measuring the fixed memory costs of {package.path} on this machine "
        "(once; cached) ...")
    lib = (engine, precision or "-")
    base = _probe("base", *lib)["hwm"]

    def run(tier: int, mat: int, graph: str, form: str = "int8") -> int:
        return _probe("run", *lib, package.path, tier, mat, threads or 0, optimization,
                      PROBE_CALLS, graph, form, prepack)["hwm"] - base

    if engine == "openvino":
        result: dict[str, Any] = {"baseline_hwm": base, "engine": engine,
                                  "precision": precision}
        overheads = _dense_overheads(man, run, ("int8", "nbits8", "fp32"), result)
        result["costs"] = {"overhead": DEFAULT_COSTS.overhead, "overhead_mixed": None,
                           **{f"overhead_{g}": v for g, v in overheads.items()},
                           "decode_temp_bytes": DEFAULT_COSTS.decode_temp_bytes}
        return result

    def otf(tier: int) -> tuple[Any, int]:
        """The all-on-the-fly plan of ``tier`` (plain graph) and its decode work."""
        plan = plan_tier(man, tier, materialize=0, costs=zero)
        return plan, max(((lp.blocks + 1) * _numel(man.layers[lp.name]) for lp in plan.layers),
                         default=0)

    plan0, work0 = otf(0)
    result: dict[str, Any] = {"baseline_hwm": base}
    inc0 = run(0, 0, "plain")
    decode = float(DEFAULT_COSTS.decode_temp_bytes)
    result["on_the_fly"] = {"tier": 0, "increase": inc0, "counted": plan0.expected_bytes,
                            "decode_work": work0}
    if n_layers and top > 0:
        # the same graph at two tiers: the difference is decode temporaries and blocks only,
        # so the coefficient does not depend on the overhead
        plan1, work1 = otf(top)
        inc1 = run(top, 0, "plain")
        if work1 > work0:
            raw = ((inc1 - plan1.expected_bytes) - (inc0 - plan0.expected_bytes)) / (
                work1 - work0)
            decode = min(max(raw, DECODE_TEMP_RANGE[0]), DECODE_TEMP_RANGE[1])
            result["on_the_fly_top"] = {"tier": top, "increase": inc1,
                                        "counted": plan1.expected_bytes, "decode_work": work1,
                                        "decode_temp_raw": raw}
    overhead = max(0, int(inc0 - plan0.expected_bytes - decode * work0))
    overheads = _dense_overheads(man, run, ("mixed", "int8", "nbits8", "fp32"), result)
    result["costs"] = {"overhead": overhead, "overhead_mixed": overheads["mixed"],
                       "overhead_int8": overheads["int8"], "overhead_fp32": overheads["fp32"],
                       "overhead_nbits8": overheads["nbits8"],
                       "decode_temp_bytes": round(decode, 3)}
    return result


def _dense_overheads(man: Any, run: Callable[..., int], graphs: tuple[str, ...],
                     result: dict[str, Any]) -> dict[str, int | None]:
    """The overhead of each of ``graphs`` the package has (None for the others): the top tier
    with every layer materialised (int8 on the mixed graph) leaves no decode temporaries, so
    what its peak holds beyond what the plan counts is the graph's overhead (with what
    materialising costs beyond the model: conservative). Each probe goes into ``result``."""
    top, n_layers = len(man.tiers) - 1, len(man.layers)
    zero = Costs(overhead=0, decode_temp_bytes=0.0, source="probe")
    sizes = graph_sizes(man)
    overheads: dict[str, int | None] = dict.fromkeys(graphs)
    for graph in [g for g in graphs if g in sizes]:
        form = "int8" if graph == "mixed" else graph
        top_plan = plan_tier(man, top, materialize=n_layers, costs=zero, form=form)
        if not top_plan.materialized:
            continue
        counted = top_plan.expected_bytes - top_plan.graph_bytes + sizes[graph]
        inc = run(top, n_layers, "mixed" if graph == "mixed" else "auto", form)
        overheads[graph] = max(0, inc - counted)
        result[f"materialized_{graph}"] = {"tier": top, "increase": inc, "counted": counted}
    return overheads


def _numel(info: Any) -> int:
    m, n = info.matrix_shape
    return int(m) * int(n)


def calibrate(package: Any, *, threads: int | None = None, optimization: str = "all",
              refresh: bool = False, log: Callable[[str], None] | None = None,
              engine: str = "onnxruntime", precision: str | None = None,
              prepack: str = "on") -> Costs:
    """The fixed memory costs of serving ``package`` (an open
    :class:`~edgestack.package.Package`) on this machine with ``engine`` (and OpenVINO's
    ``precision``): from the cache, else measured (a few seconds, see the module doc) and
    cached. ``refresh`` measures again.

    Where the measurement cannot run, warns and returns the documented constants.
    """
    key = machine_key(threads, optimization, engine, precision, prepack)
    path = _cache_path(package, key)
    if not refresh and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            return _costs(cached["costs"], path)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry: measure again
    try:
        result = measure(package, threads=threads, optimization=optimization, log=log,
                         engine=engine, precision=precision, prepack=prepack)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        warnings.warn(f"calibrate: could not measure the memory costs on this machine ({exc}); "
                      "using the documented constants (plans may be off by a few MiB)",
                      RuntimeWarning, stacklevel=2)
        return DEFAULT_COSTS
    result["key"] = key
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"calibrate: could not cache the calibration in {path.parent} ({exc}); "
                      "it will be measured again next time", RuntimeWarning, stacklevel=2)
    return _costs(result["costs"], path)


def _costs(c: Mapping[str, Any], path: Path) -> Costs:
    def opt(key: str) -> int | None:
        return None if c.get(key) is None else int(c[key])

    return Costs(int(c["overhead"]), float(c["decode_temp_bytes"]),
                 f"calibrated on this machine ({path.name})", opt("overhead_mixed"),
                 opt("overhead_int8"), opt("overhead_fp32"), opt("overhead_nbits8"))


__all__ = ["calibrate", "measure", "machine_key", "cache_dir", "DECODE_TEMP_RANGE"]
