"""Device package format, schema version 1. This docstring is the spec.

A device package is a **directory** or, holding exactly the same files, one **uncompressed
POSIX tar archive** (``.tar``). Both are read in place by :class:`edgestack.package.Package`:
an uncompressed tar keeps every member's bytes contiguous at a 512-byte aligned offset, so the
block file stays seekable and memory-mappable inside the archive, and a 64-byte aligned
block record stays 64-byte aligned. Compressed archives (``.tar.gz`` ...) are refused.

Contents::

    manifest.json          the manifest (below); UTF-8 JSON object, at most 16 MiB
    model.onnx             the model graph (role "graph", opaque bytes to this layer)
    model.mixed.onnx       graph variants over the same weights (role "variant", optional)
    *.data, ...            weight files (role "weights"), e.g. ONNX external data
    blocks.bin             BitStack block file (role "blocks"), only for BitStack models
    golden/inputs.npz      golden inputs for an on-device self-test (role "golden")
    golden/outputs.npz     golden outputs of the graph at one tier (role "golden")
    ...                    other files (role "aux": reports, licenses; never loaded)

File names (relative paths, ``/`` separated): 1 to 8 components of ``[A-Za-z0-9_]`` followed by
``[A-Za-z0-9._-]`` (no leading dot, so no ``.`` or ``..``), at most 128 characters each and 255
in all. Names must differ case-insensitively, no name may be a directory of another, and
``manifest.json`` is not listed in ``files``. In an archive, a member ``./x`` is read as ``x``;
directory members are skipped; any other member type (symlink, hard link, device, FIFO,
sparse file) is refused, as is any member not listed in the manifest. In a directory, listed
files must be regular files (not symlinks) inside the package; unlisted files are ignored.

Manifest (``manifest.json``; readers ignore keys they do not know, so additive changes keep
the schema version; anything else bumps ``schema_version``)::

    format            "edgestack-package"                      (the magic)
    schema_version    1                                        (SUPPORTED_SCHEMA_VERSIONS)
    edgestack_version "0.1.0"                                  (the writer's version)
    created           "2026-11-02T10:00:00Z"                   (UTC, ISO 8601)
    model             {"name": str, "source": str, "method": str}
    target            str, e.g. "ort-cpu"
    metadata          JSON object, free-form (may be {})
    files             {path: {"size": int, "sha256": 64 lowercase hex, "role": ROLE}}
                      every file but manifest.json; ROLE in FILE_ROLES
    block_align       64                                       (BLOCK_ALIGN)
    layers            {name: {"shape": [m, d1, ...], "rank": k, "n_blocks": N,
                              "dtype": "float16", "signs_bytes": int, "u_bytes": int,
                              "v_bytes": int, "attrs": {...}}}
    block_index       [{"layer": name, "block": i, "offset": int, "length": int,
                        "signs": int, "u": int, "v": int}, ...]  (storage order)
    tiers             [{"index": t, "blocks": {layer: n}, "bytes": int,
                        "total_bytes": int}, ...]
    golden            null or {"inputs": path, "outputs": path, "tier": t,
                               "rtol": float, "atol": float}

Conventions of the packer (:mod:`edgestack.package.pack`) that the runtime relies on (free-form
to this layer, so other writers may differ): ``layers[L].attrs`` = ``{"node", "signs", "u",
"v", "output", "torch_layer"}``, the graph's ``BitStackWeight`` node of the layer, its three
input names (graph inputs whose first dimension is symbolic) and its output's name;
``metadata.runtime`` = ``{"activation_bytes", "input_shapes", "weights_file", "order_source",
"steps_per_level"}``, what the memory planner needs without parsing the graph.

Block file (``blocks.bin``, present iff ``layers`` is not empty). A BitStack layer of dense
shape ``[m, d1, ...]`` is the matrix ``[m, n]`` with ``n = d1 * ...`` (see
:mod:`edgestack.formats.bitstack`); its block ``i`` is three parts:

======== ============================= =========================================
part     bytes                         content
======== ============================= =========================================
signs    ``ceil(m*n/8)``               C-order ``[m, n]`` signs, MSB first, 1 = +1
u        ``2*m*k``                     float16 little-endian ``[m, k]``, C order
v        ``2*k*n``                     float16 little-endian ``[k, n]``, C order
======== ============================= =========================================

A block record is the parts in the order signs, u, v, **each starting at a multiple of
BLOCK_ALIGN (64) bytes** from the start of the file; the gaps are zero bytes. ``offset`` is
the record's start (= its ``signs``), ``length`` runs to the end of its ``v``. Records are
stored back to back in the global importance order that the packer chose: the first record
starts at 0, each next one at ``align_up(previous end, 64)``, and the file ends exactly at the
end of the last record (no holes beyond alignment, no trailing bytes). Within one layer,
blocks appear in the order 0, 1, 2, ... (a layer's first ``n`` blocks are its ``n``-block
approximation), and every block of every layer appears exactly once.

Tiers. Tier ``t`` loads the first ``c_t`` records of the block file, so it needs exactly the
prefix ``[0, tiers[t].bytes)``, where ``bytes`` is the end of record ``c_t - 1``;
``blocks`` is how many of those records belong to each layer (every layer has at least one,
and ``sum(blocks) == c_t``). Tiers are listed in index order 0, 1, ... with ``c_t`` strictly
increasing (so prefixes grow: growing from ``t`` to ``t+1`` reads only
``[tiers[t].bytes, tiers[t+1].bytes)``), and the last tier holds every record.
``total_bytes`` is everything the tier loads: ``bytes`` plus the sizes of the files whose
role is in LOADED_ROLES (graph and weights). A package without BitStack layers has one tier
``{"index": 0, "blocks": {}, "bytes": 0, "total_bytes": ...}``.

Golden data: ``.npz`` files (numpy ``savez`` layout, no pickled objects) mapping graph input
and output names to arrays; ``outputs`` are what the graph gave for ``inputs`` with tier
``tier`` loaded; a runtime self-test compares with ``rtol``/``atol``. The writer stores npz
members uncompressed with a fixed timestamp, so a package's bytes depend only on its content
(and ``created``).

Archive form: the writer (``write_archive``) puts ``manifest.json`` first (copied verbatim),
then the listed files in manifest order, as regular-file members with mode 0644, uid/gid 0,
empty user names and mtime = ``created``, so one package always gives the same archive bytes.
Readers accept members in any order and a leading ``./``.

JSON rules and limits (a reader refuses anything else): UTF-8, at most MAX_MANIFEST_BYTES,
nesting at most MAX_JSON_DEPTH, no duplicate keys in an object, no NaN/Infinity. Integers are
non-negative and at most ``MAX_INT`` (2**53, exact in every JSON parser; booleans are not
integers); shape dimensions, ``rank`` and ``n_blocks`` are at least 1; exactly one file has
role ``graph``. Counts are bounded by the other ``MAX_*`` constants below.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from edgestack.errors import PackageError

FORMAT_MAGIC = "edgestack-package"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)

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

# graph variants the packer writes beside the plain graph (see edgestack.package.variants)
FORMS = ("on-the-fly", "int8", "nbits8", "fp32")
"""How a BitStack layer is served (see :mod:`edgestack.package.variants`): decoded by ONNX
Runtime on every call, or materialised once per tier as int8 (1 byte a weight, integer
kernels), 8-bit weight-only MatMulNBits (1.16 bytes a weight, every layer at once) or float32
(4 bytes a weight, the tier's exact weight)."""
VARIANT_FILE = "model.mixed.onnx"
INT8_FILE = "model.int8.onnx"
FP32_FILE = "model.fp32.onnx"
NBITS8_FILE = "model.nbits8.onnx"
DENSE_FILES = {"int8": INT8_FILE, "nbits8": NBITS8_FILE, "fp32": FP32_FILE}
"""The dense variants: every layer in one form, no ``If``
(see :func:`edgestack.package.variants.dense_graph`)."""

DENSE_DATA = {"int8": "int8.bin", "nbits8": "nbits8.bin", "fp32": "fp32.bin"}
"""The external-data file each dense graph reads its site tensors from. The runtime writes it
for the plan it serves, in a folder of its own, at the offsets the packer recorded in
``site["file"][form]`` (see :func:`edgestack.package.variants.dense_graph`)."""

NBITS_BLOCK = 32
"""Weights per scale of the ``nbits8`` form (``MatMulNBits`` ``block_size``, as the weight-only
baselines)."""

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
    problem = ""
    if not name:
        problem = "it is empty"
    elif len(name) > MAX_PATH_CHARS:
        problem = f"it is {len(name)} characters long (at most {MAX_PATH_CHARS})"
    elif name.startswith("/"):
        problem = "it is absolute"
    elif ".." in parts:
        problem = "it contains '..'"
    elif len(parts) > MAX_PATH_DEPTH:
        problem = f"it has {len(parts)} components (at most {MAX_PATH_DEPTH})"
    else:
        for part in parts:
            if len(part) > MAX_COMPONENT_CHARS:
                problem = f"component {part[:20]!r}... is longer than {MAX_COMPONENT_CHARS}"
            elif not _COMPONENT.fullmatch(part):
                problem = (
                    f"component {part!r} is empty, starts with '.' or '-', or has a character "
                    "outside [A-Za-z0-9._-]"
                )
            if problem:
                break
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


def part_sizes(shape: Sequence[int], rank: int, dtype: str = "float16") -> tuple[int, int, int]:
    """``(signs_bytes, u_bytes, v_bytes)`` of one block of a layer."""
    m, n = shape[0], math.prod(shape[1:])
    item = int(FACTOR_DTYPES[dtype][-1])
    return (m * n + 7) // 8, item * m * rank, item * rank * n


@dataclass(frozen=True)
class FileEntry:
    """One listed file: relative ``name``, ``size`` in bytes, ``sha256`` hex, ``role``."""

    name: str
    size: int
    sha256: str
    role: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "role": self.role}


