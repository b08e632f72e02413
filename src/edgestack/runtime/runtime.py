"""The on-device runtime: load exactly the planned bytes, serve, re-tier while serving.

Storage. Every BitStack layer gets three full-capacity arrays (signs, u, v for all of its
blocks) in anonymous memory maps: pages never written cost no memory. A tier's block records
are read with ``os.preadv`` straight into the first ``nb`` rows (scatter buffers; the
alignment gaps go to a scratch buffer), and the contiguous views ``arr[:nb]`` are the graph
inputs on every run (ONNX Runtime wraps contiguous numpy inputs without a copy). Growing
reads only ``[tiers[old].bytes, tiers[new].bytes)`` into rows ``nb..nb'``; shrinking drops
the rows beyond ``nb'`` with ``madvise(MADV_DONTNEED)`` once no call uses them.

Forms (see :mod:`edgestack.packer.variants`). A plan serves each layer on the fly (blocks
fed, ONNX Runtime decodes every call: the package's plain graph ``model.onnx``) or
materialised once per tier, decoded in numpy block by block and fed as int8 (per-channel,
``DynamicQuantizeMatMul``: 1 byte a weight) or float32 through the package's mixed graph
``model.mixed.onnx`` (the branches a layer does not take get empty arrays), or, when every
layer has one form, through that form's dense graph (``model.int8.onnx``,
``model.nbits8.onnx``, ``model.fp32.onnx``), whose weights the runtime writes to a data file
that ONNX Runtime maps and prepacks (:meth:`Runtime._dense_session`). The runtime never
edits a graph and does not import ``onnx``. Weights are memory-mapped: ONNX Runtime maps the
package's weights file itself (the session's external-data folder is the package folder);
lookup tables (``runtime.tables``) are mapped by the runtime, handed over with
``SessionOptions.add_initializer`` and their pages handed back after every call. Sessions run
with ``enable_mem_pattern=False``, and ``session.disable_prepacking=1`` except on the dense
graphs (option ``prepack``; a float table that a tied LM head shares with the word
embedding is an overridable initializer, which ONNX Runtime never prepacks: one copy; the
packer stores it int8 by default), so memory follows the plan; ONNX Runtime's arena is on
only for the dense graphs and compiled packages:
measured on a 12-block MiniLM package (2 threads, avx512_vnni), the arena made the int8
graph 18% faster (13.0 -> 10.7 ms) at the same peak RSS, and the plain graph 2.4-4x faster
on the fly but at +13-20% peak RSS (it keeps the decode temporaries); the memory pattern
added 5-13 MB for no speed. For a decoder too (every step has new shapes, and the
calibration, which fills the cache, measures what the arena keeps): GPT-2-small's int8
graph decoded 123.6 tokens/s with it vs 76.0 without, +9.8 MiB peak (bench/decoder_arena.py).

What is served is what was verified: every block record read (at open, on a re-tier, for a
materialised layer) is hashed in the runtime's own memory before it is fed or decoded
(the manifest's ``block_sha256``); a record changed on disk refuses the whole re-tier.

Serving state (tier, plan, session, feeds) is an immutable snapshot swapped under a lock;
``infer`` takes the snapshot current at its start, so in-flight calls finish on the tier
they started with. Re-tiering waits for calls on older snapshots before releasing memory.

This module imports numpy, onnxruntime and edgestack's package/formats/profiles: never
torch, never onnx.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgestack.core import atomic
from edgestack.core.compare import agree
from edgestack.core.ort import LEVELS, session_options
from edgestack.core.runner import Runner
from edgestack.errors import PackageError, TargetError
from edgestack.formats.bitstack import decode_blocks
from edgestack.formats.int8 import quantize_int8, quantize_nbits8
from edgestack.package.format import (
    BLOCK_FILE,
    DENSE_DATA,
    DENSE_FILES,
    SUPPORTED_TARGETS,
    VARIANT_FILE,
)
from edgestack.package.reader import Package
from edgestack.package.tables import lookup_table
from edgestack.package.wire import external_ranges
from edgestack.profiles import load_profile
from edgestack.runtime.budget import resolve_budget
from edgestack.runtime.calibrate import calibrate as calibrate_costs
from edgestack.runtime.generate import Generation, generate, generate_iter
from edgestack.runtime.openvino import PROFILE_PRECISIONS, OpenVINOSession, check_engine
from edgestack.runtime.plan import DEFAULT_COSTS, FORMS, Costs, MemoryPlan, plan_memory
from edgestack.runtime.storage import (
    FIX_REPACK,
    MEMORY_FILESYSTEMS,
    LayerStore,
    RowReader,
    copy_out,
    fix_malloc_threshold,
    fs_type,
    link_or_copy,
    trim_heap,
)
from edgestack.runtime.tensorrt import TensorRTSession
from edgestack.runtime.watch import Watcher

QUANTIZED_FORMS = ("int8", "nbits8")
"""Forms that round the tier's weights (the golden outputs hold the exact ones)."""


@dataclass
class _State:
    plan: MemoryPlan
    session: Any
    feeds: dict[str, np.ndarray]    # ours: signs/u/v views, materialised weights, site flags
    graph: str = "plain"            # the graph the session runs: "plain", "int8" or "mixed"
    rebuilt: bool = False
    gathered: frozenset[str] = frozenset()  # table rows the runtime reads per call
    active: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)
    lookup_ids: frozenset[str] = frozenset()  # ids inputs of the runtime's lookups
    inputs: list[str] = field(init=False)    # the caller's graph inputs (not fed by us)
    outputs: list[str] = field(init=False)
    required: tuple[str, ...] = field(init=False)  # every name a caller feeds, in order

    def __post_init__(self) -> None:
        self.inputs = [i.name for i in self.session.get_inputs()
                       if i.name not in self.feeds and i.name not in self.gathered]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.required = (*self.inputs, *sorted(self.lookup_ids - set(self.inputs)))

    @property
    def tier(self) -> int:
        return self.plan.tier


