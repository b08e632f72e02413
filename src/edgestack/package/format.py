"""Device package format, schema version 2: the manifest's types, its parser and the block
layout. The spec is docs/package.md (files and roles, name rules, manifest keys, the
packer-runtime contract, block records and their hashes, tiers, golden data, JSON limits);
this module implements it, and the constants below are its numbers.

A manifest stores only what cannot be derived: :class:`Manifest` computes every block
record's offsets (:func:`layout_records`), each layer's part sizes and the tiers' bytes
(:func:`derive_tiers`) once when it is parsed. Every refusal names the source, the key
path, what was expected and what was found, and the fix (:class:`_Parser`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from edgestack import __version__
from edgestack.core.decoding import DecoderContract
from edgestack.errors import FormatError, PackageError
from edgestack.formats.int8 import NBITS_BLOCK  # the nbits8 form's block size (spec)

FORMAT_MAGIC = "edgestack-package"
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (2,)

MANIFEST_NAME = "manifest.json"
BLOCK_FILE = "blocks.bin"
GOLDEN_INPUTS = "golden/inputs.npz"
GOLDEN_OUTPUTS = "golden/outputs.npz"
ARCHIVE_SUFFIX = ".tar"
SUPPORTED_TARGETS = ("ort-cpu", "ort-arm", "openvino-cpu", "tensorrt-gpu")
"""Targets a device package can be made for: the runtime serves ``ort-cpu`` (x86) and
``ort-arm`` (aarch64) packages with ONNX Runtime, ``openvino-cpu`` packages with OpenVINO
(the same files; the target names the default engine, see :mod:`edgestack.runtime.openvino`,
and the machine it is meant for) and ``tensorrt-gpu`` packages with a TensorRT engine built
from the package's graph on first use (:mod:`edgestack.runtime.tensorrt`)."""
TIERED_TARGETS = ("ort-cpu", "ort-arm", "openvino-cpu")
"""Targets whose packages may hold BitStack tiers (the others hold one dense tier: a compiled
graph with every layer materialised)."""

# graph variants the packer writes beside the plain graph (see edgestack.packer.variants)
FORMS = ("on-the-fly", "int8", "nbits8", "fp32")
"""How a BitStack layer is served (see :mod:`edgestack.packer.variants`): decoded by ONNX
Runtime on every call, or materialised once per tier as int8 (1 byte a weight, integer
kernels), 8-bit weight-only MatMulNBits (1.16 bytes a weight, every layer at once) or float32
(4 bytes a weight, the tier's exact weight)."""
SITE_KINDS = ("matmul", "gemm", "generic")
"""How a layer's decoded weight is used in the graph (:class:`Site`); a ``generic`` site has no
int8 form."""
VARIANT_FILE = "model.mixed.onnx"
INT8_FILE = "model.int8.onnx"
FP32_FILE = "model.fp32.onnx"
NBITS8_FILE = "model.nbits8.onnx"
DENSE_FILES = {"int8": INT8_FILE, "nbits8": NBITS8_FILE, "fp32": FP32_FILE}
"""The dense variants: every layer in one form, no ``If``
(see :func:`edgestack.packer.variants.dense_graph`)."""

DENSE_DATA = {"int8": "int8.bin", "nbits8": "nbits8.bin", "fp32": "fp32.bin"}
"""The external-data file each dense graph reads its site tensors from. The runtime writes it
for the plan it serves, in a folder of its own, at the offsets the packer recorded in
``Site.files[form]`` (see :func:`edgestack.packer.variants.dense_graph`)."""


DENSE_ALIGN = 4096
"""Alignment of every tensor in a dense data file (a page: ONNX Runtime maps each tensor on
its own, and no two tensors share a page)."""

BLOCK_ALIGN = 64
#: Factor dtype name in the manifest -> the numpy dtype of its stored (little-endian) bytes.
FACTOR_DTYPES: Mapping[str, str] = MappingProxyType({"float16": "<f2"})

#: role -> meaning. Roles in LOADED_ROLES count towards every tier's ``total_bytes``.
FILE_ROLES: Mapping[str, str] = MappingProxyType(
    {
        "graph": "the model graph (exactly one per package)",
        "variant": "another form of the graph over the same weights, loaded instead of it "
                   "when a plan needs it (e.g. model.mixed.onnx)",
        "weights": "weight files the graph loads (e.g. ONNX external data)",
        "blocks": "the BitStack block file, always named blocks.bin",
        "golden": "golden inputs/outputs for the on-device self-test (.npz)",
        "tokenizer": "a decoder's tokenizer (tokenizer.json and its configs, under "
                     "tokenizer/): read by `edgestack run --prompt`, never by the graph",
        "aux": "anything else (reports, licenses); never loaded by the runtime",
    }
)
LOADED_ROLES = ("graph", "weights")

