"""Write a device package: an explicit state machine that never leaves half a package.

States and the calls each allows (anything else raises :class:`PackageError` naming the
state)::

    new ──begin()──▶ open ──add_file()*, add_blocks() (once)──▶ open
    open ──set_tiers()──▶ tiered ──add_golden()──▶ golden ──finish()──▶ finished
    open ──finish() / add_golden()   only without BitStack blocks (one tier, no block file)
    tiered ──finish()──▶ finished    (golden data is optional)
    any ──abort() or an exception in a with-block──▶ aborted

Files are written into a temporary sibling directory ``.edgestack-tmp-<pid>-<hex>-<name>``
(same file system, so the final rename is atomic); sizes and sha256 are computed while writing.
:meth:`PackageWriter.finish` writes ``manifest.json``, re-opens the temporary package with the
reader as a self-check, fsyncs, and renames it to ``out_dir``. An existing ``out_dir`` is
refused unless ``overwrite=True``, and even then only if it is a package directory (it has a
``manifest.json``) or an empty directory: the two folders are exchanged in one step and the
old one deleted (:func:`replace_dir`), so a kill at any instant leaves the old package or the
new one. A process killed mid-write leaves only the hidden temporary directory, which the next
run removes (:mod:`edgestack.core.atomic`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from edgestack.core import atomic
from edgestack.errors import InternalError, PackageError
from edgestack.package.format import (
    BLOCK_FILE,
    FACTOR_DTYPES,
    GOLDEN_INPUTS,
    GOLDEN_OUTPUTS,
    MANIFEST_NAME,
    MAX_BLOCKS,
    MAX_DIMS,
    MAX_FILES,
    MAX_JSON_DEPTH,
    MAX_LAYERS,
    MAX_MANIFEST_BYTES,
    MAX_STRING,
    MAX_TIERS,
    BlockRecord,
    FileEntry,
    Golden,
    LayerInfo,
    Manifest,
    ModelInfo,
    Tier,
    check_names,
    check_path,
    layout_records,
    tiers_for_counts,
)

_CHUNK = 1 << 20
_ORDER = "begin() -> add_file()/add_blocks() -> set_tiers() -> add_golden() -> finish()"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def temp_sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name next to ``path`` (same directory, so renames are atomic), named by
    :func:`edgestack.core.atomic.sibling` (``.edgestack-<tag>-<pid>-<hex>-<name>``): the next
    run removes it if this process is killed (the folder's leftovers are swept first)."""
    return atomic.sibling(path, tag)


def replace_dir(tmp: Path, dest: Path, overwrite: bool, what: str) -> None:
    """Rename the finished directory ``tmp`` to ``dest``.

    An existing ``dest`` is swapped with ``tmp`` in one step where the file system can
    (``renameat2(RENAME_EXCHANGE)``) and the old package deleted, so a kill at any instant
    leaves the old package or the new one at ``dest``; elsewhere the old one is renamed aside
    first and put back by the next run if a kill left ``dest`` missing
    (:func:`edgestack.core.atomic.replace_dir`).

    Raises:
        PackageError: ``dest`` exists and ``overwrite`` is false, or ``dest`` is something
            that is not a package directory or an empty directory (never deleted).
    """
    if os.path.lexists(dest):
        if not overwrite:
            raise PackageError(
                f"{dest} already exists; pass overwrite=True to replace it, or choose another "
                f"{what} path"
            )
        if dest.is_symlink() or not dest.is_dir():
            raise PackageError(
                f"{dest} exists and is not a directory; refusing to replace it: remove it yourself "
                f"or choose another {what} path"
            )
        if not (dest / MANIFEST_NAME).is_file() and any(dest.iterdir()):
            raise PackageError(
                f"{dest} exists and is neither a package (no {MANIFEST_NAME}) nor empty; refusing "
                "to replace it with overwrite=True: remove it yourself or choose another "
                f"{what} path"
            )
    atomic.replace_dir(tmp, dest)