@dataclass(frozen=True)
class LayerInfo:
    """A BitStack layer in the block file (what the runtime needs to slice its blocks)."""

    name: str
    shape: tuple[int, ...]
    rank: int
    n_blocks: int
    dtype: str = "float16"
    attrs: Mapping[str, Any] = field(default_factory=dict)

    # Derived sizes are computed once per (frozen) layer: the planner reads them on every
    # re-tier. cached_property stores into the instance __dict__, which frozen allows.
    @functools.cached_property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)``: the weight viewed as a matrix."""
        return self.shape[0], math.prod(self.shape[1:])

    @functools.cached_property
    def _sizes(self) -> tuple[int, int, int]:
        """``(signs_bytes, u_bytes, v_bytes)`` of one block (:func:`part_sizes`)."""
        return part_sizes(self.shape, self.rank, self.dtype)

    @functools.cached_property
    def signs_bytes(self) -> int:
        return self._sizes[0]

    @functools.cached_property
    def u_bytes(self) -> int:
        return self._sizes[1]

    @functools.cached_property
    def v_bytes(self) -> int:
        return self._sizes[2]

    def to_dict(self) -> dict[str, Any]:
        sb, ub, vb = self._sizes
        return {
            "shape": list(self.shape),
            "rank": self.rank,
            "n_blocks": self.n_blocks,
            "dtype": self.dtype,
            "signs_bytes": sb,
            "u_bytes": ub,
            "v_bytes": vb,
            "attrs": dict(self.attrs),
        }


@dataclass(frozen=True)
class BlockRecord:
    """One block's record in the block file (absolute byte offsets)."""

    layer: str
    block: int
    offset: int
    length: int
    signs: int
    u: int
    v: int

    @property
    def end(self) -> int:
        """Offset one past the record's last byte."""
        return self.offset + self.length

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "block": self.block,
            "offset": self.offset,
            "length": self.length,
            "signs": self.signs,
            "u": self.u,
            "v": self.v,
        }


