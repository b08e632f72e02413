"""The one output rule of every command that writes (docs/cli.md, "Outputs").

Checked by :func:`prepare_output` before any slow work, in this order:

1. an output is never an input, never inside an input (a package folder being read, a
   model folder), and an output folder that would be replaced never holds an input; paths
   are compared resolved (symlinks followed), and the input of ``file.py:factory`` is
   ``file.py``;
2. an output is of its kind: a file (``export``'s ``.onnx``, ``run --output``, ``quality
   --out``) is not a folder; a package (``pack``, ``compile``) is a folder or a ``.tar``
   file; an output folder (``bench``, ``demo``) is a folder; and what an output replaces
   is what the command wrote earlier: an ONNX file (checked by the exporter), a package
   folder (``manifest.json``) or an empty folder, an output folder holding the command's
   marker file (``bench.json``, ``report.json``) or nothing;
3. an existing output is replaced only with ``--overwrite``;
4. the output's folder can be written (a probe folder is made and removed in it, or in the
   nearest existing folder above it: missing folders are created when the output is
   written, so a failed run leaves none behind).

The folder is then swept of the leftovers of killed runs
(:func:`edgestack.core.atomic.sweep`). Every violation is an :class:`EdgestackError`: one
line, exit 2.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from edgestack.core import atomic
from edgestack.errors import EdgestackError

KINDS = ("file", "onnx", "package", "folder")
"""What an output is: one file, an ONNX file (with its external data), a package (folder or
``.tar``), or a folder of results."""

MANIFEST = "manifest.json"  # edgestack.package.format.MANIFEST_NAME (a test keeps them equal)


def input_paths(specs: Iterable[str | os.PathLike[str] | None]) -> Iterator[Path]:
    """The existing paths among a command's inputs: each given path, or the file of a
    ``file.py:factory`` source (built-in names and module names are no paths)."""
    for spec in specs:
        if spec is None or str(spec) == "":
            continue
        text = str(spec)
        if os.path.lexists(text):
            yield Path(text)
        elif ":" in text:
            module = text.rpartition(":")[0]
            if module.endswith(".py") and os.path.lexists(module):
                yield Path(module)


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and child.is_relative_to(parent)


def _check_inputs(path: Path, given: str, inputs: Iterable[str | os.PathLike[str] | None],
                  kind: str, flag: str) -> None:
    out = path.resolve()
    for inp in input_paths(inputs):
        res = inp.resolve()
        if out == res:
            raise EdgestackError(f"{flag} {given} is the input {inp}; an input is never "
                                 "overwritten: choose another path for the output")
        if _inside(out, res):
            raise EdgestackError(f"{flag} {given} is inside the input {inp}; an input is "
                                 "never written into: choose a path outside it")
        if kind in ("package", "folder") and _inside(res, out):
            raise EdgestackError(f"{flag} {given} holds the input {inp}; replacing it would "
                                 "delete the input: choose another path for the output")


def _check_kind(path: Path, given: str, kind: str, flag: str, marker: str | None) -> None:
    """What an existing output is, and whether the command may replace it."""
    never = "refusing to replace it even with --overwrite: choose a new path"
    if kind in ("file", "onnx") or (kind == "package" and path.suffix == ".tar"):
        if path.is_dir():
            example = "PKG.tar" if kind == "package" else "model.onnx" if kind == "onnx" \
                else "NAME"
            raise EdgestackError(f"{flag} {given} is a folder; expected the path of a file "
                                 f"(e.g. {path / example})")
        if not path.is_file():
            raise EdgestackError(f"{flag} {given} exists and is not a regular file; {never}")
        return
    if not path.is_dir():
        what = "a package folder" if kind == "package" else "an output folder"
        raise EdgestackError(f"{flag} {given} exists and is a file, not {what}; {never}")
    try:
        entries = {e.name for e in os.scandir(path)}
    except OSError as exc:
        raise EdgestackError(f"{flag} {given}: cannot read the folder ({exc.strerror or exc}); "
                             "choose another path") from None
    own = MANIFEST if kind == "package" else marker
    if entries and (own is None or own not in entries):
        what = ("a package (no manifest.json)" if kind == "package"
                else f"an earlier output of this command (no {own})")
        raise EdgestackError(f"{flag} {given} exists and is neither {what} nor empty; {never}")


def prepare_output(out: str | os.PathLike[str],
                   inputs: Iterable[str | os.PathLike[str] | None] = (), *,
                   overwrite: bool = False, kind: str = "file", flag: str = "--out",
                   marker: str | None = None) -> Path:
    """Check ``out`` by the one output rule (module docstring) before any slow work.

    Args:
        out: the output path given.
        inputs: the command's inputs (paths, model sources; ``None`` skipped).
        overwrite: ``--overwrite`` was given.
        kind: one of :data:`KINDS`.
        flag: the option that named ``out``, for messages.
        marker: ``kind="folder"``: the file an earlier output of the command holds.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        EdgestackError: the output breaks the rule; the message says which part and how to
            fix it.
    """
    if kind not in KINDS:  # pragma: no cover - a caller's bug
        raise ValueError(f"kind must be one of {KINDS}, found {kind!r}")
    given = os.fspath(out)
    if not given.strip():
        raise EdgestackError(f"{flag} is empty; expected a path")
    path = Path(given)
    folder = Path(os.path.abspath(given)).parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise EdgestackError(f"{flag} {given}: {folder} is a file, not a folder; choose a path "
                             "in a folder")
    _check_inputs(path, given, inputs, kind, flag)
    if os.path.lexists(path):
        _check_kind(path, given, kind, flag, marker)
        if not overwrite:
            raise EdgestackError(f"{flag} {given} already exists; pass --overwrite to replace "
                                 "it, or choose another path")
    try:
        atomic.check_writable(folder)
    except OSError as exc:
        raise EdgestackError(f"{flag} {given}: cannot write in {folder} "
                             f"({exc.strerror or exc}); choose a path in a writable folder"
                             ) from None
    atomic.sweep(folder)
    return path


__all__ = ["prepare_output", "input_paths", "KINDS"]
