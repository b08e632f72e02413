"""Outputs that are whole or absent: temporary names, swaps, the leftovers of killed runs, and
the fault hook the kill tests use.

**Names.** Whatever edgestack writes before it is complete carries a name that says who wrote
it and what it is::

    .edgestack-<kind>-<pid>-<8 hex>[-<destination name>]

Scratch folders in the system temporary folder (``tempfile.gettempdir()``; kinds ``pack``,
``pipeline``, ``compile``, ``rt``, ``dense``, ...) have no destination; temporary siblings
of an output (same folder, so a rename is atomic) name it: ``tmp`` (a new output being
written), ``old`` (an old package moved aside where the file system cannot exchange two
folders), ``swap`` (export's staging folder with its journal) and ``probe`` (a writability
check). :func:`sibling` and :func:`temp_dir` make such names.

**Swaps.** One file is replaced with one ``rename`` (:func:`replace_file`). A package folder is
swapped with ``renameat2(RENAME_EXCHANGE)`` (:func:`exchange`, Linux 3.15+ on ext4, xfs,
btrfs, tmpfs, ...): one system call after which the destination is the new folder and the
temporary name holds the old one, deleted next; a kill at any instant leaves the old package
or the new one at the destination. Where the exchange is not supported the old folder is
renamed aside first (``old``), and a kill between the two renames leaves the destination
missing until the next run puts the old package back (:func:`sweep`). Files that belong
together (an ONNX model and its external data) are installed by :func:`install` from a
staging folder with a journal; see there.

**Leftovers.** :func:`sweep` removes, in one folder, the entries of processes that are no
longer running (the pid in the name is not alive): ``tmp``, ``probe`` and scratch folders
are deleted, an ``old`` folder is put back when its destination is missing (else deleted),
and a ``swap`` folder is finished or rolled back from its journal. Entries of live
processes are never touched (pids are this pid namespace's: two containers writing into one
shared folder at the same moment do not see each other's processes). Scratch folders of
earlier edgestack versions, which had no pid in their names (``.edgestack-pack-XXXXXXXX``,
``edgestack-rt-XXXXXXXX``, ...), and their temporary siblings (``.NAME.tmp-XXXXXXXX``,
``.NAME.old-XXXXXXXX``) are removed (an ``old`` one put back) once a day old. Every writer
sweeps the folders it writes into, once per process, before it starts.

**Fault injection.** ``EDGESTACK_FAULT=<op>:<n>[:raise]`` (``op`` is ``rename`` or
``remove``) kills the process with SIGKILL just before its ``n``-th rename (every
:func:`rename`, :func:`replace_file`, :func:`exchange`) or removal of a replaced output
(:func:`remove`); with ``:raise`` it raises ``OSError(EIO)`` there instead. Tests use it to
kill ``export``, ``compile`` and ``pack`` at every step of their swaps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from edgestack.errors import EdgestackError

PREFIX = ".edgestack-"
"""Start of the name of everything :mod:`edgestack.core.atomic` names."""

JOURNAL = "journal.json"
"""The journal of a ``swap`` staging folder (:func:`install`)."""

LEGACY_AGE_S = 24 * 3600
"""Leftovers of earlier versions (no pid in the name) are removed when older than this."""

FAULT_ENV = "EDGESTACK_FAULT"
"""The fault-injection variable (see the module docstring)."""

_NAME = re.compile(r"^\.edgestack-(?P<kind>[a-z0-9]+)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})"
                   r"(?:-(?P<dest>.+))?$")
_LEGACY_SCRATCH = re.compile(r"^\.?edgestack-(?:pack|pipeline|compile|rt|dense|parity|arm)-"
                             r"[A-Za-z0-9_]{8}$")
_LEGACY_SIBLING = re.compile(r"^\.(?P<dest>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")
_MAX_DEST = 200  # longer destination names are left out of sibling names (NAME_MAX is 255)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_swept: set[str] = set()
_faults: dict[str, int] = {}


# ---- fault injection -----------------------------------------------------------------------
def _fault(op: str) -> None:
    """Count one ``op`` and, when ``EDGESTACK_FAULT`` names this one, die or raise."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    ok = (len(parts) in (2, 3) and parts[0] in ("rename", "remove") and parts[1].isdigit()
          and (len(parts) == 2 or parts[2] in ("kill", "raise")))
    if not ok:
        raise EdgestackError(f"{FAULT_ENV}={spec!r}: expected OP:N or OP:N:raise with OP "
                             "rename or remove (a test hook); unset it")
    _faults[op] = _faults.get(op, 0) + 1
    if parts[0] != op or _faults[op] != int(parts[1]):
        return
    if len(parts) == 3 and parts[2] == "raise":
        raise OSError(errno.EIO, f"{FAULT_ENV}: injected fault at {op} {parts[1]}")
    os.kill(os.getpid(), signal.SIGKILL)  # pragma: no cover - the process ends here