@dataclass(frozen=True)
class Tier:
    """A memory tier: the first ``n_records`` block records, bytes ``[0, bytes)``."""

    index: int
    blocks: Mapping[str, int]
    bytes: int
    total_bytes: int

    @property
    def n_records(self) -> int:
        """How many records of the block file the tier loads."""
        return sum(self.blocks.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "blocks": dict(self.blocks),
            "bytes": self.bytes,
            "total_bytes": self.total_bytes,
        }


@dataclass(frozen=True)
class Golden:
    """Golden self-test data: two npz file names, the tier that made them, tolerances."""

    inputs: str
    outputs: str
    tier: int
    rtol: float
    atol: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "outputs": self.outputs,
            "tier": self.tier,
            "rtol": self.rtol,
            "atol": self.atol,
        }


@dataclass(frozen=True)
class ModelInfo:
    """Where the packed model came from."""

    name: str
    source: str = ""
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "method": self.method}


def layout_records(
    layers: Mapping[str, LayerInfo], order: Sequence[tuple[str, int]]
) -> list[BlockRecord]:
    """Block records for blocks stored in ``order`` (``(layer, block)`` pairs).

    Raises:
        PackageError: ``order`` names an unknown layer, skips or repeats a block, or lists a
            layer's blocks out of their 0, 1, 2, ... order.
    """
    nxt = {name: 0 for name in layers}
    records: list[BlockRecord] = []
    pos = 0
    for i, item in enumerate(order):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise PackageError(
                f"block order[{i}]: expected a (layer, block) pair, found {describe(item)}"
            )
        name, block = item
        if name not in layers:
            raise PackageError(
                f"block order[{i}]: unknown layer {name!r}; layers are "
                f"{', '.join(map(repr, list(layers)[:10]))}"
            )
        if isinstance(block, bool) or not isinstance(block, int) or block != nxt[name]:
            raise PackageError(
                f"block order[{i}]: expected block {nxt[name]} of layer {name!r} (a layer's "
                f"blocks are stored in the order 0, 1, 2, ...), found {describe(block)}"
            )
        info = layers[name]
        if block >= info.n_blocks:
            raise PackageError(
                f"block order[{i}]: layer {name!r} has {info.n_blocks} blocks, found block {block}"
            )
        nxt[name] += 1
        sb, ub, vb = part_sizes(info.shape, info.rank, info.dtype)
        start = align_up(pos)
        u = align_up(start + sb)
        v = align_up(u + ub)
        records.append(BlockRecord(name, block, start, v + vb - start, start, u, v))
        pos = v + vb
    missing = [
        f"{n!r}: {nxt[n]} of {info.n_blocks}"
        for n, info in layers.items()
        if nxt[n] != info.n_blocks
    ]
    if missing:
        raise PackageError(
            f"block order: every block of every layer must be stored once; missing blocks "
            f"({'; '.join(missing[:5])}): add the missing (layer, block) pairs to the order"
        )
    return records


