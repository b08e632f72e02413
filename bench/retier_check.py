"""What checking block records on a re-tier costs (issue 14: what is served is what was
verified).

    .venv/bin/python bench/retier_check.py PKG [--runs 10] [--out bench/results/retier_check.json]

PKG: a BitStack package (e.g. ``edgestack pack edgestack-demo/models/minilm-bitstack.onnx
--out /tmp/mlpkg``). Measured, median of ``--runs`` each, in this process, the block file in
the page cache:

- ``retier`` from tier 0 to the top tier with every layer on the fly (only reads: the bytes
  the top tier adds), with the per-record sha256 check (the runtime's) and without it
  (``Package.check_record`` replaced by a no-op); a shrink back to tier 0, not timed,
  between runs;
- the same with the default plan (every layer int8 in the dense graph: decode, quantize and
  a new session dominate);
- the alternative that was not chosen: ``fstat`` of the block file (size, mtime, inode)
  before a re-tier, and that it misses an in-place rewrite whose mtime is put back
  (``os.utime``), as a same-tick rewrite or ``cp -p``/``rsync -t`` leave it;
- ``Package.verify`` (the whole file's and every record's hash in one pass) vs hashing the
  whole file once;
- hashlib's sha256 throughput on this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgestack.package import Package
from edgestack.runtime import Runtime


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({f for f in ("avx512_vnni", "avx_vnni", "amx_tile", "sha_ni")
                   if f" {f}" in text})


def retier_costs(pkg_path: str, runs: int, **kw: object) -> dict[str, object]:
    """Tier 0 -> top, ``runs`` times each with and without the record check, interleaved
    (this machine's load varies: alternating keeps the two comparable)."""
    real = Package.check_record
    times: dict[str, list[float]] = {"checked": [], "unchecked": []}
    with Runtime(pkg_path, tier=0, calibrate=False, verify=False, **kw) as rt:
        top = len(rt.package.tiers) - 1
        grow = rt.package.tiers[top].bytes - rt.package.tiers[0].bytes
        rt.retier(tier=top)       # warm: page cache, iov lists
        for i in range(2 * runs):
            label = "checked" if i % 2 == 0 else "unchecked"
            rt.retier(tier=0)
            if label == "unchecked":
                Package.check_record = lambda *a, **k: None
            try:
                t0 = time.perf_counter()
                rt.retier(tier=top)
                times[label].append(time.perf_counter() - t0)
            finally:
                Package.check_record = real
        graph = rt._state.graph
    out: dict[str, object] = {"grow_bytes": grow, "top_tier": top, "graph": graph}
    for label, ts in times.items():
        med = statistics.median(ts)
        out[label] = {"median_ms": round(med * 1e3, 3), "min_ms": round(min(ts) * 1e3, 3),
                      "bytes_per_s": round(grow / med)}
    return out


def stat_check(pkg_path: str, runs: int) -> dict[str, object]:
    """The fstat alternative: its cost, and the rewrite it misses."""
    work = Path(tempfile.mkdtemp(prefix="retier-check-"))
    try:
        copy = work / "pkg"
        shutil.copytree(pkg_path, copy)
        path = copy / "blocks.bin"
        fd = os.open(path, os.O_RDONLY)
        ref = os.fstat(fd)
        times = []
        for _ in range(runs * 100):
            t0 = time.perf_counter()
            st = os.fstat(fd)
            _same = (st.st_size, st.st_mtime_ns, st.st_ino) == (ref.st_size, ref.st_mtime_ns,
                                                                ref.st_ino)
            times.append(time.perf_counter() - t0)
        with Runtime(copy, tier=0, calibrate=False, materialize=0) as rt:
            before = rt.infer(rt.package.golden()[0])
            rec = rt.package.block_index[rt.package.tiers[0].n_records + 5]
            with open(path, "r+b") as f:      # 16 bytes of a later record, in place
                f.seek(rec.u)
                f.write(bytes(range(16)))
            os.utime(path, ns=(ref.st_atime_ns, ref.st_mtime_ns))
            st = os.fstat(fd)
            stat_sees = (st.st_size, st.st_mtime_ns, st.st_ino) != (
                ref.st_size, ref.st_mtime_ns, ref.st_ino)
            try:
                rt.retier(tier=12)
                refused = ""
            except Exception as exc:  # the runtime's answer: PackageError
                refused = f"{type(exc).__name__}: {str(exc)[:160]}"
            after = rt.infer(rt.package.golden()[0])
            same = all(np.array_equal(before[k], after[k]) for k in before)
        os.close(fd)
        return {"fstat_median_us": round(statistics.median(times) * 1e6, 3),
                "in_place_rewrite_mtime_restored": {"stat_check_sees_it": stat_sees,
                                                    "hash_check_refuses": refused,
                                                    "tier_after": rt.tier,
                                                    "outputs_unchanged": same}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def verify_costs(pkg_path: str, runs: int) -> dict[str, object]:
    with Package.open(pkg_path) as pkg:
        size = pkg.block_file_size
        both, once = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            pkg.verify(["blocks.bin"])
            both.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pkg._read_hashed("blocks.bin", keep=False)
            once.append(time.perf_counter() - t0)
    return {"bytes": size,
            "file_and_records_ms": round(statistics.median(both) * 1e3, 2),
            "file_only_ms": round(statistics.median(once) * 1e3, 2)}


def sha256_speed() -> float:
    data = os.urandom(32 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {
        "package": args.package,
        "machine": {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(),
                    "cpus": os.cpu_count()},
        "sha256_bytes_per_s": round(sha256_speed()),
        "retier_on_the_fly": retier_costs(args.package, args.runs, materialize=0),
        "retier_default_plan": retier_costs(args.package, max(3, args.runs // 2)),
        "stat_alternative": stat_check(args.package, args.runs),
        "verify": verify_costs(args.package, args.runs),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