MAX_MANIFEST_BYTES = 16 * 2**20
MAX_INT = 2**53
MAX_FILES = 10_000
MAX_LAYERS = 100_000
MAX_BLOCKS = 2**20
MAX_TIERS = 1_024
MAX_DIMS = 8
MAX_ITEMS = 10_000
MAX_STRING = 4_096
MAX_PATH_CHARS = 255
MAX_COMPONENT_CHARS = 128
MAX_PATH_DEPTH = 8
MAX_JSON_DEPTH = 64
MAX_ARCHIVE_MEMBERS = MAX_FILES + 1_000

_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")

_FIX_MANIFEST = (
    "the manifest is damaged or was not written by edgestack's PackageWriter: re-copy the "
    "package from its source, or repack the model"
)


def align_up(value: int, align: int = BLOCK_ALIGN) -> int:
    """Smallest multiple of ``align`` that is ``>= value``."""
    return -(-value // align) * align


def describe(value: Any) -> str:
    """Short ``repr`` of a found value for error messages (with its JSON type)."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return f"{text} ({kind.get(type(value), type(value).__name__)})"


def check_path(name: Any, where: str) -> str:
    """Check a package-relative file name; return it.

    Raises:
        PackageError: the name is not a string, is absolute, contains ``..``, a backslash,
            an empty or hidden component, a character outside ``[A-Za-z0-9._-]``, or is too
            long or too deep.
    """
    if not isinstance(name, str):
        raise PackageError(f"{where}: expected a file name (string), found {describe(name)}")
    parts = name.split("/")
    bad = [p for p in parts if len(p) > MAX_COMPONENT_CHARS or not _COMPONENT.fullmatch(p)]
    problem = (
        "it is empty" if not name
        else f"it is {len(name)} characters long (at most {MAX_PATH_CHARS})"
        if len(name) > MAX_PATH_CHARS
        else "it is absolute" if name.startswith("/")
        else "it contains '..'" if ".." in parts
        else f"it has {len(parts)} components (at most {MAX_PATH_DEPTH})"
        if len(parts) > MAX_PATH_DEPTH
        else f"component {bad[0][:20]!r}... is longer than {MAX_COMPONENT_CHARS}"
        if bad and len(bad[0]) > MAX_COMPONENT_CHARS
        else f"component {bad[0]!r} is empty, starts with '.' or '-', or has a character "
        "outside [A-Za-z0-9._-]" if bad
        else "")
    if problem:
        raise PackageError(
            f"{where}: file name {name[:80]!r} is not allowed: {problem}. Package files are "
            "relative paths of [A-Za-z0-9._-] components separated by '/' that stay inside the "
            "package; rename the file"
        )
    return name


def check_names(names: Iterable[str], where: str) -> None:
    """Refuse names equal up to case, and names used both as a file and as a directory."""
    folded: dict[str, str] = {}
    for name in names:
        key = name.casefold()
        if key in folded:
            raise PackageError(
                f"{where}: files {folded[key]!r} and {name!r} differ only in case (or are "
                "listed twice); they would collide on case-insensitive file systems: rename one"
            )
        folded[key] = name
    for key, name in folded.items():
        parts = key.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in folded:
                raise PackageError(
                    f"{where}: {folded[parent]!r} is a file but also a directory of {name!r}: "
                    "rename one of them"
                )


# --------------------------------------------------------------------------------------
# The manifest's types. Field metadata are the checks a reader makes (see _Parser.load):
# key (the field is the mapping key), json (the JSON key, when not the field name),
# lo/hi (integer bounds), min/max (item counts), item (checks of each item),
# choices, pattern, nonempty (strings). Fields with a default may be absent; omit_none: a None
# value is not written (an optional field added later keeps older packages byte-identical).
# --------------------------------------------------------------------------------------


def _f(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
       **checks: Any) -> Any:
    return field(default=default, default_factory=factory, metadata=checks)


def _derived() -> Any:
    return field(init=False, repr=False, compare=False)


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.metadata.get("json", f.name): _to_json(getattr(value, f.name))
                for f in dataclasses.fields(value) if f.init and not f.metadata.get("key")
                and not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


class _Stored:
    """A part of the manifest; :meth:`to_dict` is its JSON (stored fields only)."""

    def to_dict(self) -> dict[str, Any]:
        return _to_json(self)


@dataclass(frozen=True)
class FileEntry(_Stored):
    """One listed file: relative ``name``, ``size`` in bytes, ``sha256`` hex, ``role``."""

    name: str = _f(key=True)
    size: int = _f()
    sha256: str = _f(pattern=_SHA256, what="64 lowercase hex digits")
    role: str = _f(choices=FILE_ROLES)


@dataclass(frozen=True)
class Site(_Stored):
    """A BitStack layer's site in the mixed graph (see :mod:`edgestack.packer.variants`):
    how its weight is used (``kind``), the prefix of its inputs, and per dense form where
    its tensors go in that form's data file (``files[form][tensor]`` = ``[offset, bytes]``;
    a fused int8 layer's ``q_cols`` = ``[first, end, total]``)."""

    kind: str = _f(choices=SITE_KINDS)
    prefix: str = _f(nonempty=True)
    files: Mapping[str, Mapping[str, tuple[int, ...]]] = _f(factory=dict, item={"item": {
        "max": 3}})

    # the site's graph inputs (derived): the flags that select the float32 and int8
    # branches (a generic site has no int8 one: None), the float32 weight, the int8 weight
    # and its per-channel scales
    fp32 = property(lambda self: f"{self.prefix}.fp32")
    int8 = property(lambda self: None if self.kind == "generic" else f"{self.prefix}.int8")
    w = property(lambda self: f"{self.prefix}.w")
    q = property(lambda self: f"{self.prefix}.q")
    scale = property(lambda self: f"{self.prefix}.scale")


@dataclass(frozen=True)
class LayerGraph(_Stored):
    """How a BitStack layer appears in the package's graphs (the packer-runtime contract):
    its ``BitStackWeight`` node, the three graph inputs the runtime feeds its blocks to, the
    decoded weight's value, the torch module it came from, and its :class:`Site`."""

    node: str = _f(nonempty=True)
    signs: str = _f(nonempty=True)
    u: str = _f(nonempty=True)
    v: str = _f(nonempty=True)
    output: str = _f(nonempty=True)
    torch_layer: str = _f("")
    site: Site | None = _f(None)


@dataclass(frozen=True)
class LayerInfo(_Stored):
    """A BitStack layer in the block file (what the runtime needs to slice its blocks)."""

    name: str = _f(key=True)
    shape: tuple[int, ...] = _f(min=2, max=MAX_DIMS, item={"lo": 1})
    rank: int = _f(lo=1)
    n_blocks: int = _f(lo=1, hi=MAX_BLOCKS)
    dtype: str = _f("float16", choices=FACTOR_DTYPES)
    graph: LayerGraph | None = _f(None)

    # Derived sizes are computed once per (frozen) layer: the planner reads them on every
    # re-tier. cached_property stores into the instance __dict__, which frozen allows.
    @functools.cached_property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)``: the weight viewed as a matrix."""
        return self.shape[0], math.prod(self.shape[1:])

    @functools.cached_property
    def part_bytes(self) -> tuple[int, int, int]:
        """Bytes of one block's signs (a bit a weight), u (``[m, k]``) and v (``[k, n]``)."""
        (m, n), item = self.matrix_shape, int(FACTOR_DTYPES[self.dtype][-1])
        return (m * n + 7) // 8, item * m * self.rank, item * self.rank * n

    signs_bytes = property(lambda self: self.part_bytes[0])
    u_bytes = property(lambda self: self.part_bytes[1])
    v_bytes = property(lambda self: self.part_bytes[2])


