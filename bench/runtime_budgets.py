"""Runtime memory budgets on a MiniLM BitStack package (edgestack.runtime vs a reference loader).

Usage::

    .venv/bin/python bench/runtime_budgets.py [--blocks 6] [--rebuild]

Builds (and caches under .cache/runtime_bench/) an all-MiniLM-L6-v2 BitStack package
(method bitstack, text calibration, ``--blocks`` blocks per matrix), then measures, each in a
fresh subprocess (peak RSS = VmHWM of /proc/self/status, minus the VmHWM of a subprocess that
only imported edgestack.runtime and onnxruntime):

0. the package's fixed costs on this machine (edgestack.runtime.calibrate, cached);
1. five budgets spread over the range of the planner's plans, and five over the range of
   plans with every layer on the fly (``materialize=0``), planned with those costs, each run
   in ``--runs`` fresh processes (default 20): chosen tier, plan total, measured increase
   (every run must stay within the budget and at or above 0.9 of the plan), ratio;
2. growing by one tier: bytes read (counted) and time vs reading the same bytes sequentially
   from the same file in the same process; shrinking: RSS before/after;
3. re-tiering while another thread calls infer: every output equals its tier's reference;
4. the reference BitStack loader (read every block, decode dense, drop the unused): its peak
   at the same budget, and the reload it needs to change budget.

Writes bench/results/runtime_budgets.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "runtime_bench"
RESULTS = ROOT / "bench" / "results" / "runtime_budgets.json"
PY = sys.executable
MiB = 2**20


def build_package(blocks: int, rebuild: bool) -> Path:
    """The cached MiniLM BitStack package (built with torch in a subprocess)."""
    pkg = CACHE / f"minilm-bitstack-{blocks}.pkg"
    if pkg.exists() and not rebuild:
        return pkg
    CACHE.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(f"""
        import time, warnings
        from pathlib import Path
        from edgestack import zoo
        from edgestack.compress import compress
        from edgestack.compress.calib import text_calib
        from edgestack.exporter import export
        from edgestack.packer.pack import pack
        t0 = time.time()
        model, inputs = zoo.minilm()
        calib = text_calib(zoo.minilm_path(), n=32, seq=64, batch=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = compress(model, "bitstack", calib=calib, n_blocks={blocks}, signs="plain")
        print(f"compressed in {{time.time() - t0:.0f}} s", flush=True)
        onnx_path = Path({str(CACHE)!r}) / "minilm-bitstack-{blocks}.onnx"
        export(model, inputs, onnx_path, parity=False, overwrite=True,
               metadata={{"method": "bitstack", "source": "minilm",
                          "compression": report.to_dict()}})
        pack(onnx_path, {str(pkg)!r}, overwrite=True, name="all-MiniLM-L6-v2", log=print)
        print(f"built in {{time.time() - t0:.0f}} s", flush=True)
    """)
    subprocess.run([PY, "-c", code], check=True, cwd=ROOT)
    return pkg


# ---- measurements (each runs in a fresh interpreter) -----------------------------------

PRELUDE = r"""
import edgestack.runtime as R   # first: the order of the calibration's baseline (see calibrate)
import json, os, sys, time
import numpy as np
from edgestack.profiler.probe import peak_rss
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
import onnxruntime
from edgestack.package import Package
def emit(obj):
    print('RESULT ' + json.dumps(obj), flush=True)
"""

BASE = PRELUDE + r"""
emit({'hwm': peak_rss(), 'torch': 'torch' in sys.modules})
"""

BUDGET = PRELUDE + r"""
pkg, budget = sys.argv[1], int(sys.argv[2])
mat = None if sys.argv[3] == 'planner' else int(sys.argv[3])
t0 = time.perf_counter()
rt = R.Runtime(pkg, budget, materialize=mat)
load_s = time.perf_counter() - t0
x = rt.package.golden()[0]
times = []
for _ in range(5):
    t = time.perf_counter(); rt.infer(x); times.append(time.perf_counter() - t)
emit({'hwm': peak_rss(), 'tier': rt.tier, 'plan': rt.plan.total, 'graph': rt.plan.graph,
      'materialized': len(rt.plan.materialized), 'load_s': load_s,
      'infer_ms': 1000 * float(np.median(times)), 'bytes_read': rt.bytes_read,
      'torch': 'torch' in sys.modules})
"""

GROW = PRELUDE + r"""
pkg_path, reps = sys.argv[1], int(sys.argv[2])
rt = R.Runtime(pkg_path, tier=0, materialize=0)
pkg = rt.package
n = len(pkg.tiers)
x = pkg.golden()[0]
fd = os.open(str(pkg.path / 'blocks.bin'), os.O_RDONLY)
rows = []
for t in range(n - 1):
    grow, seq, tot = [], [], []
    for _ in range(reps):
        rt.retier(tier=t)
        pkg.counter.reset()
        res = rt.retier(tier=t + 1)
        assert pkg.counter.bytes_read == res.bytes_read
        grow.append(res.read_seconds); tot.append(res.seconds)
        lo, hi = pkg.tiers[t].bytes, pkg.tiers[t + 1].bytes
        buf = np.empty(hi - lo, np.uint8)
        s = time.perf_counter()
        os.preadv(fd, [memoryview(buf)], lo)
        seq.append(time.perf_counter() - s)
        del buf
    rows.append({'from': t, 'to': t + 1, 'bytes_read': res.bytes_read,
                 'expected_bytes': pkg.tiers[t + 1].bytes - pkg.tiers[t].bytes,
                 'read_s': float(np.median(grow)), 'retier_s': float(np.median(tot)),
                 'sequential_s': float(np.median(seq))})
# shrink gives memory back (VmRSS, after infer at each end)
rt2 = R.Runtime(pkg_path, tier=n - 1, materialize=0)   # on the fly: blocks held, then given back
rt2.infer(x)
top_rss = rss()
plan_before = rt2.plan.total
res = rt2.retier(tier=0)
rt2.infer(x)
low_rss = rss()
emit({'grow': rows, 'shrink': {'rss_before': top_rss, 'rss_after': low_rss,
                               'released_bytes': res.released_bytes,
                               'plan_before': plan_before,
                               'plan_after': rt2.plan.total}})
"""

CONCURRENCY = PRELUDE + r"""
import threading
pkg_path, rounds = sys.argv[1], int(sys.argv[2])
rt = R.Runtime(pkg_path)
n = len(rt.package.tiers)
x = rt.package.golden()[0]
refs = {}
for t in range(n):
    rt.retier(tier=t)
    refs[t] = rt.infer(x)
results, errors, stop = [], [], threading.Event()
def serve():
    try:
        while not stop.is_set():
            results.append(rt.infer_with_tier(x))
    except BaseException as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=serve) for _ in range(2)]