class _HashingFile:
    """A binary file opened for writing that tracks its size and sha256."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "xb")  # noqa: SIM115 - held open, closed by close()
        self.size = 0
        self._sha = hashlib.sha256()

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        self._f.write(view)
        self._sha.update(view)
        self.size += len(view)

    def pad_to(self, offset: int) -> None:
        if offset > self.size:
            self.write(bytes(offset - self.size))

    def close(self) -> tuple[int, str]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self.size, self._sha.hexdigest()

    def discard(self) -> None:
        self._f.close()


def _check_json(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PackageError(
            f"{what}: expected a mapping of JSON values, found {type(value).__name__}"
        )
    try:
        out = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise PackageError(
            f"{what}: expected JSON-serialisable values (finite numbers, strings, lists, dicts): "
            f"{exc}"
        ) from None
    limit = MAX_JSON_DEPTH - 3  # room for the manifest keys above it
    stack: list[tuple[Any, int]] = [(out, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise PackageError(f"{what}: nested deeper than {limit} levels; flatten it")
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return out


def _text(value: Any, what: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str) or len(value) > MAX_STRING or (not allow_empty and not value):
        raise PackageError(
            f"{what}: expected a {'non-empty ' if not allow_empty else ''}string of at most "
            f"{MAX_STRING} characters, found {value!r:.60}"
        )
    return value


class PackageWriter:
    """Build a device package at ``out_dir`` (see the module docstring for the states).

    Example::

        with PackageWriter("pkg", overwrite=True) as w:
            w.begin(name="minilm", target="ort-cpu", source="hf:...", method="bitstack")
            w.add_file("model.onnx", onnx_bytes, role="graph")
            w.add_blocks(order, {"enc.0.q": stack_q, ...})
            w.set_tiers([8, 16, 32])
            w.add_golden({"input_ids": ids}, {"out": y}, tier=2)
            w.finish()

    Args:
        out_dir: the package directory to create.
        overwrite: replace an existing package directory (atomically, see module doc).
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.overwrite = bool(overwrite)
        self.state = "new"
        self._tmp: Path | None = None
        self._files: dict[str, FileEntry] = {}
        self._layers: dict[str, LayerInfo] = {}
        self._records: list[BlockRecord] = []
        self._counts: list[int] = []
        self._golden: Golden | None = None
        self._info: dict[str, Any] = {}

    # ---- state machine ----------------------------------------------------------------
    def _require(self, method: str, *allowed: str) -> None:
        if self.state not in allowed:
            raise PackageError(
                f"PackageWriter.{method}() is not allowed in state {self.state!r} (allowed in "
                f"{', '.join(map(repr, allowed))}); the call order is {_ORDER}"
            )

    def _guard(self) -> _AbortOnError:
        return _AbortOnError(self)

    def __enter__(self) -> PackageWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
            return
        if self.state not in ("finished", "aborted"):
            state = self.state
            self.abort()
            raise PackageError(
                f"PackageWriter for {self.out_dir} left its with-block in state {state!r} "
                "without finish(); nothing was written: call finish() inside the block"
            )

    def __del__(self) -> None:
        # a writer dropped without finish() or abort() must not leave its temporary directory
        try:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def abort(self) -> None:
        """Discard everything written so far (removes the temporary directory)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if self.state != "finished":
            self.state = "aborted"

    # ---- calls ------------------------------------------------------------------------
    def begin(
        self,
        *,
        name: str,
        target: str,
        source: str = "",
        method: str = "",
        metadata: Mapping[str, Any] | None = None,
        created: str | None = None,
    ) -> PackageWriter:
        """Start the package: model ``name``, ``target`` (e.g. ``"ort-cpu"``), where the model
        came from (``source``), its compression ``method``, free-form JSON ``metadata``, and
        ``created`` (ISO 8601 UTC; default now; fix it for reproducible packages)."""
        self._require("begin", "new")
        model = ModelInfo(
            _text(name, "begin(name)", allow_empty=False),
            _text(source, "begin(source)"),
            _text(method, "begin(method)"),
        )
        if created is None:
            created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._info = {
            "model": model,
            "target": _text(target, "begin(target)", allow_empty=False),
            "metadata": _check_json(metadata, "begin(metadata)"),
            "created": _text(created, "begin(created)"),
        }
        if os.path.lexists(self.out_dir) and not self.overwrite:
            raise PackageError(
                f"{self.out_dir} already exists; pass overwrite=True to replace it, or choose "
                "another out_dir"
            )
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_sibling(self.out_dir, "tmp")
            tmp.mkdir()
        except OSError as exc:
            raise PackageError(
                f"cannot create a package next to {self.out_dir} ({exc}); check the path and "
                "permissions"
            ) from None
        self._tmp = tmp
        self.state = "open"
        return self

    def _new_name(self, name: Any, what: str) -> str:
        name = check_path(name, what)
        if name == MANIFEST_NAME:
            raise PackageError(
                f"{what}: {MANIFEST_NAME!r} is written by finish(); choose another name"
            )
        check_names([*self._files, name], f"{what} {name!r}")
        return name

    def add_file(
        self,
        name: str,
        source: bytes | bytearray | memoryview | str | os.PathLike[str],
        *,
        role: str,
    ) -> FileEntry:
        """Add a file: ``source`` is its content (bytes-like) or a path to copy.

        Args:
            name: relative path inside the package (``[A-Za-z0-9._-]`` components).
            source: bytes-like content, or a ``str``/``os.PathLike`` path of a file to copy.
            role: ``"graph"`` (exactly one per package), ``"variant"``, ``"weights"`` or
                ``"aux"``.
        """
        self._require("add_file", "open")
        if role not in ("graph", "variant", "weights", "aux"):
            raise PackageError(
                f"add_file({name!r}): role must be 'graph', 'variant', 'weights' or 'aux', "
                f"found {role!r} "
                "(block and golden files are written by add_blocks() and add_golden())"
            )
        name = self._new_name(name, "add_file")
        if len(self._files) >= MAX_FILES - 3:
            raise PackageError(f"add_file: a package holds at most {MAX_FILES} files")
        if name == BLOCK_FILE or name in (GOLDEN_INPUTS, GOLDEN_OUTPUTS):
            raise PackageError(
                f"add_file: {name!r} is reserved for add_blocks()/add_golden(); choose another name"
            )
        if role == "graph" and any(e.role == "graph" for e in self._files.values()):
            graph = next(n for n, e in self._files.items() if e.role == "graph")
            raise PackageError(
                f"add_file({name!r}): the package already has a graph file, {graph!r}; a package "
                "holds exactly one graph"
            )
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise PackageError(f"add_file({name!r}): source {path} is not a file")
            content: Any = path
        else:
            try:
                content = memoryview(source).cast("B")
            except TypeError:
                raise PackageError(
                    f"add_file({name!r}): source must be bytes-like or a path, found "
                    f"{type(source).__name__}"
                ) from None
        with self._guard():
            assert self._tmp is not None
            out = _HashingFile(self._tmp / name)
            try:
                if isinstance(content, Path):
                    with open(content, "rb") as f:
                        while chunk := f.read(_CHUNK):
                            out.write(chunk)
                else:
                    for i in range(0, len(content), _CHUNK):
                        out.write(content[i : i + _CHUNK])
            except BaseException:
                out.discard()
                raise
            size, digest = out.close()
        entry = FileEntry(name, size, digest, role)
        self._files[name] = entry
        return entry

    def add_blocks(
        self,
        order: Sequence[tuple[str, int]],
        blocks: Mapping[str, Any],
        *,
        layer_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> list[Any]:
        """Write ``blocks.bin``: every block of every layer, in the global ``order``.

        Args:
            order: ``(layer, block)`` pairs, most important first; each layer's blocks must
                appear as 0, 1, 2, ... and every block exactly once.
            blocks: layer name -> :class:`~edgestack.formats.BitStackStack` (or any object
                with ``signs``, ``u``, ``v`` and ``shape`` in that layout).
            layer_attrs: optional JSON attributes per layer (e.g. the graph initializer names
                the runtime must feed), stored as ``layers[name].attrs``.

        Returns:
            The block records (offsets) in storage order.
        """
        self._require("add_blocks", "open")
        if self._layers:
            raise PackageError(
                "add_blocks() was already called; a package has one block file: pass every layer "
                "in one call"
            )
        from edgestack.errors import FormatError
        from edgestack.formats.bitstack import BitStackStack

        if not isinstance(blocks, Mapping) or not blocks:
            raise PackageError(
                "add_blocks: expected a non-empty mapping of layer name -> BitStackStack, found "
                f"{blocks!r:.60}"
            )
        attrs = dict(layer_attrs or {})
        unknown = set(attrs) - set(blocks)
        if unknown:
            raise PackageError(
                f"add_blocks: layer_attrs names unknown layers {sorted(unknown)[:5]}"
            )
        stacks: dict[str, Any] = {}
        layers: dict[str, LayerInfo] = {}
        for name, stack in blocks.items():
            _text(name, "add_blocks layer name", allow_empty=False)
            if len(getattr(stack, "shape", ())) > MAX_DIMS:
                raise PackageError(
                    f"add_blocks: layer {name!r} has {len(stack.shape)} dimensions; at most "
                    f"{MAX_DIMS} are supported"
                )
            try:
                stack = BitStackStack(
                    np.asarray(stack.signs),
                    np.asarray(stack.u),
                    np.asarray(stack.v),
                    tuple(stack.shape),
                )
            except AttributeError:
                raise PackageError(
                    f"add_blocks: layer {name!r}: expected a BitStackStack (signs, u, v, shape), "
                    f"found {type(stack).__name__}"
                ) from None
            except FormatError as exc:
                raise PackageError(f"add_blocks: layer {name!r}: {exc}") from None
            stacks[name] = stack
            layers[name] = LayerInfo(
                name, stack.shape, stack.rank, stack.n_blocks, "float16",
                MappingProxyType(_check_json(attrs.get(name), f"add_blocks layer_attrs[{name!r}]")),
            )
        total = sum(info.n_blocks for info in layers.values())
        if len(layers) > MAX_LAYERS or total > MAX_BLOCKS:
            raise PackageError(
                f"add_blocks: {len(layers)} layers with {total} blocks; a package holds at most "
                f"{MAX_LAYERS} layers and {MAX_BLOCKS} blocks: pack fewer blocks per layer"
            )
        records = layout_records(layers, list(order))
        dtype = np.dtype(FACTOR_DTYPES["float16"])
        with self._guard():
            assert self._tmp is not None
            out = _HashingFile(self._tmp / BLOCK_FILE)
            try:
                for rec in records:
                    st = stacks[rec.layer]
                    for offset, part in (
                        (rec.signs, st.signs[rec.block]),
                        (rec.u, st.u[rec.block].astype(dtype, copy=False)),
                        (rec.v, st.v[rec.block].astype(dtype, copy=False)),
                    ):
                        out.pad_to(offset)
                        out.write(np.ascontiguousarray(part))
                    if out.size != rec.end:  # pragma: no cover - layout_records guarantees it
                        raise InternalError(f"block {rec} ends at {out.size}")
            except BaseException:
                out.discard()
                raise
            size, digest = out.close()
        self._files[BLOCK_FILE] = FileEntry(BLOCK_FILE, size, digest, "blocks")
        self._layers = layers
        self._records = records
        return list(records)

    def set_tiers(self, tiers: Sequence[int | Mapping[str, int]]) -> list[Tier]:
        """Define the memory tiers, smallest first.

        Each tier is either a number of leading block records in storage order, or a
        ``{layer: n_blocks}`` mapping that must equal the per-layer counts of such a prefix.
        Tiers must strictly grow, every tier must hold at least one block of every layer, and
        the last tier must hold every block.

        Returns:
            The tiers (their ``total_bytes`` is completed by :meth:`finish`).
        """
        self._require("set_tiers", "open")
        if not self._records:
            raise PackageError(
                "set_tiers: no blocks were added; tiers apply to BitStack block files: call "
                "add_blocks() first, or skip set_tiers() for a package without blocks"
            )
        if isinstance(tiers, (str, bytes, Mapping)) or not isinstance(tiers, Sequence) or not tiers:
            raise PackageError(
                f"set_tiers: expected a non-empty list of tiers, found {tiers!r:.60}"
            )
        if len(tiers) > MAX_TIERS:
            raise PackageError(f"set_tiers: {len(tiers)} tiers; at most {MAX_TIERS} are allowed")
        counts: list[int] = []
        for i, tier in enumerate(tiers):
            if isinstance(tier, Mapping):
                bad = {
                    k: v
                    for k, v in tier.items()
                    if k not in self._layers
                    or isinstance(v, bool)
                    or not isinstance(v, int)
                    or v < 0
                }
                if bad:
                    raise PackageError(
                        f"set_tiers: tier {i} has unknown layers or bad counts "
                        f"{dict(list(bad.items())[:5])}"
                    )
                count = sum(tier.values())
            elif isinstance(tier, (int, np.integer)) and not isinstance(tier, bool):
                count = int(tier)
            else:
                raise PackageError(
                    f"set_tiers: tier {i}: expected a record count or a {{layer: n}} mapping, "
                    f"found {tier!r:.60}"
                )
            if not 1 <= count <= len(self._records):
                raise PackageError(
                    f"set_tiers: tier {i} holds {count} blocks; expected 1 to {len(self._records)}"
                )
            if counts and count <= counts[-1]:
                raise PackageError(
                    f"set_tiers: tier {i} holds {count} blocks, not more than tier {i - 1} "
                    f"({counts[-1]}); list tiers smallest first, each larger"
                )
            counts.append(count)
        if counts[-1] != len(self._records):
            raise PackageError(
                f"set_tiers: the last tier holds {counts[-1]} of {len(self._records)} blocks; the "
                f"last tier must hold every block: add a tier of {len(self._records)}"
            )
        result = tiers_for_counts(self._records, counts, self._layers, 0)
        for i, (tier, spec) in enumerate(zip(result, tiers, strict=True)):
            if isinstance(spec, Mapping):
                full = {name: int(spec.get(name, 0)) for name in self._layers}
                if full != dict(tier.blocks):
                    raise PackageError(
                        f"set_tiers: tier {i} {full} is not a prefix of the storage order: the "
                        f"first {counts[i]} blocks hold {dict(tier.blocks)}; choose counts that "
                        "match the order given to add_blocks(), or pass record counts"
                    )
            empty = [name for name, n in tier.blocks.items() if n == 0]
            if empty:
                raise PackageError(
                    f"set_tiers: tier {i} (first {counts[i]} blocks) holds no block of layers "
                    f"{empty[:5]}; every tier needs block 0 of every layer: make tier {i} larger, "
                    "or put every layer's block 0 earlier in the order"
                )
        self._counts = counts
        self.state = "tiered"
        return result

    def add_golden(
        self,
        inputs: Mapping[str, Any],
        outputs: Mapping[str, Any],
        *,
        tier: int | None = None,
        rtol: float = 1e-3,
        atol: float = 1e-4,
    ) -> Golden:
        """Store golden inputs and the outputs the graph gave for them at ``tier`` (default:
        the largest), for the on-device self-test, compared with ``rtol``/``atol``."""
        if self._records:
            self._require("add_golden", "tiered")
        else:
            self._require("add_golden", "open")
        n_tiers = len(self._counts) if self._records else 1
        tier = n_tiers - 1 if tier is None else tier
        ok = isinstance(tier, (int, np.integer)) and not isinstance(tier, bool)
        if not ok or not 0 <= tier < n_tiers:
            raise PackageError(
                f"add_golden: tier must be an integer in [0, {n_tiers - 1}], found {tier!r}"
            )
        for what, value in (("rtol", rtol), ("atol", atol)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not np.isfinite(value) or value < 0:
                raise PackageError(
                    f"add_golden: {what} must be a finite number >= 0, found {value!r}"
                )
        for name in (GOLDEN_INPUTS, GOLDEN_OUTPUTS):
            self._new_name(name, "add_golden")
        arrays = [self._golden_arrays(inputs, "inputs"), self._golden_arrays(outputs, "outputs")]
        entries = []
        with self._guard():
            assert self._tmp is not None
            for name, arrs in zip((GOLDEN_INPUTS, GOLDEN_OUTPUTS), arrays, strict=True):
                path = self._tmp / name
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_npz(path, arrs)
                entries.append(FileEntry(name, path.stat().st_size, _sha256_file(path), "golden"))
        for entry in entries:
            self._files[entry.name] = entry
        self._golden = Golden(GOLDEN_INPUTS, GOLDEN_OUTPUTS, int(tier), float(rtol), float(atol))
        self.state = "golden"
        return self._golden

    @staticmethod
    def _golden_arrays(values: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
        if not isinstance(values, Mapping) or not values:
            raise PackageError(f"add_golden: {what} must be a non-empty mapping of name -> array")
        out = {}
        for key, value in values.items():
            if not isinstance(key, str) or not key or len(key) > 200 or "\x00" in key:
                raise PackageError(
                    f"add_golden: {what} names must be non-empty strings of at most 200 "
                    f"characters, found {key!r:.60}"
                )
            arr = np.asarray(value)
            if arr.dtype.kind not in "biufc":
                raise PackageError(
                    f"add_golden: {what}[{key!r}] has dtype {arr.dtype}; golden arrays must be "
                    "numeric or bool (no objects or strings)"
                )
            out[key] = arr
        return out

    def finish(self) -> Path:
        """Write the manifest, self-check, and rename the package into place.

        Returns:
            ``out_dir``.
        """
        if self._records:
            self._require("finish", "tiered", "golden")
        else:
            self._require("finish", "open", "golden")
        graphs = [n for n, e in self._files.items() if e.role == "graph"]
        if not graphs:
            raise PackageError(
                "finish: the package has no graph file; add it with add_file(name, data, "
                "role='graph')"
            )
        from edgestack import __version__
        from edgestack.package.reader import Package

        with self._guard():
            assert self._tmp is not None
            loaded = sum(e.size for e in self._files.values() if e.role in ("graph", "weights"))
            counts = self._counts if self._records else [0]
            manifest = Manifest(
                model=self._info["model"],
                target=self._info["target"],
                files=MappingProxyType(dict(self._files)),
                layers=MappingProxyType(dict(self._layers)),
                block_index=tuple(self._records),
                tiers=tuple(tiers_for_counts(self._records, counts, self._layers, loaded)),
                golden=self._golden,
                created=self._info["created"],
                edgestack_version=__version__,
                metadata=MappingProxyType(self._info["metadata"]),
            )
            data = manifest.to_json_bytes()
            if len(data) > MAX_MANIFEST_BYTES:
                raise PackageError(
                    f"finish: the manifest would be {len(data)} bytes, more than the "
                    f"{MAX_MANIFEST_BYTES} allowed: use fewer blocks, layers or metadata"
                )
            out = _HashingFile(self._tmp / MANIFEST_NAME)
            out.write(data)
            out.close()
            try:
                with Package.open(self._tmp) as pkg:
                    if pkg.manifest != manifest:
                        raise InternalError("the manifest read back differs from the one written")
            except PackageError as exc:
                msg = f"PackageWriter wrote a package its reader refuses: {exc}"
                raise InternalError(msg) from exc
            replace_dir(self._tmp, self.out_dir, self.overwrite, "out_dir")
            self._tmp = None
            self.state = "finished"
        return self.out_dir


class _AbortOnError:
    """Context manager: an exception while writing discards the temporary directory."""

    def __init__(self, writer: PackageWriter) -> None:
        self.writer = writer

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.writer.abort()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``numpy.savez`` layout, stored members and a fixed timestamp: same arrays, same bytes."""
    with zipfile.ZipFile(path, "x", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


__all__ = ["PackageWriter", "replace_dir", "temp_sibling"]