# ---- names ---------------------------------------------------------------------------------
def _name(kind: str, dest: str | None = None) -> str:
    name = f"{PREFIX}{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    return name if dest is None or len(dest) > _MAX_DEST else f"{name}-{dest}"


def sibling(dest: str | os.PathLike[str], kind: str = "tmp") -> Path:
    """A fresh temporary name next to ``dest`` (same folder: renames are atomic); nothing is
    created. Sweeps the folder's leftovers first (once per process)."""
    dest = Path(dest)
    sweep(dest.parent)
    return dest.parent / _name(kind, dest.name)


def temp_dir(kind: str, parent: str | os.PathLike[str] | None = None) -> Path:
    """Create a scratch folder ``.edgestack-<kind>-<pid>-<hex>`` in ``parent`` (default: the
    system temporary folder), after sweeping that folder's leftovers (once per process)."""
    folder = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep(folder)
    for _ in range(100):
        path = folder / _name(kind)
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))  # pragma: no cover


@contextlib.contextmanager
def scratch(kind: str) -> Iterator[Path]:
    """:func:`temp_dir` as a context manager that deletes the folder on exit."""
    path = temp_dir(kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Create and remove a ``probe`` folder in ``folder``: the write an output will need.

    Raises:
        OSError: ``folder`` cannot be written (read-only, no permission, ``/proc``, ...).
    """
    path = Path(folder) / _name("probe")
    path.mkdir()
    path.rmdir()


# ---- liveness and leftovers ----------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (a pid we may not signal counts as running)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # pragma: no cover - be safe: never delete what might be in use
        return True
    return True


def _delete(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _restore_or_delete(path: Path, dest: Path) -> str:
    if dest.name and not os.path.lexists(dest):
        os.rename(path, dest)
        return f"restored {dest}"
    _delete(path)
    return f"removed {path}"


def _settle_swap(path: Path, dest: str | None) -> str:
    """Finish or roll back a dead process's :func:`install` from its journal."""
    try:
        journal = json.loads((path / JOURNAL).read_text(encoding="utf-8"))
        main, created, old = journal["main"], journal["created"], journal["old"]
        if not (isinstance(main, str) and isinstance(created, list) and isinstance(old, list)):
            raise ValueError("bad journal")
    except (OSError, ValueError, KeyError, TypeError):
        _delete(path)  # no (complete) journal: the install had not started
        return f"removed {path}"
    folder = path.parent
    done = not (path / main).exists()       # the main file was renamed into place
    stale = old if done else created        # the side the destination no longer uses
    keep = set(created if done else old)
    for name in stale:
        if name not in keep and _plain(name):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (folder / name).unlink()
    _delete(path)
    return f"{'finished' if done else 'rolled back'} the swap of {folder / main}"


def _plain(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name \
        and "\\" not in name


def sweep(folder: str | os.PathLike[str], *, again: bool = False) -> list[str]:
    """Clean up the leftovers of killed runs in ``folder`` (see the module docstring); once per
    process and folder unless ``again``. Never raises; returns what it did."""
    folder = Path(folder)
    key = os.path.abspath(folder)
    if key in _swept and not again:
        return []
    _swept.add(key)
    done: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return done
    now = time.time()
    for entry in entries:
        name = entry.name
        try:
            m = _NAME.match(name)
            if m is not None:
                if pid_alive(int(m["pid"])):
                    continue
                path = Path(entry.path)
                kind, dest = m["kind"], m["dest"]
                if kind == "old" and dest:
                    done.append(_restore_or_delete(path, folder / dest))
                elif kind == "swap":
                    done.append(_settle_swap(path, dest))
                else:
                    _delete(path)
                    done.append(f"removed {path}")
                continue
            legacy = _LEGACY_SCRATCH.match(name) or _LEGACY_SIBLING.match(name)
            if legacy is None or now - entry.stat(follow_symlinks=False).st_mtime < LEGACY_AGE_S:
                continue
            path = Path(entry.path)
            if legacy.re is _LEGACY_SIBLING and legacy["kind"] == "old":
                done.append(_restore_or_delete(path, folder / legacy["dest"]))
            else:
                _delete(path)
                done.append(f"removed {path}")
        except OSError:
            continue
    return done


# ---- the steps of a swap -------------------------------------------------------------------
def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (renames in it) to disk, where the platform can."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``os.rename`` (a fault point)."""
    _fault("rename")
    os.rename(src, dst)


def replace_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``os.replace`` of a file, then flush the folder (a fault point)."""
    _fault("rename")
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a replaced output (a file or a folder; a fault point)."""
    _fault("remove")
    _delete(Path(path))


_renameat2: Callable[..., int] | None | bool = False  # False: not looked up yet


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two existing paths of one file system in one step (``renameat2`` with
    ``RENAME_EXCHANGE``; a fault point). Returns False, changing nothing, where the platform
    or file system cannot (the caller falls back to two renames)."""
    global _renameat2
    if _renameat2 is False:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError, TypeError):  # pragma: no cover - not glibc/Linux
            _renameat2 = None
    if _renameat2 is None:  # pragma: no cover
        return False
    _fault("rename")
    assert callable(_renameat2)
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # pragma: no cover
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished folder ``tmp`` (a sibling of ``dest``) at ``dest``, replacing what is
    there (the caller decided it may): an exchange, then the old folder deleted; a kill at any
    instant leaves the old folder or the new one at ``dest`` (see the module docstring)."""
    fsync_dir(tmp)
    if not os.path.lexists(dest):
        rename(tmp, dest)
    elif exchange(tmp, dest):
        fsync_dir(dest.parent)
        remove(tmp)                         # the old folder, under the temporary name
    else:  # pragma: no cover - file systems without RENAME_EXCHANGE
        old = sibling(dest, "old")
        rename(dest, old)
        try:
            rename(tmp, dest)
        except BaseException:
            os.rename(old, dest)
            raise
        fsync_dir(dest.parent)
        remove(old)
    fsync_dir(dest.parent)


def write_file(dest: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write one output file whole or not at all: ``write(f)`` fills a temporary sibling
    (parents of ``dest`` are created), which is flushed and renamed over ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(dest, "tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


def install(staging: Path, main: str, companions: Sequence[str], old: Sequence[str]) -> None:
    """Install files that belong together from the ``swap`` folder ``staging`` (a
    :func:`sibling` of the destination ``staging.parent / main``).

    ``main`` (the file that refers to the others, e.g. ``model.onnx``) and its
    ``companions`` (e.g. its external data, under names that no other version of ``main``
    uses) are in ``staging``; ``old`` are the files the current ``main`` refers to, deleted
    once the new ``main`` is in place. The steps, each atomic::

        1. write the journal (what is created, what is old) into staging
        2. rename each companion into the folder    (the current main does not refer to it)
        3. rename main over the current main        (the new set is whole from here on)
        4. delete the old files                     (no main refers to them)
        5. delete the staging folder

    A kill before step 3 leaves the old set whole (plus new companions nobody refers to), a
    kill after it the new set whole (plus old files nobody refers to); :func:`sweep` of the
    next run reads the journal, sees whether ``main`` is still in staging, and deletes the
    side that is not in use. An exception does the same at once, then propagates.
    """
    folder = staging.parent
    created = [c for c in companions if not os.path.lexists(folder / c)]
    journal = {"main": main, "created": created, "old": [o for o in old if o not in companions]}
    with open(staging / JOURNAL, "x", encoding="utf-8") as f:
        json.dump(journal, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(staging)
    try:
        for name in companions:
            rename(staging / name, folder / name)
        rename(staging / main, folder / main)
        fsync_dir(folder)
        for name in journal["old"]:
            if os.path.lexists(folder / name):
                remove(folder / name)
    except BaseException:
        with contextlib.suppress(Exception):  # roll back, or finish deleting the old files
            _settle_swap(staging, None)
        raise
    shutil.rmtree(staging, ignore_errors=True)


__all__ = ["PREFIX", "JOURNAL", "FAULT_ENV", "sibling", "temp_dir", "scratch", "sweep",
           "check_writable",
           "pid_alive", "fsync_dir", "rename", "replace_file", "remove", "exchange",
           "replace_dir", "write_file", "install"]