for th in threads: th.start()
rng = np.random.default_rng(0)
for _ in range(rounds):
    rt.retier(tier=int(rng.integers(0, n)))
stop.set()
for th in threads: th.join()
bad = sum(1 for t, out in results
          if any(not np.array_equal(out[k], refs[t][k]) for k in out))
emit({'calls': len(results), 'retiers': rounds, 'errors': errors, 'mismatches': bad,
      'tiers_seen': sorted({t for t, _ in results})})
"""

REFERENCE = PRELUDE + r"""
# The reference BitStack loader: read every block, decode dense weights for the tier that
# the budget allows, drop the blocks, run dense. Changing the budget means doing it again.
import onnx
from onnx import helper
from edgestack.formats import BitStackStack
pkg_path, tier = sys.argv[1], int(sys.argv[2])
def load(tier):
    pkg = Package.open(pkg_path)
    data = pkg.read_prefix(0, pkg.block_file_size)          # every block
    by_layer = {}
    for view in pkg.views_of(data, 0):
        by_layer.setdefault(view.layer, []).append(view)
    dense = {}
    for name, views in by_layer.items():
        info = pkg.layers[name]
        nb = pkg.tiers[tier].blocks[name]
        st = BitStackStack(np.stack([v.signs for v in views]), np.stack([v.u for v in views]),
                           np.stack([v.v for v in views]), info.shape)
        dense[info.graph.output] = st.decode(nb)           # drop the unused blocks
        del st
    read = pkg.counter.bytes_read
    del data, by_layer
    m = onnx.load(str(pkg.path / 'model.onnx'), load_external_data=False)
    nodes = {pkg.layers[n].graph.node for n in pkg.layers}
    drop = set()
    for n in pkg.layers:
        a = pkg.layers[n].graph; drop |= {a.signs, a.u, a.v}
    keep = [nd for nd in m.graph.node if nd.name not in nodes]
    del m.graph.node[:]; m.graph.node.extend(keep)
    ins = [vi for vi in m.graph.input if vi.name not in drop]
    del m.graph.input[:]; m.graph.input.extend(ins)
    for n in pkg.layers:
        info = pkg.layers[n]
        m.graph.input.append(helper.make_tensor_value_info(info.graph.output, 1,
                                                           list(info.shape)))
    # non-BitStack weights resident, as edgestack.runtime holds them (same treatment: the
    # difference measured is the block handling); ORT gets them without a copy
    so = onnxruntime.SessionOptions()
    so.enable_cpu_mem_arena = False
    weights = np.fromfile(pkg.path / 'model.data', dtype=np.uint8)
    keep_alive = []
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {kv.key: kv.value for kv in t.external_data}
            off, ln = int(info['offset']), int(info['length'])
            dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            arr = weights[off:off + ln].view(dt).reshape(tuple(t.dims))
            val = onnxruntime.OrtValue.ortvalue_from_numpy(arr)
            keep_alive.append(val)
            so.add_initializer(t.name, val)
    import tempfile
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, 'model.data'), 'wb') as f:
        f.truncate(weights.size)
    so.add_session_config_entry('session.model_external_initializers_file_folder_path', folder)
    sess = onnxruntime.InferenceSession(m.SerializeToString(), so,
                                        providers=['CPUExecutionProvider'])
    sess._keep = (weights, keep_alive)
    return sess, dense, read, pkg