@dataclass(frozen=True)
class BlockRecord:
    """One block's record in the block file (absolute byte offsets; derived), with where its
    span starts (``span_start``: the previous record's end, 0 for the first; the span is
    ``[span_start, end)``) and the span's sha256 (the manifest's ``block_sha256``; ``""``
    while a writer lays records out)."""

    layer: str
    block: int
    offset: int
    length: int
    signs: int
    u: int
    v: int
    span_start: int = 0
    sha256: str = ""

    @property
    def end(self) -> int:
        """Offset one past the record's last byte."""
        return self.offset + self.length


@dataclass(frozen=True)
class Tier:
    """A memory tier (derived): the first ``n_records`` block records, block-file bytes
    ``[0, bytes)``, ``blocks`` of each layer; ``total_bytes`` adds the graph and weights."""

    index: int
    blocks: Mapping[str, int]
    bytes: int
    total_bytes: int

    @property
    def n_records(self) -> int:
        """How many records of the block file the tier loads."""
        return sum(self.blocks.values())


@dataclass(frozen=True)
class Golden(_Stored):
    """Golden self-test data: two npz file names, the tier that made them, tolerances."""

    inputs: str = _f()
    outputs: str = _f()
    tier: int = _f()
    rtol: float = _f()
    atol: float = _f()


