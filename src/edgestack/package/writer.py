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
:meth:`PackageWriter.finish` writes ``manifest.json`` (after parsing its bytes with the reader's
parser: a manifest the reader would refuse is never written), fsyncs, and renames the
directory to ``out_dir``. An existing ``out_dir`` is
refused unless ``overwrite=True``, and even then only if it is a package directory (it has a
``manifest.json``) or an empty directory: the two folders are exchanged in one step and the
old one deleted (:func:`replace_dir`), so a kill at any instant leaves the old package or the
new one. A process killed mid-write leaves only the hidden temporary directory, which the next
run removes (:mod:`edgestack.core.atomic`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgestack import __version__
from edgestack.core import atomic
from edgestack.errors import FormatError, PackageError
from edgestack.formats.bitstack import BitStackStack
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
    MAX_STRING,
    MAX_TIERS,
    BlockRecord,
    FileEntry,
    Golden,
    LayerGraph,
    LayerInfo,
    Manifest,
    ModelInfo,
    RuntimeInfo,
    Tier,
    check_names,
    check_path,
    derive_tiers,
    layout_records,
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

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """An exception inside aborts the writer (the temporary directory goes)."""
        try:
            yield
        except BaseException:
            self.abort()
            raise

    def _write(self, name: str, chunks: Iterable[Any], role: str) -> FileEntry:
        """Write the bytes-like ``chunks`` as the package file ``name``, computing its size
        and sha256 on the way, and list it."""
        assert self._tmp is not None
        path = self._tmp / name
        digest, size = hashlib.sha256(), 0
        with self._guard():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as f:
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    f.write(view)
                    digest.update(view)
                    size += len(view)
                f.flush()
                os.fsync(f.fileno())
        self._files[name] = FileEntry(name, size, digest.hexdigest(), role)
        return self._files[name]

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
        runtime: RuntimeInfo | None = None,
    ) -> PackageWriter:
        """Start the package: model ``name``, ``target`` (e.g. ``"ort-cpu"``), where the model
        came from (``source``), its compression ``method``, free-form JSON ``metadata``,
        ``created`` (ISO 8601 UTC; default now; fix it for reproducible packages), and what the
        runtime needs (:class:`~.format.RuntimeInfo`, the packer's)."""
        self._require("begin", "new")
        if runtime is not None and not isinstance(runtime, RuntimeInfo):
            raise PackageError(f"begin(runtime): expected a RuntimeInfo, found "
                               f"{type(runtime).__name__}")
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
            "runtime": runtime or RuntimeInfo(),
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
            role: ``"graph"`` (exactly one per package), ``"variant"``, ``"weights"``,
                ``"tokenizer"`` or ``"aux"``.
        """
        self._require("add_file", "open")
        if role not in ("graph", "variant", "weights", "tokenizer", "aux"):
            raise PackageError(
                f"add_file({name!r}): role must be 'graph', 'variant', 'weights', 'tokenizer' "
                f"or 'aux', "
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
            if not Path(source).is_file():
                raise PackageError(f"add_file({name!r}): source {source} is not a file")
            return self._write(name, _file_chunks(Path(source)), role)
        try:
            content = memoryview(source).cast("B")
        except TypeError:
            raise PackageError(f"add_file({name!r}): source must be bytes-like or a path, "
                               f"found {type(source).__name__}") from None
        return self._write(name, (content[i:i + _CHUNK] for i in range(0, len(content), _CHUNK)),
                           role)

    def add_blocks(
        self,
        order: Sequence[tuple[str, int]],
        blocks: Mapping[str, Any],
        *,
        graphs: Mapping[str, LayerGraph] | None = None,
    ) -> list[BlockRecord]:
        """Write ``blocks.bin``: every block of every layer, in the global ``order``.

        Args:
            order: ``(layer, block)`` pairs, most important first; each layer's blocks must
                appear as 0, 1, 2, ... and every block exactly once.
            blocks: layer name -> :class:`~edgestack.formats.BitStackStack` (or any object
                with ``signs``, ``u``, ``v`` and ``shape`` in that layout).
            graphs: per layer, how the graph uses it (:class:`~.format.LayerGraph`, the
                packer-runtime contract), stored as ``layers[name].graph``.

        Returns:
            The block records (offsets) in storage order.
        """
        self._require("add_blocks", "open")
        if self._layers:
            raise PackageError(
                "add_blocks() was already called; a package has one block file: pass every layer "
                "in one call"
            )
        if not isinstance(blocks, Mapping) or not blocks:
            raise PackageError(
                "add_blocks: expected a non-empty mapping of layer name -> BitStackStack, found "
                f"{blocks!r:.60}"
            )
        graphs = dict(graphs or {})
        unknown = set(graphs) - set(blocks)
        bad = [n for n, g in graphs.items() if not isinstance(g, LayerGraph)]
        if unknown or bad:
            raise PackageError(f"add_blocks: graphs must map layers of blocks to LayerGraph; "
                               f"unknown layers {sorted(unknown)[:5]}, not a LayerGraph {bad[:5]}")
        stacks: dict[str, BitStackStack] = {}
        layers: dict[str, LayerInfo] = {}
        for name, stack in blocks.items():
            _text(name, "add_blocks layer name", allow_empty=False)
            try:
                if len(stack.shape) > MAX_DIMS:
                    raise FormatError(f"{len(stack.shape)} dimensions; at most {MAX_DIMS} are "
                                      "supported")
                stack = BitStackStack(np.asarray(stack.signs), np.asarray(stack.u),
                                      np.asarray(stack.v), tuple(stack.shape))
            except AttributeError:
                raise PackageError(
                    f"add_blocks: layer {name!r}: expected a BitStackStack (signs, u, v, shape), "
                    f"found {type(stack).__name__}"
                ) from None
            except FormatError as exc:
                raise PackageError(f"add_blocks: layer {name!r}: {exc}") from None
            stacks[name] = stack
            layers[name] = LayerInfo(name, stack.shape, stack.rank, stack.n_blocks, "float16",
                                     graphs.get(name))
        total = sum(info.n_blocks for info in layers.values())
        if len(layers) > MAX_LAYERS or total > MAX_BLOCKS:
            raise PackageError(
                f"add_blocks: {len(layers)} layers with {total} blocks; a package holds at most "
                f"{MAX_LAYERS} layers and {MAX_BLOCKS} blocks: pack fewer blocks per layer"
            )
        try:
            records = layout_records(layers, list(order))
        except PackageError as exc:
            raise PackageError(f"add_blocks: {exc}") from None
        dtype = np.dtype(FACTOR_DTYPES["float16"])
        digests: list[str] = []

        def parts() -> Iterator[Any]:   # every part at its offset, zero bytes between
            pos = 0
            for rec in records:        # a record's span: the padding before it, then it
                st = stacks[rec.layer]
                span = hashlib.sha256()
                for offset, part in ((rec.signs, st.signs[rec.block]),
                                     (rec.u, st.u[rec.block].astype(dtype, copy=False)),
                                     (rec.v, st.v[rec.block].astype(dtype, copy=False))):
                    gap, data = bytes(offset - pos), np.ascontiguousarray(part)
                    span.update(gap)
                    span.update(data)
                    yield gap
                    yield data
                    pos = offset + part.nbytes
                digests.append(span.hexdigest())

        self._write(BLOCK_FILE, parts(), "blocks")
        self._layers = layers
        self._records = [replace(r, sha256=h) for r, h in zip(records, digests, strict=True)]
        return self._records

    def set_tiers(self, tiers: Sequence[int]) -> tuple[Tier, ...]:
        """Define the memory tiers, smallest first: each is how many leading block records
        (in storage order) it loads. Tiers must strictly grow, the first must hold a block of
        every layer, and the last every block.

        Returns:
            The tiers (their ``total_bytes`` counts the files added so far).
        """
        self._require("set_tiers", "open")
        if not self._records:
            raise PackageError(
                "set_tiers: no blocks were added; tiers apply to BitStack block files: call "
                "add_blocks() first, or skip set_tiers() for a package without blocks"
            )
        ok = isinstance(tiers, Sequence) and not isinstance(tiers, (str, bytes)) and tiers
        counts = [int(t) for t in tiers if isinstance(t, (int, np.integer))
                  and not isinstance(t, bool)] if ok else []
        if not counts or len(counts) != len(tiers) or len(counts) > MAX_TIERS:
            raise PackageError(f"set_tiers: expected a list of 1 to {MAX_TIERS} record counts, "
                               f"found {tiers!r:.60}")
        try:
            result = derive_tiers(self._layers, self._records, counts, 0)
        except PackageError as exc:
            raise PackageError(f"set_tiers: {exc}") from None
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
        for name, arrs in zip((GOLDEN_INPUTS, GOLDEN_OUTPUTS), arrays, strict=True):
            self._write(name, [_npz_bytes(arrs)], "golden")
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
        with self._guard():
            assert self._tmp is not None
            try:
                manifest = Manifest(
                    model=self._info["model"], target=self._info["target"],
                    files=dict(self._files), layers=dict(self._layers),
                    order=tuple(rec.layer for rec in self._records),
                    block_sha256=tuple(rec.sha256 for rec in self._records),
                    tier_records=tuple(self._counts) if self._records else (0,),
                    golden=self._golden, created=self._info["created"],
                    edgestack_version=__version__, runtime=self._info["runtime"],
                    metadata=self._info["metadata"])
                data = manifest.to_json_bytes()
                # the reader's own parse: a package it would refuse is never written
                Manifest.from_bytes(data, "PackageWriter.finish")
            except PackageError as exc:
                raise PackageError(f"finish: the manifest would be refused: {exc}") from None
            with open(self._tmp / MANIFEST_NAME, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            replace_dir(self._tmp, self.out_dir, self.overwrite, "out_dir")
            self._tmp = None
            self.state = "finished"
        return self.out_dir


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``numpy.savez`` layout, stored members and a fixed timestamp: same arrays, same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


__all__ = ["PackageWriter", "replace_dir", "temp_sibling"]