t0 = time.perf_counter()
sess, dense, read, pkg = load(tier)
load_s = time.perf_counter() - t0
x = dict(pkg.golden()[0])
from edgestack.package.tables import gather_rows, lookup_table
wdata = np.memmap(pkg.path / 'model.data', dtype=np.uint8, mode='r')
for spec in pkg.manifest.runtime.gathered.values():
    table = lookup_table(wdata, spec)      # pre-gathered lookups, as the runtime feeds them
    for ids, value in spec.lookups:
        x[value] = gather_rows(table, x[ids], ids)
sess.run(None, {**x, **dense})
hwm1 = peak_rss()
t0 = time.perf_counter()
del sess, dense
sess, dense, read2, pkg = load(max(0, tier - 1))            # a new budget: reload everything
reload_s = time.perf_counter() - t0
emit({'hwm': hwm1, 'bytes_read': read, 'load_s': load_s, 'reload_s': reload_s,
      'reload_bytes_read': read2})
"""


def sub(script: str, *args: object) -> dict:
    out = subprocess.run([PY, "-c", script, *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"subprocess failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def run_all(pkg: Path, reps: int = 11, rounds: int = 40, runs: int = 20,
            refresh: bool = False) -> dict:
    from edgestack.package import Package
    from edgestack.runtime import calibrate, plan_tier, smallest_plan
    from edgestack.runtime.plan import graph_sizes

    p = Package.open(pkg)
    n = len(p.tiers)
    n_layers = len(p.layers)
    costs = calibrate(p, refresh=refresh, log=lambda m: print(m, flush=True))
    print(f"costs: {costs.to_dict()}", flush=True)
    base = sub(BASE)
    print(f"baseline (imported edgestack.runtime + onnxruntime): VmHWM "
          f"{base['hwm'] / MiB:.1f} MiB, torch imported: {base['torch']}", flush=True)

    def budget_rows(what: str, mat: int | None) -> list[dict]:
        """5 budgets spread over the plan range of the planner's choice (``mat`` None) or of
        every layer on the fly (``mat`` 0), each 1 MiB above a plan, ``runs`` fresh
        processes each."""
        best = [plan_tier(p, t, materialize=mat, costs=costs).total if mat is not None
                else smallest_plan(p, t, costs).total for t in range(n)]
        # the planner's range ends at the top tier served in its most exact form (auto:
        # fp32, else nbits8, else int8)
        lo, hi = min(best), max(best) if mat is not None else max(
            plan_tier(p, n - 1, materialize=n_layers, costs=costs, form=f).total
            for f in ("int8", "nbits8", "fp32") if f in graph_sizes(p.manifest))
        budgets = [int(lo + (hi - lo) * f) + 2**20 for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
        print(f"{what}: plan range {lo / MiB:.1f}..{hi / MiB:.1f} MiB", flush=True)
        rows = []
        for b in budgets:
            incs = []
            for _ in range(runs):        # fresh processes: the promise must hold every time
                r = sub(BUDGET, pkg, b, "planner" if mat is None else mat)
                incs.append(r["hwm"] - base["hwm"])
            inc = max(incs)
            expected = max(t for t in range(n) if best[t] <= b)
            rows.append({"plans": what, "budget": b, "tier": r["tier"],
                         "expected_tier": expected, "plan_total": r["plan"],
                         "measured_increase": inc, "increases": incs, "runs": runs,
                         "ratio": inc / r["plan"], "min_ratio": min(incs) / r["plan"],
                         "within_budget": all(i <= b for i in incs),
                         "materialized_layers": r["materialized"], "graph": r["graph"],
                         "load_s": r["load_s"],
                         "infer_ms": r["infer_ms"], "bytes_read": r["bytes_read"],
                         "tier_block_bytes": p.tiers[r["tier"]].bytes, "torch": r["torch"]})
            print(f"budget {b / MiB:7.1f} MiB: tier {r['tier']:2d} (largest fitting "
                  f"{expected:2d}), {r['materialized']:2d} materialised ({r['graph']}), plan "
                  f"{r['plan'] / MiB:6.1f} MiB, measured +{min(incs) / MiB:6.1f}.."
                  f"{inc / MiB:6.1f} MiB over {runs} runs (ratio {min(incs) / r['plan']:.3f}.."
                  f"{inc / r['plan']:.3f}, {'<=' if rows[-1]['within_budget'] else '>'} "
                  f"budget), infer {r['infer_ms']:.1f} ms", flush=True)
        return rows

    print(f"package {pkg}: {n} tiers, {n_layers} BitStack layers", flush=True)
    rows = budget_rows("planner", None) + budget_rows("on the fly", 0)
    grow = sub(GROW, pkg, reps)
    for g in grow["grow"]:
        g["ratio_vs_sequential"] = g["read_s"] / max(g["sequential_s"], 1e-9)
    worst = max(grow["grow"], key=lambda g: g["ratio_vs_sequential"])
    exact = all(g['bytes_read'] == g['expected_bytes'] for g in grow['grow'])
    print(f"grow one tier ({len(grow['grow'])} steps, median of {reps}): bytes read == new "
          f"bytes in every step: {exact}"
          f"; read time / sequential read: median "
          f"{np.median([g['ratio_vs_sequential'] for g in grow['grow']]):.2f}, worst "
          f"{worst['ratio_vs_sequential']:.2f} ({worst['bytes_read']} bytes); whole re-tier "
          f"(read + new state, on-the-fly layers) median "
          f"{1000 * np.median([g['retier_s'] for g in grow['grow']]):.1f} ms", flush=True)
    sh = grow["shrink"]
    print(f"shrink top -> tier 0: VmRSS {sh['rss_before'] / MiB:.1f} -> "
          f"{sh['rss_after'] / MiB:.1f} MiB (released {sh['released_bytes'] / MiB:.2f} MiB "
          f"of block rows; plan {sh['plan_before'] / MiB:.1f} -> {sh['plan_after'] / MiB:.1f} "
          "MiB)", flush=True)
    conc = sub(CONCURRENCY, pkg, rounds)
    print(f"concurrency: {conc['calls']} calls on 2 threads during {conc['retiers']} re-tiers: "
          f"{len(conc['errors'])} errors, {conc['mismatches']} outputs differing from their "
          f"tier's, tiers seen {conc['tiers_seen']}", flush=True)
    mid = rows[2]
    ref = sub(REFERENCE, pkg, mid["tier"])
    ref_inc = ref["hwm"] - base["hwm"]
    print(f"reference loader at budget {mid['budget'] / MiB:.1f} MiB (tier {mid['tier']}): "
          f"+{ref_inc / MiB:.1f} MiB ({'above' if ref_inc > mid['budget'] else 'within'} "
          f"budget; edgestack +{mid['measured_increase'] / MiB:.1f} MiB), read "
          f"{ref['bytes_read'] / MiB:.2f} MiB of blocks (edgestack "
          f"{mid['bytes_read'] / MiB:.2f}); changing budget = reload "
          f"{ref['reload_s']:.2f} s reading {ref['reload_bytes_read'] / MiB:.2f} MiB again",
          flush=True)
    result = {
        "package": str(pkg), "tiers": n, "layers": n_layers,
        "baseline_hwm": base["hwm"], "budgets": rows,
        "grow": grow["grow"], "shrink": sh, "concurrency": conc,
        "reference_loader": {**ref, "increase": ref_inc, "budget": mid["budget"],
                             "edgestack_increase": mid["measured_increase"],
                             "edgestack_block_bytes_read": mid["bytes_read"]},
        "costs": costs.to_dict(),       # the calibrated fixed costs this run planned with
        "constants": _constants(),      # the documented fallback constants
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")
    return result


def _constants() -> dict:
    from edgestack.runtime import plan as P

    return {k: getattr(P, k) for k in ("RUNTIME_OVERHEAD", "DECODE_TEMP_BYTES",
                                       "OTF_LAYER_OVERHEAD", "MATERIALIZED_LAYER_OVERHEAD",
                                       "SAFETY_FRACTION", "SAFETY_MIN",
                                       "MATERIALISE_TEMP_BYTES")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--reps", type=int, default=11, help="repeats of each grow step")
    ap.add_argument("--rounds", type=int, default=40, help="re-tiers in the concurrency run")
    ap.add_argument("--runs", type=int, default=20,
                    help="fresh-process runs at each of the 5 budgets (default 20)")
    ap.add_argument("--recalibrate", action="store_true",
                    help="measure the fixed costs again instead of using the cached ones")
    args = ap.parse_args(argv)
    pkg = build_package(args.blocks, args.rebuild)
    if args.build_only:
        print(pkg)
        return 0
    run_all(pkg, reps=args.reps, rounds=args.rounds, runs=args.runs,
            refresh=args.recalibrate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