@dataclass(frozen=True)
class ModelInfo(_Stored):
    """Where the packed model came from."""

    name: str = _f(nonempty=True)
    source: str = _f("")
    method: str = _f("")


@dataclass(frozen=True)
class Table(_Stored):
    """A lookup table (embedding) in the weights file: ``shape`` rows of ``dtype`` at
    ``offset``; ``lookups``: ``(ids input, value)`` pairs the runtime gathers itself."""

    offset: int = _f()
    shape: tuple[int, ...] = _f(min=1, max=MAX_DIMS, item={"lo": 1})
    dtype: str = _f(nonempty=True)
    lookups: tuple[tuple[str, str], ...] = _f((), max=MAX_ITEMS)

    @property
    def bytes(self) -> int:
        """The table's size in bytes (derived)."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class DecoderInfo(_Stored):
    """A text-generation package (a decoder exported with a KV cache): its I/O
    ``contract`` (the JSON object of :class:`edgestack.core.decoding.DecoderContract`,
    checked by it), the largest context (prompt + new tokens) and batch the memory plan
    covers, the most prompt tokens one prefill call feeds, and its tokenizer files (role
    ``tokenizer``; empty: token ids only)."""

    contract: Mapping[str, Any] = _f()
    max_context: int = _f(lo=1)
    prefill_chunk: int = _f(lo=1)
    max_batch: int = _f(1, lo=1)
    tokenizer: tuple[str, ...] = _f((), max=16)

    def __post_init__(self) -> None:
        try:
            self.decoder_contract()
        except FormatError as exc:
            raise PackageError(f"runtime.decoder.contract: {exc}") from None
        if self.prefill_chunk > self.max_context:
            raise PackageError(f"runtime.decoder.prefill_chunk: expected at most max_context "
                               f"({self.max_context}), found {self.prefill_chunk}")

    def decoder_contract(self) -> DecoderContract:
        """The contract as a :class:`~edgestack.core.decoding.DecoderContract`."""
        return DecoderContract.from_json(json.dumps(dict(self.contract)))

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes of one token of one sequence (derived from the contract)."""
        return self.decoder_contract().cache_bytes_per_token()


@dataclass(frozen=True)
class RuntimeInfo(_Stored):
    """What the memory planner and the runtime need without parsing the graph: the peak of
    live activations for ``input_shapes``, the weights file and its lookup tables (mapped:
    ``tables``; read row by row: ``gathered``), the largest integer input (``rows_per_call``),
    and how the block order and tiers were chosen. A compiled package adds the ONNX Runtime
    optimizers its session turns off (``disabled_optimizers``, the ort-cpu target's tuning)
    and, for ``tensorrt-gpu``, the engine build settings the device builds it with
    (``engine_build``; :mod:`edgestack.runtime.tensorrt`)."""

    activation_bytes: int = _f(0)
    input_shapes: Mapping[str, tuple[int, ...]] = _f(factory=dict, max=MAX_ITEMS,
                                                     item={"max": MAX_DIMS})
    weights_file: str | None = _f(None)
    order_source: str = _f("")
    steps_per_level: int = _f(0)
    rows_per_call: int = _f(0)
    tables: Mapping[str, Table] = _f(factory=dict, max=MAX_ITEMS)
    gathered: Mapping[str, Table] = _f(factory=dict, max=MAX_ITEMS)
    disabled_optimizers: tuple[str, ...] = _f(factory=tuple, max=MAX_ITEMS)
    engine_build: Mapping[str, Any] | None = _f(None)
    decoder: DecoderInfo | None = _f(None, omit_none=True)   # absent: not a decoder