def tiers_for_counts(
    records: Sequence[BlockRecord], counts: Sequence[int], layer_names: Iterable[str], loaded: int
) -> list[Tier]:
    """Tiers loading the first ``counts[t]`` records each (``loaded``: graph+weights bytes).

    ``counts`` must be non-decreasing and at most ``len(records)``; one pass over the records.
    """
    running = {name: 0 for name in layer_names}
    tiers: list[Tier] = []
    pos = 0
    for index, count in enumerate(counts):
        for rec in records[pos:count]:
            running[rec.layer] += 1
        pos = max(pos, count)
        nbytes = records[count - 1].end if count else 0
        tiers.append(Tier(index, MappingProxyType(dict(running)), nbytes, nbytes + loaded))
    return tiers


# --------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest (see the module docstring for the meaning of fields)."""

    model: ModelInfo
    target: str
    files: Mapping[str, FileEntry]
    layers: Mapping[str, LayerInfo]
    block_index: tuple[BlockRecord, ...]
    tiers: tuple[Tier, ...]
    golden: Golden | None
    created: str
    edgestack_version: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The manifest as the JSON object stored in ``manifest.json``."""
        return {
            "format": FORMAT_MAGIC,
            "schema_version": self.schema_version,
            "edgestack_version": self.edgestack_version,
            "created": self.created,
            "model": self.model.to_dict(),
            "target": self.target,
            "metadata": dict(self.metadata),
            "files": {name: entry.to_dict() for name, entry in self.files.items()},
            "block_align": BLOCK_ALIGN,
            "layers": {name: info.to_dict() for name, info in self.layers.items()},
            "block_index": [rec.to_dict() for rec in self.block_index],
            "tiers": [tier.to_dict() for tier in self.tiers],
            "golden": self.golden.to_dict() if self.golden else None,
        }

    def to_json_bytes(self) -> bytes:
        """Canonical ``manifest.json`` bytes: ASCII JSON, one-space indent, containers whose
        compact form fits in 100 characters on one line, final newline."""
        return (_dump(self.to_dict(), 0) + "\n").encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "package") -> Manifest:
        """Parse and validate ``manifest.json`` bytes.

        Checks everything that can be checked without the other files: size bound, UTF-8,
        JSON syntax (no duplicate keys, no NaN), magic, schema version, required keys and
        types, file names, block layout, tiers and golden references.

        Raises:
            PackageError: naming ``source``, the offending key, expected vs found, and the fix.
        """
        return _Parser(source).parse(data)


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


class _Parser:
    """Validation of one manifest; every error names the source and the key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, msg: str, fix: str = _FIX_MANIFEST) -> PackageError:
        at = f" {where}" if where else ""
        return PackageError(f"{self.source}: {MANIFEST_NAME}{at}: {msg}; {fix}")

    # ---- typed getters ------------------------------------------------------------------
    def get(self, obj: dict[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise self.fail(where, f"missing required key {key!r}")
        return obj[key]

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a JSON object, found {describe(value)}")
        return value

    def arr(self, value: Any, where: str, max_len: int) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a JSON array, found {describe(value)}")
        if len(value) > max_len:
            raise self.fail(where, f"expected at most {max_len} items, found {len(value)}")
        return value

    def int_(self, value: Any, where: str, lo: int = 0, hi: int = MAX_INT) -> int:
        expected = f"expected an integer in [{lo}, {hi}]"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"{expected}, found {describe(value)}")
        if not lo <= value <= hi:
            raise self.fail(where, f"{expected}, found {value}")
        return value

    def str_(self, value: Any, where: str, allow_empty: bool = True) -> str:
        if not isinstance(value, str) or len(value) > MAX_STRING or not (allow_empty or value):
            need = "a string" if allow_empty else "a non-empty string"
            raise self.fail(
                where, f"expected {need} of at most {MAX_STRING} characters, found "
                f"{describe(value)}"
            )
        return value

    def float_(self, value: Any, where: str) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            raise self.fail(
                where, f"expected a finite non-negative number, found {describe(value)}"
            )
        return float(value)

    def one_of(self, value: Any, where: str, allowed: Collection[str]) -> str:
        if not isinstance(value, str) or value not in allowed:
            first = list(allowed)
            names = ", ".join(map(repr, first[:10])) + (", ..." if len(first) > 10 else "")
            raise self.fail(where, f"expected one of {names}, found {describe(value)}")
        return value

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

    def check_version(self, top: Any) -> int:
        if not isinstance(top, dict) or top.get("format") != FORMAT_MAGIC:
            found = describe(top.get("format")) if isinstance(top, dict) else describe(top)
            raise PackageError(
                f"{self.source}: {MANIFEST_NAME} is not an edgestack package manifest: expected "
                f"an object with \"format\": {FORMAT_MAGIC!r}, found {found}; pass the "
                "directory or .tar that edgestack's PackageWriter / write_archive produced"
            )
        version = top.get("schema_version")
        if (isinstance(version, int) and not isinstance(version, bool)
                and version in SUPPORTED_SCHEMA_VERSIONS):
            return version
        from edgestack import __version__

        raise PackageError(
            f"{self.source}: package schema_version {describe(version)} is not supported by "
            f"edgestack {__version__} (supported: {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))})"
            ". Upgrade edgestack to read packages written by a newer version, or repack the "
            "model with this version of edgestack"
        )

    def parse(self, data: bytes) -> Manifest:
        top = self.load_json(data)
        version = self.check_version(top)
        model = self.obj(self.get(top, "model", ""), "model")
        model_info = ModelInfo(
            self.str_(self.get(model, "name", "model"), "model.name", allow_empty=False),
            self.str_(model.get("source", ""), "model.source"),
            self.str_(model.get("method", ""), "model.method"),
        )
        align = self.int_(self.get(top, "block_align", ""), "block_align", 1, 2**20)
        if align != BLOCK_ALIGN:
            raise self.fail("block_align", f"expected {BLOCK_ALIGN}, found {align}")
        files = self.parse_files(self.get(top, "files", ""))
        layers = self.parse_layers(self.get(top, "layers", ""))
        records = self.parse_block_index(self.get(top, "block_index", ""), layers, files)
        loaded = sum(e.size for e in files.values() if e.role in LOADED_ROLES)
        tiers = self.parse_tiers(self.get(top, "tiers", ""), layers, records, loaded)
        return Manifest(
            model=model_info,
            target=self.str_(self.get(top, "target", ""), "target", allow_empty=False),
            files=MappingProxyType(files),
            layers=MappingProxyType(layers),
            block_index=tuple(records),
            tiers=tuple(tiers),
            golden=self.parse_golden(self.get(top, "golden", ""), files, len(tiers)),
            created=self.str_(self.get(top, "created", ""), "created"),
            edgestack_version=self.str_(
                self.get(top, "edgestack_version", ""), "edgestack_version"
            ),
            metadata=MappingProxyType(self.obj(top.get("metadata", {}), "metadata")),
            schema_version=version,
        )

    def parse_files(self, value: Any) -> dict[str, FileEntry]:
        raw = self.obj(value, "files")
        if len(raw) > MAX_FILES:
            raise self.fail("files", f"expected at most {MAX_FILES} files, found {len(raw)}")
        files: dict[str, FileEntry] = {}
        for name, spec in raw.items():
            where = f"files[{name[:80]!r}]"
            try:
                check_path(name, f"{self.source}: {MANIFEST_NAME} {where}")
            except PackageError as exc:
                raise PackageError(f"{exc}; {_FIX_MANIFEST}") from None
            if name == MANIFEST_NAME:
                raise self.fail(where, f"{MANIFEST_NAME} must not list itself")
            spec = self.obj(spec, where)
            size = self.int_(self.get(spec, "size", where), f"{where}.size")
            digest = self.get(spec, "sha256", where)
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise self.fail(
                    f"{where}.sha256", f"expected 64 lowercase hex digits, found {describe(digest)}"
                )
            role = self.one_of(self.get(spec, "role", where), f"{where}.role", FILE_ROLES)
            if (role == "blocks") != (name == BLOCK_FILE):
                raise self.fail(
                    where, f"role 'blocks' belongs to {BLOCK_FILE!r} only, found role {role!r}"
                )
            files[name] = FileEntry(name, size, digest, role)
        try:
            check_names(files, f"{self.source}: {MANIFEST_NAME} files")
        except PackageError as exc:
            raise PackageError(f"{exc}; {_FIX_MANIFEST}") from None
        graphs = [n for n, e in files.items() if e.role == "graph"]
        if len(graphs) != 1:
            found = ", ".join(map(repr, graphs[:5]))
            raise self.fail(
                "files", f"expected exactly one file with role 'graph', found {len(graphs)} {found}"
            )
        return files

    def parse_layers(self, value: Any) -> dict[str, LayerInfo]:
        raw = self.obj(value, "layers")
        if len(raw) > MAX_LAYERS:
            raise self.fail("layers", f"expected at most {MAX_LAYERS} layers, found {len(raw)}")
        layers: dict[str, LayerInfo] = {}
        for name, spec in raw.items():
            where = f"layers[{name[:80]!r}]"
            self.str_(name, where, allow_empty=False)
            spec = self.obj(spec, where)
            shape_raw = self.arr(self.get(spec, "shape", where), f"{where}.shape", MAX_DIMS)
            if len(shape_raw) < 2:
                raise self.fail(
                    f"{where}.shape", f"expected 2 to {MAX_DIMS} dimensions, found {len(shape_raw)}"
                )
            shape = tuple(self.int_(d, f"{where}.shape[{i}]", 1) for i, d in enumerate(shape_raw))
            rank = self.int_(self.get(spec, "rank", where), f"{where}.rank", 1)
            n_blocks = self.int_(
                self.get(spec, "n_blocks", where), f"{where}.n_blocks", 1, MAX_BLOCKS
            )
            dtype = self.one_of(self.get(spec, "dtype", where), f"{where}.dtype", FACTOR_DTYPES)
            attrs = self.obj(spec.get("attrs", {}), f"{where}.attrs")
            sizes = part_sizes(shape, rank, dtype)
            for key, expected in zip(("signs_bytes", "u_bytes", "v_bytes"), sizes, strict=True):
                found = self.get(spec, key, where)
                if isinstance(found, bool) or found != expected:
                    raise self.fail(
                        f"{where}.{key}",
                        f"expected {expected} for shape {list(shape)} and rank {rank}, found "
                        f"{describe(found)}",
                    )
            layers[name] = LayerInfo(name, shape, rank, n_blocks, dtype, MappingProxyType(attrs))
        return layers

    def parse_block_index(
        self, value: Any, layers: Mapping[str, LayerInfo], files: Mapping[str, FileEntry]
    ) -> list[BlockRecord]:
        raw = self.arr(value, "block_index", MAX_BLOCKS)
        if layers and BLOCK_FILE not in files:
            raise self.fail("files", f"the package has BitStack layers but no {BLOCK_FILE!r}")
        if not layers:
            if raw:
                raise self.fail("block_index", f"expected no records (no layers), found {len(raw)}")
            if BLOCK_FILE in files:
                raise self.fail("files", f"{BLOCK_FILE!r} is listed but there are no layers")
            return []
        nxt = {name: 0 for name in layers}
        records: list[BlockRecord] = []
        pos = 0
        for i, item in enumerate(raw):
            where = f"block_index[{i}]"
            item = self.obj(item, where)
            name = self.one_of(self.get(item, "layer", where), f"{where}.layer", layers)
            info = layers[name]
            block = self.int_(self.get(item, "block", where), f"{where}.block")
            if block != nxt[name] or block >= info.n_blocks:
                raise self.fail(
                    f"{where}.block",
                    f"expected block {nxt[name]} of layer {name!r} ({info.n_blocks} blocks, "
                    f"stored in the order 0, 1, ...), found {block}",
                )
            nxt[name] += 1
            sb, ub, vb = part_sizes(info.shape, info.rank, info.dtype)
            start = align_up(pos)
            u = align_up(start + sb)
            v = align_up(u + ub)
            expected = {"offset": start, "length": v + vb - start, "signs": start, "u": u, "v": v}
            for key, exp in expected.items():
                found = self.int_(self.get(item, key, where), f"{where}.{key}")
                if found != exp:
                    raise self.fail(
                        f"{where}.{key}",
                        f"expected {exp} (records are stored back to back at {BLOCK_ALIGN}-byte "
                        f"aligned offsets, parts signs/u/v each aligned), found {found}; the "
                        "block index does not match the block layout",
                    )
            records.append(BlockRecord(name, block, start, v + vb - start, start, u, v))
            pos = v + vb
        short = [f"{n!r} ({nxt[n]} of {info.n_blocks})" for n, info in layers.items()
                 if nxt[n] != info.n_blocks]
        if short:
            raise self.fail(
                "block_index",
                "every block of every layer must have a record; incomplete: "
                + ", ".join(short[:5]),
            )
        size = files[BLOCK_FILE].size
        if pos != size:
            raise self.fail(
                f"files[{BLOCK_FILE!r}].size",
                f"expected {pos} (the end of the last block record), found {size}",
            )
        return records

    def parse_tiers(
        self,
        value: Any,
        layers: Mapping[str, LayerInfo],
        records: Sequence[BlockRecord],
        loaded: int,
    ) -> list[Tier]:
        raw = self.arr(value, "tiers", MAX_TIERS)
        if not raw:
            raise self.fail("tiers", "expected at least one tier, found none")
        if not records and len(raw) != 1:
            raise self.fail(
                "tiers", f"a package without BitStack layers has exactly one tier, found {len(raw)}"
            )
        lo = 1 if records else 0
        counts: list[int] = []
        parsed: list[tuple[dict[str, int], dict[str, Any]]] = []
        for i, item in enumerate(raw):
            where = f"tiers[{i}]"
            item = self.obj(item, where)
            self.int_(self.get(item, "index", where), f"{where}.index", i, i)
            blocks_raw = self.obj(self.get(item, "blocks", where), f"{where}.blocks")
            if set(blocks_raw) != set(layers):
                extra = sorted(set(blocks_raw) - set(layers))[:3]
                missing = sorted(set(layers) - set(blocks_raw))[:3]
                raise self.fail(
                    f"{where}.blocks",
                    f"expected one count per layer; unknown layers {extra}, missing {missing}",
                )
            blocks = {
                name: self.int_(blocks_raw[name], f"{where}.blocks[{name[:80]!r}]", lo, n.n_blocks)
                for name, n in layers.items()
            }
            count = sum(blocks.values())
            if counts and count <= counts[-1]:
                raise self.fail(
                    where,
                    f"expected more block records than tier {i - 1} ({counts[-1]}), found "
                    f"{count}: tiers must grow",
                )
            counts.append(count)
            parsed.append((blocks, item))
        if records and counts[-1] != len(records):
            raise self.fail(
                f"tiers[{len(raw) - 1}]",
                f"the last tier must hold every block record ({len(records)}), found {counts[-1]}",
            )
        tiers = tiers_for_counts(records, counts, layers, loaded)
        meaning = {
            "bytes": "the end of its last block record",
            "total_bytes": "bytes plus the sizes of the graph and weight files",
        }
        for i, (tier, (blocks, item)) in enumerate(zip(tiers, parsed, strict=True)):
            where = f"tiers[{i}]"
            if dict(tier.blocks) != blocks:
                raise self.fail(
                    f"{where}.blocks",
                    f"expected the per-layer counts of the first {counts[i]} records in storage "
                    f"order, {dict(tier.blocks)}, found {blocks}: a tier must be a prefix of the "
                    "block file",
                )
            for key, what in meaning.items():
                found = self.int_(self.get(item, key, where), f"{where}.{key}")
                if found != getattr(tier, key):
                    raise self.fail(
                        f"{where}.{key}", f"expected {getattr(tier, key)} ({what}), found {found}"
                    )
        return tiers

    def parse_golden(
        self, value: Any, files: Mapping[str, FileEntry], n_tiers: int
    ) -> Golden | None:
        if value is None:
            return None
        raw = self.obj(value, "golden")
        golden = [n for n, e in files.items() if e.role == "golden"]
        names = [
            self.one_of(self.get(raw, key, "golden"), f"golden.{key}", golden)
            for key in ("inputs", "outputs")
        ]
        tier = self.int_(self.get(raw, "tier", "golden"), "golden.tier", 0, n_tiers - 1)
        rtol = self.float_(self.get(raw, "rtol", "golden"), "golden.rtol")
        atol = self.float_(self.get(raw, "atol", "golden"), "golden.atol")
        return Golden(names[0], names[1], tier, rtol, atol)


__all__ = [
    "FORMAT_MAGIC",
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "MANIFEST_NAME",
    "BLOCK_FILE",
    "GOLDEN_INPUTS",
    "GOLDEN_OUTPUTS",
    "ARCHIVE_SUFFIX",
    "BLOCK_ALIGN",
    "FACTOR_DTYPES",
    "FILE_ROLES",
    "LOADED_ROLES",
    "MAX_MANIFEST_BYTES",
    "MAX_INT",
    "MAX_FILES",
    "MAX_LAYERS",
    "MAX_BLOCKS",
    "MAX_TIERS",
    "MAX_DIMS",
    "MAX_PATH_CHARS",
    "MAX_PATH_DEPTH",
    "MAX_ARCHIVE_MEMBERS",
    "align_up",
    "check_path",
    "check_names",
    "part_sizes",
    "layout_records",
    "tiers_for_counts",
    "FileEntry",
    "LayerInfo",
    "BlockRecord",
    "Tier",
    "Golden",
    "ModelInfo",
    "Manifest",
]
