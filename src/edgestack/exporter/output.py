"""The files ``export()`` writes, and how they replace an earlier export.

An export is one ``.onnx`` file, plus, when its initializers are stored externally, one data
file named after the ``.onnx`` file and the sha256 of its bytes::

    model.onnx
    model.onnx.<first 12 hex digits of the data's sha256>.data

The data file's name is the one only this version of ``model.onnx`` refers to, so a new
export never writes over the data file the current ``model.onnx`` reads. It is installed
from a staging folder beside ``out`` (:func:`edgestack.core.atomic.install`): the new data
file is renamed into the folder (nothing refers to it yet), the new ``.onnx`` renamed over the
old one (one atomic step: from here on the new pair is whole), and then the old data file is
deleted. A kill at any instant leaves the old pair or the new one whole; the next run deletes
the unused side from the staging folder's journal. (A fixed name such as ``model.onnx.data``
cannot be replaced together with its ``.onnx`` by renames: between the two, the old graph
would read the new data.) Exporting the same weights again gives the same name and bytes.

Replacing: an existing ``out`` is replaced only with ``overwrite=True``, only if it is a
regular file that reads as ONNX (an earlier export, never a user's other file), and only its
own data files are deleted: files it refers to that are named ``<out>.data`` (earlier
versions) or ``<out>.<12 hex>.data``. A file of that name that the old ``out`` does not refer
to is someone else's (``echo notes > model.onnx.data`` is kept); an export that would need
its name is refused, naming it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from edgestack.core import atomic
from edgestack.errors import ExportError

DATA_DIGITS = 12
"""Hex digits of the data file's sha256 in its name."""

_CHUNK = 1 << 20


def data_name(out_name: str, digest: str) -> str:
    """The name of the data file of ``out_name`` whose bytes have sha256 ``digest``."""
    return f"{out_name}.{digest[:DATA_DIGITS]}.data"


def is_data_name(out_name: str, name: str) -> bool:
    """Whether ``name`` is a data file name an export of ``out_name`` writes (or, as
    ``<out_name>.data``, an earlier version wrote)."""
    return re.fullmatch(re.escape(out_name) + rf"(\.[0-9a-f]{{{DATA_DIGITS}}})?\.data",
                        name) is not None


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor of ``graph`` and its subgraphs that may hold external data."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _external(model: Any) -> Iterator[Any]:
    """The location entries of every external tensor of ``model``."""
    for t in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    yield entry


def external_files(path: str | os.PathLike[str]) -> list[str]:
    """The external data files the ONNX file ``path`` refers to (relative locations, sorted,
    each once); the data is not read.

    Raises:
        ExportError: ``path`` is not a readable ONNX file.
    """
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        why = " ".join(str(exc).split())[:160]
        raise ExportError(f"export: cannot read {path} as ONNX ({type(exc).__name__}: {why})"
                          ) from None
    return sorted({e.value for e in _external(model)})


def replaced_files(out: Path, overwrite: bool) -> list[str]:
    """Check that ``out`` may be written, before any slow work; the names of the data files
    of the existing ``out`` that a new export deletes (see the module docstring).

    Raises:
        ExportError: ``out`` exists and ``overwrite`` is false, or it is not a regular file
            that reads as ONNX.
    """
    if not os.path.lexists(out):
        return []
    if out.is_dir():
        raise ExportError(f"export: {out} is a folder; expected the path of an .onnx file "
                          f"(e.g. {out / 'model.onnx'})")
    if not overwrite:
        raise ExportError(f"export: {out} already exists; pass --overwrite (overwrite=True) to "
                          "replace it, or choose another path")
    if out.is_symlink() or not out.is_file():
        raise ExportError(f"export: {out} exists and is not a regular file; refusing to replace "
                          "it even with --overwrite: choose a new path")
    try:
        names = external_files(out)
    except ExportError:
        raise ExportError(f"export: {out} exists and is not an ONNX file; refusing to replace "
                          "it even with --overwrite (only an earlier export is replaced): "
                          "choose a new path") from None
    return [n for n in names if is_data_name(out.name, n)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def install(staging: Path, out: Path, saved_data: str | None, overwrite: bool) -> Path | None:
    """Move the export saved in ``staging`` (``staging / out.name``, with its external data
    in ``staging / saved_data`` if any) to ``out``, replacing an earlier export there (see
    the module docstring). Returns the data file's final path, or None.

    Raises:
        ExportError: as :func:`replaced_files`, or a file that is not ``out``'s own has the
            data file's name.
    """
    old = replaced_files(out, overwrite)
    staged = staging / out.name
    companions: list[str] = []
    model = onnx.load(str(staged), load_external_data=False) if saved_data else None
    entries = list(_external(model)) if model is not None else []
    if saved_data is not None and (staging / saved_data).exists() and entries:
        digest = _sha256(staging / saved_data)
        name = data_name(out.name, digest)
        for entry in entries:
            entry.value = name
        onnx.save(model, str(staged))
        os.rename(staging / saved_data, staging / name)
        target = out.parent / name
        if os.path.lexists(target) and name not in old and (
                not target.is_file() or _sha256(target) != digest):
            raise ExportError(
                f"export: {target} exists and is not a data file of {out}; the export's data "
                "file needs its name: move it away or remove it, then export again")
        companions.append(name)
    atomic.install(staging, out.name, companions, old)
    return out.parent / companions[0] if companions else None


__all__ = ["data_name", "is_data_name", "external_files", "replaced_files", "install",
           "DATA_DIGITS"]