def layout_records(
    layers: Mapping[str, LayerInfo], order: Sequence[tuple[str, int]],
    digests: Sequence[str] = (),
) -> list[BlockRecord]:
    """Block records for blocks stored in ``order`` (``(layer, block)`` pairs), with their
    spans' sha256 ``digests`` when given (one per record, in order).

    Raises:
        PackageError: ``order`` names an unknown layer, skips or repeats a block, or lists a
            layer's blocks out of their 0, 1, 2, ... order.
    """
    nxt = dict.fromkeys(layers, 0)
    records: list[BlockRecord] = []
    pos = 0
    for i, item in enumerate(order):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise PackageError(f"order[{i}]: expected a (layer, block) pair, found "
                               f"{describe(item)}")
        name, block = item
        if name not in layers:
            raise PackageError(f"order[{i}]: unknown layer {describe(name)}; layers are "
                               f"{', '.join(map(repr, list(layers)[:10]))}")
        info = layers[name]
        if isinstance(block, bool) or not isinstance(block, int) or block != nxt[name]:
            raise PackageError(
                f"order[{i}]: expected block {nxt[name]} of layer {name!r} (a layer's blocks "
                f"are stored in the order 0, 1, 2, ...), found {describe(block)}")
        if block >= info.n_blocks:
            raise PackageError(f"order[{i}]: layer {name!r} has {info.n_blocks} blocks, found "
                               f"block {block}")
        nxt[name] += 1
        start = align_up(pos)
        u = align_up(start + info.signs_bytes)
        v = align_up(u + info.u_bytes)
        records.append(BlockRecord(name, block, start, v + info.v_bytes - start, start, u, v,
                                   pos, digests[i] if digests else ""))
        pos = v + info.v_bytes
    missing = [f"{n!r}: {nxt[n]} of {info.n_blocks}" for n, info in layers.items()
               if nxt[n] != info.n_blocks]
    if missing:
        raise PackageError(
            f"order: every block of every layer must be stored once; missing blocks "
            f"({'; '.join(missing[:5])}): add the missing blocks to the order")
    return records


def derive_tiers(layers: Iterable[str], records: Sequence[BlockRecord],
                 counts: Sequence[int], loaded: int) -> tuple[Tier, ...]:
    """The tiers loading the first ``counts[t]`` records each (``loaded``: bytes of the
    graph and weights files), checked: counts strictly grow, the first tier holds a block
    of every layer, the last every record (``[0]`` without records).

    Raises:
        PackageError: naming the tier, expected vs found.
    """
    if not records:
        if list(counts) != [0]:
            raise PackageError(f"tiers: a package without BitStack layers has the one tier "
                               f"[0], found {describe(list(counts))}")
        return (Tier(0, MappingProxyType({}), 0, loaded),)
    running = dict.fromkeys(layers, 0)
    tiers = []
    pos = 0
    for i, count in enumerate(counts):
        if not pos < count <= len(records):
            raise PackageError(
                f"tiers[{i}]: expected a record count in [{pos + 1}, {len(records)}] (tiers "
                f"list record counts, smallest first, each larger), found {count}")
        for rec in records[pos:count]:
            running[rec.layer] += 1
        pos = count
        empty = [name for name, n in running.items() if n == 0]
        if empty:
            raise PackageError(
                f"tiers[{i}]: the first {count} records hold no block of layers {empty[:5]}; "
                "every tier needs block 0 of every layer: make the tier larger, or store every "
                "layer's block 0 earlier")
        end = records[count - 1].end
        tiers.append(Tier(i, MappingProxyType(dict(running)), end, end + loaded))
    if pos != len(records):
        raise PackageError(f"tiers[{len(counts) - 1}]: the last tier must hold every block "
                           f"record ({len(records)}), found {pos}")
    return tuple(tiers)