@dataclass
class RetierResult:
    """What a :meth:`Runtime.retier` did."""

    old_tier: int
    new_tier: int
    bytes_read: int
    seconds: float
    read_seconds: float
    session_rebuilt: bool
    released_bytes: int
    plan: MemoryPlan

    def to_dict(self) -> dict[str, Any]:
        return {"old_tier": self.old_tier, "new_tier": self.new_tier,
                "bytes_read": self.bytes_read, "seconds": self.seconds,
                "read_seconds": self.read_seconds, "session_rebuilt": self.session_rebuilt,
                "released_bytes": self.released_bytes, "plan": self.plan.to_dict()}


class Runtime(Runner):
    """Serve a device package within a memory budget. A :class:`~edgestack.core.runner.Runner`
    like every target's runner: ``infer`` (timed: :attr:`last_ms`), ``release`` (=
    :meth:`close`), a context manager; it loads in its constructor.

    Args:
        package: a package path (directory or ``.tar``) or an open :class:`Package`.
        budget: bytes or a size string (``"48MB"``); or give ``profile`` or ``auto=True``;
            none of them: no limit (the largest tier).
        profile: a device profile (name or object): its ``memory_budget`` and ``threads``.
        auto: budget from live available memory and the cgroup limit (see
            :mod:`edgestack.runtime.budget`).
        tier: force a tier (must fit the budget).
        threads: ONNX Runtime intra-op threads (default: the profile's, else ORT's).
        verify: hash every file before serving (a changed byte raises
            :class:`PackageError` naming the file; nothing is served). The block file is
            streamed through the hash, not kept. Whatever this is, every block record read
            for serving (now and on a re-tier) is hash-checked before it is used
            (:meth:`Package.check_record`).
        optimization: ONNX Runtime graph optimization level: "all", "extended", "basic",
            "disable".
        spinning: "on" (ORT's default: idle pool threads spin for the next parallel op) or
            "off" (they sleep: a wake-up per op, but no CPU taken from other processes).
        engine: what runs the graphs: "onnxruntime", "openvino" (the dense graphs only: every
            layer materialised, see :mod:`edgestack.runtime.openvino`), or "auto" (default:
            the package target's, ``ort-cpu`` -> onnxruntime, ``openvino-cpu`` -> openvino).
        precision: OpenVINO's inference precision ("f32", "bf16", "f16"; None: the
            profile's precision, else OpenVINO's default: bf16 where the CPU has
            avx512_bf16 or AMX); only with the openvino engine.
        materialize: force the mode choice: how many of the largest layers (0 = every layer
            decoded on the fly), or which layers, are materialised (default: the planner's).
        form: what a materialised layer becomes: "int8", "nbits8", "fp32", or "auto" (the
            most exact form whose plan fits: see
            :func:`edgestack.runtime.plan.plan_memory`).
        prepack: ONNX Runtime's prepacking of the constant weights of the dense graphs
            (and of compiled packages): "on" (default: the fastest, see docs/runtime.md) or
            "off" (ONNX Runtime reads the weights where they are mapped; less anonymous
            memory, slower GEMMs). Budgets are planned with the costs calibrated for the
            setting. The graphs whose blocks are fed never prepack; the nbits8 graph always
            does.
        graph: force the graph: "plain" or "mixed" (default None: the plan's, see
            :attr:`MemoryPlan.graph`); the calibration uses it to measure the mixed graph
            where a plan would pick a dense one.
        watch: follow live memory (see :meth:`start_watcher`); a poll interval in seconds
            or True (1 s).
        calibrate: plan budgets with this machine's measured fixed costs
            (:func:`edgestack.runtime.calibrate.calibrate`: measured once per package and
            machine in fresh processes, a few seconds, then cached); False: the documented
            constants. Without a budget nothing is measured.

    Raises:
        BudgetError: the budget is below the smallest tier (the message gives the minimum).
        PackageError: the package is damaged or not a package. TargetError: the package's
            target is not served by this runtime.
    """

    def __init__(self, package: Any, budget: Any = None, *, profile: Any = None,
                 auto: bool = False, tier: int | None = None, threads: int | None = None,
                 verify: bool = True, optimization: str = "all",
                 materialize: int | list[str] | None = None,
                 watch: bool | float = False, calibrate: bool = True,
                 form: str = "auto", graph: str | None = None, spinning: str = "on",
                 engine: str = "auto", precision: str | None = None,
                 prepack: str = "on") -> None:
        if optimization not in LEVELS:  # before anything is opened or read
            raise TargetError(f"optimization must be one of {sorted(LEVELS)}, found "
                              f"{optimization!r}")
        if spinning not in ("on", "off"):
            raise TargetError(f"spinning must be 'on' or 'off', found {spinning!r}")
        if prepack not in ("on", "off"):
            raise TargetError(f"prepack must be 'on' or 'off', found {prepack!r}")
        if form not in ("auto", *FORMS[1:]) or graph not in (None, "plain", "mixed"):
            raise TargetError(f"form must be 'auto' or one of {', '.join(FORMS[1:])} and "
                              f"graph None, 'plain' "
                              f"or 'mixed' (the dense graphs are chosen by the plan); found "
                              f"form={form!r}, graph={graph!r}")
        fix_malloc_threshold()
        self._own = not isinstance(package, Package)
        self.package = Package.open(package) if self._own else package
        try:
            man = self.package.manifest
            if man.target not in SUPPORTED_TARGETS:
                raise TargetError(
                    f"{self.package.path}: package target {man.target!r} is not served by "
                    f"edgestack.runtime (it serves {', '.join(SUPPORTED_TARGETS)}); repack "
                    "with --target ort-cpu"
                )
            unbound = [name for name, info in man.layers.items() if info.graph is None]
            if unbound:
                raise PackageError(
                    f"{self.package.path}: BitStack layers {unbound[:5]} have no layers[].graph "
                    "(the graph inputs the runtime feeds their blocks to): the package was not "
                    "written by `edgestack pack`; repack the model with it")
            self.engine = check_engine(engine, precision, man.target)
            self.precision = precision
            if self.engine != "onnxruntime" and man.layers:
                if graph is not None or materialize not in (None, len(man.layers)):
                    raise TargetError(
                        f"OpenVINO serves the dense graphs only (every layer materialised); "
                        f"found graph={graph!r}, materialize={materialize!r}; leave them "
                        "unset or serve with engine='onnxruntime'")
                missing = [f for f in DENSE_FILES.values() if f not in man.files]
                if len(missing) == len(DENSE_FILES) or self.engine == "tensorrt":
                    raise TargetError(f"{self.package.path}: the package has no dense graph "
                                      f"({', '.join(DENSE_FILES.values())}) for OpenVINO to "
                                      "serve; repack the model with this edgestack")
                materialize = len(man.layers)
            if profile is not None:
                profile = load_profile(profile) if isinstance(profile, str) else profile
                if threads is None:
                    threads = profile.threads
                if self.engine == "openvino" and self.precision is None:
                    self.precision = PROFILE_PRECISIONS.get(profile.precision)
            self.budget, self.budget_source = resolve_budget(budget, profile=profile,
                                                             auto=auto)
            self._materialize = materialize
            self.threads = threads
            self.optimization = optimization
            self.spinning = spinning
            self._calibrate = calibrate
            self._costs: Costs | None = None
            self.form = form
            self.prepack = prepack
            self._graph_choice = graph
            if graph == "mixed" and VARIANT_FILE not in man.files:
                raise TargetError(f"{self.package.path}: the package has no mixed graph "
                                  "(an older package); repack the model")
            plan = self.plan_for(self.budget, tier=tier, budget_source=self.budget_source)
            self._verify = verify
            if verify:  # every file, graphs included (a re-tier may switch graphs later)
                self.package.verify()
            self._lock = threading.Lock()
            self._retier_lock = threading.Lock()
            self._retired: list[_State] = []
            self._stores = {name: LayerStore(info) for name, info in man.layers.items()}
            self._empty: dict[tuple[str, int], np.ndarray] = {}
            self._iov_cache: dict[tuple[str, int], list[memoryview]] = {}
            self._data_dir: str | None = None
            self._weights = self._map_tables()
            self._lookup_ids = frozenset(i for r in self._readers for i, _v in r.lookups)
            self._gathered_values = frozenset(v for r in self._readers for _i, v in r.lookups)
            self._records: dict[str, list[Any]] = {name: [] for name in man.layers}
            for rec in sorted(self.package.block_index, key=lambda r: (r.layer, r.block)):
                self._records[rec.layer].append(rec)
            self.bytes_read = 0
            self._fill(plan)
            self._state = self._make_state(plan, None)
            self.watcher: Any = None
            if watch:
                self.start_watcher(1.0 if watch is True else float(watch))
        except BaseException:
            if self._own:
                self.package.close()
            raise

    # ---- loading -------------------------------------------------------------------
    def _map_tables(self) -> dict[str, Any]:
        """Memory-map the package's lookup tables (``runtime.tables``, written by the packer;
        the manifest checked they lie in its weights file) and make OrtValues over the mapped
        bytes: ONNX Runtime reads them without a copy and the runtime can hand their pages
        back after each call. Every other weight ONNX Runtime memory-maps itself from the
        package folder."""
        import onnxruntime as ort

        pkg = self.package
        rt = pkg.manifest.runtime
        self._tables: list[tuple[Any, int, int]] = []
        self._readers: list[RowReader] = []
        if rt.gathered and rt.weights_file is not None:
            fd, base = pkg.locate(rt.weights_file)
            self._readers = [RowReader(fd, base, t) for t in rt.gathered.values()]
        if not rt.tables or rt.weights_file is None or self.engine == "openvino":
            return {}   # OpenVINO reads them from the file
        fmap = pkg.map_file(rt.weights_file)
        values: dict[str, Any] = {}
        for name, t in rt.tables.items():
            arr = lookup_table(fmap.array, t)
            if arr.ctypes.data % 64:
                arr = arr.copy()  # unaligned: one copy of this tensor (rare)
            values[name] = ort.OrtValue.ortvalue_from_numpy(arr)
            self._tables.append((fmap, t.offset, t.offset + t.bytes))
        return values

    def _drop_tables(self) -> None:
        """Hand back the resident pages of the lookup tables (read again on the next call:
        from the page cache, minor faults); keeps the plan's bound of one call's rows."""
        for fmap, start, end in self._tables:
            fmap.drop(start, end)

    def _record_iovs(self, rec: Any) -> list[memoryview]:
        """Scatter buffers for one block record's span (``[rec.span_start, rec.end)``): its
        signs/u/v rows in the layer store, and the alignment padding before the record and
        between its parts into a small buffer of the record's own (built once per record),
        so the whole span can be hashed once it is read (:meth:`Package.check_record`)."""
        iovs = self._iov_cache.get((rec.layer, rec.block))
        if iovs is None:
            st = self._stores[rec.layer]
            dests = ((rec.signs, st.signs[rec.block]), (rec.u, st.u[rec.block]),
                     (rec.v, st.v[rec.block]))
            pad = memoryview(bytearray(rec.length + rec.offset - rec.span_start
                                       - sum(d.nbytes for _o, d in dests)))
            iovs = []
            pos, used = rec.span_start, 0
            for off, dest in dests:
                if off > pos:
                    iovs.append(pad[used:used + off - pos])
                    used += off - pos
                mv = memoryview(dest).cast("B")
                iovs.append(mv)
                pos = off + len(mv)
            self._iov_cache[(rec.layer, rec.block)] = iovs
        return iovs

    def _fill(self, plan: MemoryPlan) -> int:
        """Read into the layer stores the blocks that the plan's on-the-fly layers need and
        do not hold yet (a store holds a prefix of its layer's blocks); materialised layers
        keep nothing there (see :meth:`_decode`). Records whose spans are consecutive are
        read with one ``preadv``; the bytes are counted in ``package.counter`` and
        :attr:`bytes_read`. Every record read is checked against the manifest's hash
        (:meth:`Package.check_record`) before any store counts it as loaded: on a mismatch
        the rows read are handed back and nothing changes (the stores still hold what the
        serving plan feeds).

        Raises:
            PackageError: a record's bytes changed on disk (naming the file and record).
        """
        want = []
        for lp in plan.layers:
            st = self._stores[lp.name]
            if lp.mode == "on-the-fly" and st.loaded < lp.blocks:
                want += self._records[lp.name][st.loaded:lp.blocks]
        got = 0
        run: list[Any] = []
        try:
            for rec in sorted(want, key=lambda r: r.offset) + [None]:
                if run and (rec is None or rec.span_start != run[-1].end):
                    iovs = [mv for r in run for mv in self._record_iovs(r)]
                    got += self.package.read_into(BLOCK_FILE, iovs, run[0].span_start)
                    for r in run:
                        self.package.check_record(r, self._record_iovs(r))
                    run = []
                if rec is not None:
                    run.append(rec)
        except BaseException:
            for st in self._stores.values():
                st.release_after(st.loaded)   # the rows read: not fed, not kept
            self.bytes_read += got
            raise
        for lp in plan.layers:
            st = self._stores[lp.name]
            if lp.mode == "on-the-fly":
                st.loaded = max(st.loaded, lp.blocks)
        self.bytes_read += got
        return got

    def _decode(self, name: str, nb: int, transposed: bool, flat: bool = False) -> np.ndarray:
        """A materialised layer's weight at ``nb`` blocks: from its store when it holds them
        (checked when read), else read from the block file record by record with ``pread``
        into one reused buffer, each record's span checked against the manifest's hash
        before it is decoded (a materialised layer keeps no blocks resident, and nothing of
        the file is mapped: measured on a 12-block MiniLM package, reading through a memory
        map left 5.6 MB of fault-around pages resident until the whole map was dropped).

        Raises:
            PackageError: a record's bytes changed on disk (naming the file and record).
        """
        st = self._stores[name]
        if st.loaded >= nb:
            return decode_blocks(st.info.shape, st.blocks(nb), transposed, flat)
        recs = self._records[name][:nb]
        fd, base = self.package.locate(BLOCK_FILE)
        buf = np.empty(max((r.end - r.span_start for r in recs), default=0), np.uint8)

        def blocks() -> Any:
            for r in recs:
                span = memoryview(buf)[:r.end - r.span_start]
                if os.preadv(fd, [span], base + r.span_start) != len(span):
                    raise PackageError(f"{self.package.path}: {BLOCK_FILE}: short read of "
                                       f"block {r.block} of {name}; {FIX_REPACK}")
                self.package.check_record(r, [span])
                view = self.package.view(r, buf, r.span_start)
                yield view.signs, view.u, view.v

        return decode_blocks(st.info.shape, blocks(), transposed, flat)

    # ---- sessions and states ---------------------------------------------------------
    def _graph_for(self, plan: MemoryPlan) -> str:
        """The plan's graph (:attr:`MemoryPlan.graph`), or the one forced at init."""
        return self._graph_choice or plan.graph

    def _session(self, graph: str, folder: str | None = None) -> Any:
        """An ONNX Runtime session on ``graph``, its external data in ``folder`` (default:
        :meth:`_external_data_dir`); with the openvino engine, an
        :class:`~edgestack.runtime.openvino.OpenVINOSession` on the dense ``graph`` copied
        into ``folder``."""
        pkg = self.package
        name = {"plain": pkg.graph_file, "mixed": VARIANT_FILE, **DENSE_FILES}[graph]
        if self.engine == "tensorrt":   # the compiled graph; the engine is cached beside

            build = dict(pkg.manifest.runtime.engine_build or {})
            cache = Path(f"{pkg.path}.engines")
            return TensorRTSession(pkg.read_file(name, verify=self._verify),
                                   pkg.files[name].sha256, build, cache)
        if self.engine == "openvino":   # a dense graph, in the folder beside its data
            if folder is None and not pkg.is_archive:  # the package's own (hashed at open)
                path = pkg.file_path(name)
            else:
                path = Path(folder or self._external_data_dir(), name)
                path.write_bytes(pkg.read_file(name, verify=self._verify))  # hashed while read
            return OpenVINOSession(str(path), threads=self.threads, precision=self.precision,
                                   compress=graph in ("fp32", "plain"))
        import onnxruntime as ort

        # the ort-cpu target's options (threads 0 = ORT's default; level checked in
        # __init__), plus the runtime's own: memory follows the plan
        compiled = not pkg.layers   # a compiled graph: every weight is an initializer
        so = session_options(int(self.threads or 0), self.optimization, self.spinning)
        so.enable_cpu_mem_arena = graph in DENSE_FILES or compiled   # see the module doc
        so.enable_mem_pattern = False
        # prepacking (option ``prepack``): never for fed blocks (nothing
        # to prepack); always for MatMulNBits (without, it dequantized every weight on every
        # call: GPT-2 decode 3 tokens/s)
        off = self.prepack == "off" and graph != "nbits8"
        if not (graph in DENSE_FILES or compiled) or off:
            so.add_session_config_entry("session.disable_prepacking", "1")
        disabled = list(pkg.manifest.runtime.disabled_optimizers)
        so.log_severity_level = 3
        for tname, value in self._weights.items():
            so.add_initializer(tname, value)  # no copy: ORT uses our map
        so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                    folder or self._external_data_dir())
        model = pkg.read_file(name, verify=self._verify)  # hashed while read
        try:
            return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"],
                                        **({"disabled_optimizers": disabled} if disabled
                                           else {}))
        except Exception as exc:
            raise TargetError(f"{pkg.path}: ONNX Runtime cannot load the package's graph "
                              f"{name!r} ({str(exc)[:300]}); repack the model") from None

    def _check_dense_layout(self, plan: MemoryPlan, graph: str) -> None:
        """Refuse a dense graph that reads its data file elsewhere than the manifest says the
        runtime must write each layer (``graph.site.files[graph]``): every manifest range
        lies inside one tensor the graph reads from that file, and every such tensor is
        covered by the manifest's ranges (:func:`edgestack.package.wire.external_ranges`,
        no onnx)."""

        pkg, data = self.package, DENSE_DATA[graph]
        name = DENSE_FILES[graph]
        try:
            reads = sorted((off, off + size) for loc, off, size in
                           external_ranges(pkg.read_file(name, verify=False)).values()
                           if loc == data)
        except PackageError as exc:
            raise PackageError(f"{pkg.path}: {name}: {exc}; {FIX_REPACK}") from None
        written: set[tuple[int, int]] = set()
        for lp in plan.layers:
            site = pkg.layers[lp.name].graph.site if pkg.layers[lp.name].graph else None
            if site is None or graph not in site.files:
                return  # the session's own check names the layer without a layout
            for key, value in site.files[graph].items():
                if not key.endswith("_cols") and len(value) == 2:
                    written.add((int(value[0]), int(value[0]) + int(value[1])))
        outside = [r for r in sorted(written)
                   if not any(lo <= r[0] and r[1] <= hi for lo, hi in reads)]
        covered = 0
        for lo, hi in reads:
            inside = sorted((max(a, lo), min(b, hi)) for a, b in written if a < hi and b > lo)
            end = lo
            for a, b in inside:
                if a > end:
                    break
                end = max(end, b)
            covered += end >= hi
        if outside or covered != len(reads):
            what = (f"the manifest writes bytes {list(outside[0])} the graph never reads"
                    if outside else "the graph reads bytes no layer of the manifest writes")
            raise PackageError(f"{pkg.path}: {name} disagrees with the manifest's "
                               f"graph.site.files.{graph}: {what} in {data}; nothing is "
                               f"served from it. {FIX_REPACK}")

    def _dense_session(self, plan: MemoryPlan, graph: str) -> Any:
        """A session on a dense graph (``"int8"``/``"fp32"``) for ``plan``: each layer is
        decoded, put in its form and written at its offset (``graph.site.files[graph]``) into
        the graph's data file (:data:`~edgestack.package.format.DENSE_DATA`) in a
        temporary folder beside a link (or kernel copy) of the package's weights files; ONNX
        Runtime maps that file and prepacks the weights. The folder goes once the session
        is built (its maps outlive the names). The file lives in the page cache, not in this
        process: one layer's decode temporaries are the only extra memory. The folder is
        made under ``$TMPDIR``, which should be a disk (on a tmpfs the file would be held in
        memory)."""

        pkg = self.package
        self._check_dense_layout(plan, graph)
        folder = str(atomic.temp_dir("dense"))  # removed below; after a kill, by the next run
        kind = fs_type(folder)
        if kind in MEMORY_FILESYSTEMS:
            warnings.warn(f"the runtime's {DENSE_DATA[graph]} goes to {folder}, on a "
                          f"{kind}: its bytes stay in memory (outside this "
                          "process's RSS, so outside the plan) until the session is built; "
                          "set TMPDIR to a folder on a disk", RuntimeWarning, stacklevel=3)
        try:
            src = self._external_data_dir()
            for name, entry in pkg.files.items():
                if entry.role == "weights":
                    link_or_copy(Path(src, name), Path(folder, name), entry.size)
            fd = os.open(os.path.join(folder, DENSE_DATA[graph]),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            groups: dict[int, list[Any]] = {}   # a fused int8 group's weight being filled
            try:
                for lp in plan.layers:
                    a = pkg.layers[lp.name].graph
                    site = a.site if a is not None else None
                    layout = site.files.get(graph) if site is not None else None
                    if layout is None:
                        raise PackageError(f"{pkg.path}: layer {lp.name!r} has no {graph} "
                                           f"data layout (graph.site.files.{graph}); "
                                           f"{FIX_REPACK}")
                    if graph == "int8":
                        q, scale = quantize_int8(self._decode(lp.name, lp.blocks, True))
                        arrays = {"q": q, "scale": scale}
                    elif graph == "nbits8":
                        b, sc = quantize_nbits8(self._decode(lp.name, lp.blocks, False,
                                                             flat=True))
                        arrays = {"b": b, "s": sc}
                    else:
                        arrays = {"w": self._decode(lp.name, lp.blocks, site.kind == "matmul",
                                                    flat=True)}
                    for key, arr in arrays.items():
                        cols = layout.get(f"{key}_cols", (0, 0, 0))
                        if len(layout.get(key, ())) != 2 or len(cols) != 3:
                            raise PackageError(f"{pkg.path}: layer {lp.name!r}: graph.site."
                                               f"files.{graph} has no [offset, bytes] of {key} "
                                               f"(or a malformed {key}_cols); {FIX_REPACK}")
                        offset, size = layout[key]
                        if f"{key}_cols" in layout:   # its columns of a fused group's [K, total]
                            first, end, total = cols
                            group = groups.setdefault(offset, [np.zeros(
                                (arr.shape[0], total), arr.dtype), 0])
                            if (end - first != arr.shape[1] or group[0].nbytes != size
                                    or group[0].shape[0] != arr.shape[0]):
                                raise PackageError(f"{pkg.path}: layer {lp.name!r}: graph.site."
                                                   f"files.{graph}.{key}_cols {list(cols)} do not "
                                                   f"fit its {key} {list(arr.shape)}; "
                                                   f"{FIX_REPACK}")
                            group[0][:, first:end] = arr
                            group[1] += end - first
                            if group[1] < total:
                                continue
                            arr = groups.pop(offset)[0]
                        if size != arr.nbytes:
                            raise PackageError(f"{pkg.path}: layer {lp.name!r}: graph.site."
                                               f"files.{graph}.{key} holds {size} bytes, the "
                                               f"layer's {key} has {arr.nbytes}; {FIX_REPACK}")
                        if os.pwrite(fd, memoryview(np.ascontiguousarray(arr)).cast("B"),
                                     offset) != size:
                            raise OSError(f"short write to {DENSE_DATA[graph]} in {folder}")
                    del arrays
                if groups:
                    raise PackageError(f"{pkg.path}: the {graph} graph's fused weights at "
                                       f"{sorted(groups)} miss layers; {FIX_REPACK}")
            finally:
                os.close(fd)
            return self._session(graph, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _empty_like(self, dtype: str, rank: int) -> np.ndarray:
        """A zero-size array fed to an input whose branch is not taken."""
        key = (dtype, rank)
        if key not in self._empty:
            self._empty[key] = np.zeros((0,) * rank, dtype)
        return self._empty[key]

    def _form_feeds(self, name: str, mode: str, nb: int, graph: str,
                    old: _State | None) -> dict[str, np.ndarray]:
        """What the plain or mixed ``graph`` is fed for one layer served in ``mode`` at ``nb``
        blocks (the dense graphs hold their weights: :meth:`_dense_session`)."""
        a = self.package.layers[name].graph
        assert a is not None  # checked in __init__
        st = self._stores[name]
        s, u, v = st.feeds(nb if mode == "on-the-fly" else 0)  # no rows: branch not taken
        feeds: dict[str, np.ndarray] = {a.signs: s, a.u: u, a.v: v}
        site = a.site
        if graph == "plain" or site is None:
            return feeds
        reuse = (old is not None and old.plan.modes.get(name) == mode
                 and old.plan.blocks.get(name) == nb and mode != "on-the-fly")
        feeds[site.fp32] = np.array(mode == "fp32")
        if mode == "fp32":
            feeds[site.w] = (old.feeds[site.w] if reuse and old is not None else
                             self._decode(name, nb, transposed=site.kind == "matmul",
                                          flat=site.kind != "generic"))
        else:
            rank = 2 if site.kind != "generic" else len(st.info.shape)
            feeds[site.w] = self._empty_like("float32", rank)
        if site.int8 is not None:
            feeds[site.int8] = np.array(mode == "int8")
            if mode == "int8":
                if reuse and old is not None:
                    q, scale = old.feeds[site.q], old.feeds[site.scale]
                else:
                    q, scale = quantize_int8(self._decode(name, nb, transposed=True))
                feeds.update({site.q: q, site.scale: scale})
            else:
                feeds.update({site.q: self._empty_like("int8", 2),
                              site.scale: self._empty_like("float32", 1)})
        return feeds

    def _external_data_dir(self) -> str:
        """The folder ONNX Runtime finds the weights files in: the package folder itself, or,
        for an archive, a temporary folder with the files copied out of it by the kernel
        (``os.copy_file_range``: disk and page cache, not this process's memory; removed by
        :meth:`close`, or when the runtime is collected).

        ONNX Runtime memory-maps every external tensor of a model loaded from bytes from this
        folder (only the lookup tables come from the runtime's own map through
        add_initializer, and even for those ORT checks the file exists).
        """
        if self._data_dir is None:
            pkg = self.package
            if not pkg.is_archive:
                self._data_dir = str(pkg.path)
                return self._data_dir

            folder = str(atomic.temp_dir("rt"))  # after a kill: removed by the next run
            self._data_cleanup = weakref.finalize(self, shutil.rmtree, folder, True)
            for name, entry in pkg.files.items():
                if entry.role == "weights":
                    fd, base = pkg.locate(name)
                    copy_out(fd, base, entry.size, Path(folder, name), f"{pkg.path}: {name}")
            self._data_dir = folder
        return self._data_dir

    def _make_state(self, plan: MemoryPlan, old: _State | None) -> _State:
        graph = self._graph_for(plan)
        dense = graph in DENSE_FILES   # the weights are in the session: same blocks only
        session = (old.session if old is not None and old.graph == graph and (
            not dense or old.plan.blocks == plan.blocks) else None)
        rebuilt = session is None
        if session is None:
            session = self._dense_session(plan, graph) if dense else self._session(graph)
            self._drop_tables()  # what building the session read of them
            if not dense:
                self._check_block_inputs(session, graph)
        feeds: dict[str, np.ndarray] = {}
        for lp in ([] if dense else plan.layers):
            feeds.update(self._form_feeds(lp.name, lp.mode, lp.blocks, graph, old))
        known = {i.name for i in session.get_inputs()}
        unknown = sorted(set(feeds) - known)
        if unknown:
            raise PackageError(f"{self.package.path}: the manifest's layers[].graph name "
                               f"inputs the {graph} graph does not have ({unknown[:4]}); "
                               f"{FIX_REPACK}")
        return _State(plan, session, feeds, graph, rebuilt, gathered=self._gathered_values,
                      lookup_ids=self._lookup_ids)

    def _check_block_inputs(self, session: Any, graph: str) -> None:
        """The manifest's layers agree with the graph the runtime feeds, as ONNX Runtime
        reports its inputs (the runtime reads no graph itself): each layer's ``signs``,
        ``u``, ``v`` are inputs of types uint8, float16, float16 whose first dimension is
        symbolic (the block count) and whose other dimensions are the manifest's
        ``[ceil(m*n/8)]``, ``[m, k]``, ``[k, n]``. (The dense graphs hold their weights as
        initializers, which ONNX Runtime does not list: ``edgestack verify`` checks those,
        and each ``BitStackWeight`` node's ``shape``, against the manifest with onnx:
        :func:`edgestack.packer.graphcheck.check_graphs`.)

        Raises:
            PackageError: naming the layer, the input, expected vs found.
        """
        inputs = {i.name: i for i in session.get_inputs()}
        for name, info in self.package.layers.items():
            a = info.graph
            assert a is not None  # checked in __init__
            (m, n), k = info.matrix_shape, info.rank
            for part, dtype, dims in ((a.signs, "tensor(uint8)", [info.signs_bytes]),
                                      (a.u, "tensor(float16)", [m, k]),
                                      (a.v, "tensor(float16)", [k, n])):
                got = inputs.get(part)
                shape = list(got.shape) if got is not None and got.shape is not None else None
                ok = (got is not None and got.type == dtype and shape is not None
                      and len(shape) == len(dims) + 1
                      and not isinstance(shape[0], int) and shape[1:] == dims)
                if not ok:
                    found = ("no such input" if got is None else
                             f"{got.type} {shape}")
                    raise PackageError(
                        f"{self.package.path}: layer {name!r} (shape {list(info.shape)}, rank "
                        f"{k}) does not match the {graph} graph: its input {part!r} should be "
                        f"{dtype} [blocks, {', '.join(map(str, dims))}] (the first dimension "
                        f"symbolic), found {found}; the manifest and the graph disagree: "
                        f"{FIX_REPACK}")

    # ---- serving ---------------------------------------------------------------------
    @property
    def plan(self) -> MemoryPlan:
        """The plan being served."""
        return self._state.plan

    @property
    def tier(self) -> int:
        """The tier being served."""
        return self._state.tier

    @property
    def input_names(self) -> list[str]:
        """The inputs a caller feeds (graph inputs, and the ids of pre-gathered tables)."""
        return list(self._state.required)

    @property
    def output_names(self) -> list[str]:
        return list(self._state.outputs)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[_State]:
        """Hold the serving snapshot current now (its tier, plan, session and feeds) until
        the block ends: a :meth:`retier` meanwhile swaps in a new snapshot for later calls
        and waits for this one before releasing its memory. :meth:`generate` holds one for
        a whole request (re-tiering happens between requests)."""
        with self._lock:
            st = self._state
            with st.cond:
                st.active += 1
        try:
            yield st
        finally:
            with st.cond:
                st.active -= 1
                st.cond.notify_all()

    def run_pinned(self, st: _State, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the model on the snapshot ``st`` (from :meth:`pinned`); ``{output: array}``."""
        expected = st.inputs
        missing = [n for n in st.required if n not in feeds]
        if missing or len(feeds) != len(st.required):
            extra = [n for n in feeds if n not in st.required]
            raise TargetError(f"infer: expected inputs {sorted(st.required)}"
                              f", missing {missing}, unknown {extra}")
        run_feeds = {**{k: np.asarray(v) for k, v in feeds.items() if k in expected},
                     **st.feeds}
        distinct = {}   # ids input -> its distinct values, once per call for every table
        for reader in self._readers:
            for ids, value in reader.lookups:
                if ids not in distinct:
                    distinct[ids] = np.unique(np.asarray(feeds[ids]).reshape(-1),
                                              return_inverse=True)
                run_feeds[value] = reader.rows(feeds[ids], ids, distinct[ids])
        try:
            outs = st.session.run(None, run_feeds)
        except Exception as exc:  # wrong shapes/dtypes from the caller
            raise TargetError(f"infer: ONNX Runtime refused the inputs: "
                              f"{str(exc)[:300]}") from None
        finally:
            self._drop_tables()
        return dict(zip(st.outputs, outs, strict=True))

    def infer_with_tier(self, feeds: Mapping[str, Any]) -> tuple[int, dict[str, np.ndarray]]:
        """Run the model; ``(tier used, {output name: array})``."""
        with self.pinned() as st:
            return st.tier, self.run_pinned(st, feeds)

    def generate(self, input_ids: Any, max_new_tokens: int, **options: Any) -> Generation:
        """Generate text tokens with the KV cache, on the tier current at the start (the
        whole request: a concurrent :meth:`retier` does not change its tokens). A decoder
        package only; see :func:`edgestack.runtime.generate.generate` for the options
        (``attention_mask``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``,
        ``stream``) and the errors."""
        return generate(self, input_ids, max_new_tokens, **options)

    def generate_iter(self, input_ids: Any, max_new_tokens: int,
                      **options: Any) -> Iterator[np.ndarray]:
        """:meth:`generate` as an iterator of each step's int64 ``[batch]`` tokens (the
        tier is held until it is exhausted or closed); see
        :func:`edgestack.runtime.generate.generate_iter`."""
        return generate_iter(self, input_ids, max_new_tokens, **options)

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the model on ``feeds`` (graph input name -> array) at the current tier;
        :attr:`last_ms` is the call's wall time."""
        t0 = time.perf_counter()
        out = self.infer_with_tier(feeds)[1]
        self.last_ms = (time.perf_counter() - t0) * 1e3
        return out

    def plan_for(self, budget: int | None, *, tier: int | None = None,
                 budget_source: str = "", prefer: frozenset[str] | None = None) -> MemoryPlan:
        """The plan this runtime would serve for ``budget`` (bytes): :func:`plan_memory`
        with the runtime's own settings (its forced ``materialize``). Loads nothing.

        Raises:
            BudgetError: the budget is below the smallest tier, or a forced ``tier`` does
                not fit.
        """
        return plan_memory(self.package.manifest, budget, tier=tier,
                           budget_source=budget_source, prefer=prefer,
                           materialize=self._materialize, form=self.form,
                           costs=self.costs if budget is not None else DEFAULT_COSTS,
                           dense=self.engine == "openvino")

    @property
    def costs(self) -> Costs:
        """The fixed costs budgets are planned with: this machine's, measured once and
        cached (:mod:`edgestack.runtime.calibrate`), or the documented constants when the
        runtime was made with ``calibrate=False``."""
        if self._costs is None:
            self._costs = (calibrate_costs(self.package, threads=self.threads,
                                           optimization=self.optimization,
                                           engine=self.engine, precision=self.precision,
                                           prepack=self.prepack)
                           if self._calibrate else DEFAULT_COSTS)
        return self._costs

    def retier(self, budget: Any = None, *, tier: int | None = None, profile: Any = None,
               auto: bool = False) -> RetierResult:
        """Grow or shrink to the plan for a new budget (or a forced ``tier``) while serving.

        Growing reads only the block records that the new plan's on-the-fly layers add
        (materialised layers read their records with ``pread`` and keep no blocks; a dense
        plan whose blocks change builds a new session);
        rows no longer needed are released once calls that started on the old plan have
        finished. In-flight calls
        finish on their tier. A budget below the smallest tier raises :class:`BudgetError`
        and keeps the current tier.

        Every block record read is hash-checked before it is used: a record changed on disk
        since packing raises :class:`PackageError` naming the file and the record, the
        re-tier is refused as a whole (what it read is handed back) and the current tier is
        still served, untouched.
        """
        with self._retier_lock:
            t0 = time.perf_counter()
            if budget is None and profile is None and not auto:
                new_budget, source = self.budget, self.budget_source
            else:
                new_budget, source = resolve_budget(budget, profile=profile, auto=auto)
            old = self._state
            old_tier = old.tier
            plan = self.plan_for(new_budget, tier=tier, budget_source=source,
                                 prefer=old.plan.materialized)
            tr = time.perf_counter()
            try:   # refused as a whole: the old tier is served, its rows untouched
                read = self._fill(plan)
                read_s = time.perf_counter() - tr
                new = self._make_state(plan, old)
            except PackageError as exc:
                self._keep_only(old.plan)
                raise PackageError(f"{exc}; the re-tier to tier {plan.tier} was refused and "
                                   f"tier {old_tier} is still served") from None
            except BaseException:
                self._keep_only(old.plan)
                raise
            with self._lock:
                self._state = new
                self.budget, self.budget_source = new_budget, source
            self._retired.append(old)
            released = 0
            keep = {lp.name: lp.blocks if lp.mode == "on-the-fly" else 0 for lp in plan.layers}
            if plan.tier < old.tier or any(self._stores[n].loaded > nb for n, nb in keep.items()):
                for st_old in self._retired:
                    with st_old.cond:
                        st_old.cond.wait_for(lambda s=st_old: s.active == 0)
                self._retired.clear()
                for name, nb in keep.items():
                    released += self._stores[name].release_after(nb)
                del old               # the last reference to the old tier's dense weights
                trim_heap()
            else:
                self._retired = [s for s in self._retired if s.active > 0]
            return RetierResult(old_tier, plan.tier, read, time.perf_counter() - t0, read_s,
                                new.rebuilt, released, plan)

    def _keep_only(self, plan: MemoryPlan) -> None:
        """Hand back the store rows beyond what ``plan`` (being served) feeds: after a
        refused re-tier, what it read for the new plan."""
        for lp in plan.layers:
            self._stores[lp.name].release_after(lp.blocks if lp.mode == "on-the-fly" else 0)

    # ---- self-test, watcher, closing ---------------------------------------------------
    def self_test(self) -> dict[str, Any]:
        """Run the golden inputs and compare with the golden outputs
        (:func:`edgestack.core.compare.agree`, the rule export and target parity use, with
        the package's atol/rtol). Judged at the golden
        tier with exact forms only (on the fly or fp32, in float32); at another tier, with
        quantized layers (int8, nbits8: their rounding is not in the golden outputs) or with
        OpenVINO in bf16/f16, the result is reported but not judged (``passed`` None,
        ``reason`` says why)."""
        info = self.package.golden_info
        if info is None:
            return {"ran": False, "passed": None, "reason": "the package has no golden data"}
        inputs, outputs = self.package.golden()
        tier, got = self.infer_with_tier(inputs)
        worst = {}
        passed = True
        for name, ref in outputs.items():
            if name not in got:  # same keys as a compared output, so callers need no case
                passed = False
                worst[name] = {"max_abs": None, "max_rel": None, "ok": False, "missing": True}
                continue
            r = agree(got[name], ref, info.atol, info.rtol)
            ok = r.passed
            worst[name] = {"max_abs": r.max_abs, "max_rel": r.max_rel, "ok": ok,
                           "missing": False}
            passed &= ok
        quantized = [m for m in self._state.plan.modes.values() if m in QUANTIZED_FORMS]
        rounded = self.engine == "openvino" and self.precision != "f32"  # its default: bf16
        # where the CPU has it
        judged = tier == info.tier and not quantized and not rounded
        reason = ("" if judged else f"tier {tier} is not the golden tier {info.tier}"
                  if tier != info.tier else f"{len(quantized)} layers are served as "
                  f"{'/'.join(sorted(set(quantized)))}" if quantized else
                  f"OpenVINO computes in {self.precision or 'its default precision'}")
        return {"ran": True, "tier": tier, "golden_tier": info.tier, "judged": judged,
                "reason": reason,
                "passed": passed if judged else None, "outputs": worst,
                "rtol": info.rtol, "atol": info.atol}

    def start_watcher(self, interval: float = 1.0) -> Any:
        """Follow live memory: every ``interval`` s re-plan for the available memory
        (:func:`~edgestack.runtime.budget.available_memory` plus what this runtime's plan
        already holds) and re-tier when the planned tier changes."""

        if self.watcher is None:
            self.watcher = Watcher(self, interval)
            self.watcher.start()
        return self.watcher

    def close(self) -> None:
        """Stop the watcher and close the package (arrays are freed with the runtime)."""
        if getattr(self, "watcher", None) is not None:
            self.watcher.stop()
            self.watcher = None
        if self._own:
            self.package.close()
        if getattr(self, "_data_cleanup", None) is not None:
            self._data_cleanup()

    def release(self) -> None:
        """:meth:`close` (the :class:`~edgestack.core.runner.Runner` interface)."""
        self.close()

    def __repr__(self) -> str:
        return (f"Runtime({str(self.package.path)!r}, tier={self.tier}, "
                f"plan={self.plan.total / 2**20:.1f} MiB)")


__all__ = ["Runtime", "RetierResult", "SUPPORTED_TARGETS"]