# --------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Manifest(_Stored):
    """A validated manifest (see the module docstring for the meaning of fields).

    Stored fields are what ``manifest.json`` holds; ``block_index`` and ``tiers`` are derived
    on construction, which also checks everything one manifest must agree with itself on.

    Raises:
        PackageError: ``"<key path>: <what>, expected vs found"``.
    """

    schema_version: int = _f(SCHEMA_VERSION)
    edgestack_version: str = _f()
    created: str = _f()
    model: ModelInfo = _f()
    target: str = _f(nonempty=True)
    files: Mapping[str, FileEntry] = _f(max=MAX_FILES)
    layers: Mapping[str, LayerInfo] = _f(max=MAX_LAYERS)
    order: tuple[str, ...] = _f(max=MAX_BLOCKS)
    block_sha256: tuple[str, ...] = _f((), max=MAX_BLOCKS, item={
        "pattern": _SHA256, "what": "64 lowercase hex digits"})
    tier_records: tuple[int, ...] = _f(json="tiers", min=1, max=MAX_TIERS)
    golden: Golden | None = _f()
    runtime: RuntimeInfo = _f(factory=RuntimeInfo)
    metadata: Mapping[str, Any] = _f(factory=dict)
    block_index: tuple[BlockRecord, ...] = _derived()
    tiers: tuple[Tier, ...] = _derived()

    def __post_init__(self) -> None:
        files = self.files
        for name, entry in files.items():
            check_path(name, f"files[{name[:80]!r}]")
            if name == MANIFEST_NAME:
                raise PackageError(f"files: {MANIFEST_NAME} must not list itself")
            if (entry.role == "blocks") != (name == BLOCK_FILE):
                raise PackageError(f"files[{name!r}].role: role 'blocks' belongs to "
                                   f"{BLOCK_FILE!r} only, found role {entry.role!r}")
        check_names(files, "files")
        graphs = [n for n, e in files.items() if e.role == "graph"]
        if len(graphs) != 1:
            raise PackageError(f"files: expected exactly one file with role 'graph', found "
                               f"{len(graphs)} {', '.join(map(repr, graphs[:5]))}")
        if bool(self.layers) != (BLOCK_FILE in files):
            raise PackageError(f"files: expected {BLOCK_FILE!r} exactly when there are BitStack "
                               f"layers; found {len(self.layers)} layers and "
                               f"{'a' if BLOCK_FILE in files else 'no'} {BLOCK_FILE!r}")
        seen: dict[str, int] = {}
        pairs = []
        for name in self.order:
            pairs.append((name, seen.get(name, 0)))
            seen[name] = pairs[-1][1] + 1
        digests = self.block_sha256
        records = layout_records(self.layers, pairs,
                                 digests if len(digests) == len(pairs) else ())
        if records and records[-1].end != files[BLOCK_FILE].size:
            raise PackageError(f"files[{BLOCK_FILE!r}].size: expected {records[-1].end} (the "
                               f"end of the last block record), found {files[BLOCK_FILE].size}")
        if len(self.block_sha256) != len(records):
            raise PackageError(
                f"block_sha256: expected {len(records)} digests (one per block record, in "
                f"storage order), found {len(self.block_sha256)}"
                + ("; the package was written before block records were hashed: repack it"
                   if not self.block_sha256 else ""))
        loaded = sum(e.size for e in files.values() if e.role in LOADED_ROLES)
        tiers = derive_tiers(self.layers, records, self.tier_records, loaded)
        golden = self.golden
        if golden is not None:
            for key in ("inputs", "outputs"):
                entry = files.get(getattr(golden, key))
                if entry is None or entry.role != "golden":
                    raise PackageError(f"golden.{key}: expected a file with role 'golden', "
                                       f"found {describe(getattr(golden, key))}")
            if golden.tier >= len(tiers):
                raise PackageError(f"golden.tier: expected a tier in [0, {len(tiers) - 1}], "
                                   f"found {golden.tier}")
        self._check_runtime()
        object.__setattr__(self, "block_index", tuple(records))
        object.__setattr__(self, "tiers", tiers)

    def _check_runtime(self) -> None:
        rt = self.runtime
        wfile = self.files.get(rt.weights_file) if rt.weights_file is not None else None
        if rt.weights_file is not None and (wfile is None or wfile.role != "weights"):
            raise PackageError(f"runtime.weights_file: expected a file with role 'weights', "
                               f"found {describe(rt.weights_file)}")
        if rt.decoder is not None:
            for i, name in enumerate(rt.decoder.tokenizer):
                entry = self.files.get(name)
                if entry is None or entry.role != "tokenizer":
                    raise PackageError(f"runtime.decoder.tokenizer[{i}]: expected a file with "
                                       f"role 'tokenizer', found {describe(name)}")
        for key in ("tables", "gathered"):
            for name, table in getattr(rt, key).items():
                where = f"runtime.{key}[{name[:80]!r}]"
                try:
                    kind = np.dtype(table.dtype).kind
                except Exception:  # numpy's dtype parser raises several types
                    kind = ""
                if kind not in ("b", "i", "u", "f"):
                    raise PackageError(f"{where}.dtype: expected a numpy dtype of numbers "
                                       f"(e.g. '<f4', '|i1'), found {describe(table.dtype)}")
                size = wfile.size if wfile is not None else 0
                if table.offset + table.bytes > size:
                    raise PackageError(
                        f"{where}: expected a table inside the weights file "
                        f"({describe(rt.weights_file)}, {size} bytes), found bytes "
                        f"[{table.offset}, {table.offset + table.bytes})")

    def to_dict(self) -> dict[str, Any]:
        """The manifest as the JSON object stored in ``manifest.json``."""
        return {"format": FORMAT_MAGIC, **_to_json(self)}

    def to_json_bytes(self) -> bytes:
        """Canonical ``manifest.json`` bytes: ASCII JSON, one-space indent, containers whose
        compact form fits in 100 characters on one line, final newline."""
        return (_dump(self.to_dict(), 0) + "\n").encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "package") -> Manifest:
        """Parse and validate ``manifest.json`` bytes.

        Checks everything that can be checked without the other files: size bound, UTF-8,
        JSON syntax (no duplicate keys, no NaN), magic, schema version, required keys and
        types, file names, the block order, tiers, golden and runtime references.

        Raises:
            PackageError: naming ``source``, the offending key, expected vs found, and the fix.
        """
        parser = _Parser(source)
        top = parser.load_json(data)
        parser.check_version(top)
        return parser.load(cls, top, "", {})


def _dump(value: Any, depth: int) -> str:
    compact = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(", ", ": "))
    if not value or not isinstance(value, (dict, list)) or (depth and len(compact) <= 100):
        return compact
    pad = " " * (depth + 1)
    if isinstance(value, dict):
        items = [
            f"{pad}{json.dumps(k, ensure_ascii=True)}: {_dump(v, depth + 1)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    items = [pad + _dump(v, depth + 1) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * depth + "]"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Parser:
    """Validation of one manifest; every error names the source and the key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, msg: str, fix: str = _FIX_MANIFEST) -> PackageError:
        at = f" {where}" if where else ""
        return PackageError(f"{self.source}: {MANIFEST_NAME}{at}: {msg}; {fix}")

    # ---- typed getters ------------------------------------------------------------------
    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a JSON object, found {describe(value)}")
        return value

    def str_(self, value: Any, where: str, checks: Mapping[str, Any]) -> str:
        if "choices" in checks:
            allowed = list(checks["choices"])
            if not isinstance(value, str) or value not in allowed:
                names = ", ".join(map(repr, allowed[:10])) + (", ..." if len(allowed) > 10
                                                               else "")
                raise self.fail(where, f"expected one of {names}, found {describe(value)}")
        empty = not checks.get("nonempty")
        if not isinstance(value, str) or len(value) > MAX_STRING or not (empty or value):
            raise self.fail(where, f"expected {'a' if empty else 'a non-empty'} string of at "
                                   f"most {MAX_STRING} characters, found {describe(value)}")
        if "pattern" in checks and not checks["pattern"].fullmatch(value):
            raise self.fail(where, f"expected {checks['what']}, found {describe(value)}")
        return value

    def load(self, tp: Any, value: Any, where: str, checks: Mapping[str, Any],
             key: str | None = None) -> Any:
        """``value`` (JSON) as type ``tp`` (a manifest dataclass, int, float, str, a tuple,
        a str-keyed Mapping, ``X | None`` or Any), checked by the field's ``checks``."""
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            inner = next(a for a in args if a is not type(None))
            return None if value is None else self.load(inner, value, where, checks)
        if dataclasses.is_dataclass(tp):
            obj = self.obj(value, where)
            kwargs: dict[str, Any] = {}
            for f in dataclasses.fields(tp):
                name = f.metadata.get("json", f.name)
                if not f.init:
                    continue
                if f.metadata.get("key"):
                    kwargs[f.name] = key
                elif name in obj:
                    sub = f"{where}.{name}" if where else name
                    kwargs[f.name] = self.load(_hints(tp)[f.name], obj[name], sub, f.metadata)
                elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise self.fail(where, f"missing required key {name!r}")
            try:
                return tp(**kwargs)
            except PackageError as exc:  # Manifest's own checks: "<key path>: <what>"
                raise self.fail("", str(exc)) from None
        item = checks.get("item", {})
        if origin is tuple:
            if not isinstance(value, list):
                raise self.fail(where, f"expected a JSON array, found {describe(value)}")
            fixed = args[-1] is not Ellipsis   # tuple[str, str]; else tuple[int, ...]
            kinds = list(args) if fixed else [args[0]] * len(value)
            lo, hi = ((len(args),) * 2 if fixed
                      else (checks.get("min", 0), checks.get("max", MAX_ITEMS)))
            if not lo <= len(value) <= hi:
                raise self.fail(where, f"expected {lo} to {hi} items, found {len(value)}")
            return tuple(self.load(t, v, f"{where}[{i}]", item)
                         for i, (t, v) in enumerate(zip(kinds, value, strict=True)))
        if origin is Mapping:
            obj = self.obj(value, where)
            if len(obj) > checks.get("max", MAX_ITEMS):
                raise self.fail(where, f"expected at most {checks.get('max', MAX_ITEMS)} "
                                       f"entries, found {len(obj)}")
            if args[1] is Any:
                return MappingProxyType(obj)
            return MappingProxyType({k: self.load(args[1], v, f"{where}[{k[:80]!r}]", item, k)
                                     for k, v in obj.items()})
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is int:
            lo, hi = checks.get("lo", 0), checks.get("hi", MAX_INT)
            if not (number and isinstance(value, int) and lo <= value <= hi):
                raise self.fail(where, f"expected an integer in [{lo}, {hi}], found "
                                       f"{describe(value)}")
            return value
        if tp is float:
            if not (number and 0 <= value < math.inf):
                raise self.fail(where, f"expected a finite non-negative number, found "
                                       f"{describe(value)}")
            return float(value)
        return self.str_(value, where, checks)

    # ---- parsing ------------------------------------------------------------------------
    def load_json(self, data: bytes) -> Any:
        if len(data) > MAX_MANIFEST_BYTES:
            raise PackageError(
                f"{self.source}: {MANIFEST_NAME} is {len(data)} bytes, more than the "
                f"{MAX_MANIFEST_BYTES} allowed; it is not an edgestack manifest, or is damaged"
            )
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            msg = f"expected UTF-8 text, found an invalid byte at offset {exc.start}"
            raise self.fail("", msg) from None

        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, value in items:
                if key in out:
                    raise self.fail("", f"duplicate key {key[:80]!r} in one JSON object")
                out[key] = value
            return out

        def bad_constant(name: str) -> Any:
            raise self.fail("", f"expected finite numbers, found {name}")

        try:
            value = json.loads(text, object_pairs_hook=pairs, parse_constant=bad_constant)
        except PackageError:
            raise
        except RecursionError:
            raise self.fail("", "JSON nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, and integers too long to convert
            raise self.fail("", f"invalid JSON ({str(exc)[:120]})") from None
        self.check_depth(value)
        return value

    def check_depth(self, value: Any) -> None:
        stack = [(value, 0)]
        while stack:
            item, depth = stack.pop()
            if depth > MAX_JSON_DEPTH:
                raise self.fail("", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                stack.extend((v, depth + 1) for v in item.values())
            elif isinstance(item, list):
                stack.extend((v, depth + 1) for v in item)
            elif isinstance(item, float) and not math.isfinite(item):
                raise self.fail("", "expected finite numbers, found a number out of float range")

    def check_version(self, top: Any) -> None:
        if not isinstance(top, dict) or top.get("format") != FORMAT_MAGIC:
            found = describe(top.get("format")) if isinstance(top, dict) else describe(top)
            raise PackageError(
                f"{self.source}: {MANIFEST_NAME} is not an edgestack package manifest: expected "
                f"an object with \"format\": {FORMAT_MAGIC!r}, found {found}; pass the "
                "directory or .tar that edgestack's PackageWriter / write_archive produced"
            )
        version = top.get("schema_version")
        ok = isinstance(version, int) and not isinstance(version, bool)
        if ok and version in SUPPORTED_SCHEMA_VERSIONS:
            return
        found = f"package schema_version {describe(version)}"
        reads = ", ".join(map(str, SUPPORTED_SCHEMA_VERSIONS))
        if ok and version < min(SUPPORTED_SCHEMA_VERSIONS):
            model = top.get("model")
            source = model.get("source") if isinstance(model, dict) else None
            source = source if isinstance(source, str) and source else "<source>"
            raise PackageError(
                f"{self.source}: {found} is older than what edgestack {__version__} reads "
                f"(schema_version {reads}): repack it with `edgestack pack {source} --out "
                f"{self.source}` (edgestack >= {__version__})")
        raise PackageError(
            f"{self.source}: {found} is not supported: edgestack {__version__} reads "
            f"schema_version {reads}. Upgrade edgestack to read packages written by a newer "
            "version, or repack the model with this version of edgestack")


__all__ = ["FORMAT_MAGIC", "SCHEMA_VERSION", "SUPPORTED_SCHEMA_VERSIONS", "MANIFEST_NAME",
           "BLOCK_FILE", "NBITS_BLOCK", "GOLDEN_INPUTS", "GOLDEN_OUTPUTS", "ARCHIVE_SUFFIX",
           "BLOCK_ALIGN",
           "FACTOR_DTYPES", "FILE_ROLES", "LOADED_ROLES", "SITE_KINDS", "MAX_MANIFEST_BYTES",
           "DecoderInfo",
           "MAX_INT", "MAX_FILES", "MAX_LAYERS", "MAX_BLOCKS", "MAX_TIERS", "MAX_DIMS",
           "MAX_PATH_CHARS", "MAX_PATH_DEPTH", "MAX_ARCHIVE_MEMBERS", "align_up", "check_path",
           "check_names", "layout_records", "derive_tiers", "FileEntry", "LayerInfo",
           "LayerGraph", "Site", "BlockRecord", "Tier", "Golden", "ModelInfo", "Table",
           "RuntimeInfo", "Manifest"]
