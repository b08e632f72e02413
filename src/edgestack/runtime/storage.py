"""The runtime's memory and storage: the process's C heap (glibc's mmap threshold and
``malloc_trim``), anonymous maps for block stores (pages never written cost nothing), the
file system under a path (a data file must not sit in memory), kernel copies of package
bytes, a BitStack layer's block store and the row reader of a pre-gathered table.

Numpy and the standard library only (no onnxruntime): see :mod:`edgestack.runtime.runtime`
for how the runtime uses them."""

from __future__ import annotations

import functools
import mmap
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgestack.errors import PackageError
from edgestack.package.format import Table
from edgestack.package.tables import check_ids
from edgestack.runtime.plan import page_up

FIX_REPACK = "copy the package again or repack the model"

MMAP_THRESHOLD = 128 * 1024
"""glibc malloc threshold the runtime fixes (``mallopt(M_MMAP_THRESHOLD)``) for the process."""


def fix_malloc_threshold() -> bool:
    """Fix glibc's mmap threshold so freed large blocks go back to the OS at once.

    By default glibc raises the threshold to the size of each large block freed, after which
    blocks of that size come from the heap and freed ones stay in the process: measured, the
    peak RSS of on-the-fly decodes then grew with the *sum* over layers of their temporaries
    instead of the largest layer's (4 layers of 1024x1024: +68 MiB instead of +17 MiB). A
    fixed threshold (which also turns the dynamic adjustment off) makes memory follow the
    plan. Process-wide; a no-op (False) where glibc is not the C library.
    """
    try:
        return bool(_libc().mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD = -3
    except AttributeError:  # not glibc, or no C library loaded (None)
        return False


def trim_heap() -> bool:
    """Return the C heap's free memory to the OS (glibc ``malloc_trim``).

    Measured: after a shrink re-decodes materialised layers, the freed dense weights of the
    old tier stayed in the heap (+14 MiB RSS on 4 layers of 1024x1024) even with the fixed
    mmap threshold; ``malloc_trim`` gives them back. A no-op (False) without glibc.
    """
    try:
        return bool(_libc().malloc_trim(0))
    except AttributeError:  # not glibc, or no C library loaded (None)
        return False


@functools.cache
def _libc() -> Any:
    """The C library (``ctypes.CDLL``), loaded once (``find_library`` takes milliseconds and
    :func:`trim_heap` runs on every shrink); None where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def anon_map(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, max(page_up(nbytes), mmap.PAGESIZE),
                     flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
"""File systems whose files live in memory (the dense data file should not go there)."""


def fs_type(path: str) -> str:
    """The type of the file system holding ``path`` (the longest mount point above it, from
    ``/proc/self/mounts``), or ``""`` when unknown (no ``/proc``). Read directly, not with
    psutil: the device runtime serves without it (psutil only measures memory)."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # the kernel escapes space, tab, newline and backslash in mount points as octal
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        mount = mount.rstrip("/") or "/"
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def copy_out(fd: int, offset: int, size: int, dst: Path, what: str) -> None:
    """``size`` bytes of ``fd`` from ``offset`` into a new file ``dst`` (parents made), copied
    by the kernel (``os.copy_file_range``: disk and page cache, not this process's memory)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as f:
        done = 0
        while done < size:
            n = os.copy_file_range(fd, f.fileno(), size - done, offset + done)
            if n <= 0:
                raise PackageError(f"{what}: short read at byte {done} of {size}; "
                                   f"{FIX_REPACK}")
            done += n


def link_or_copy(src: Path, dst: Path, size: int) -> None:
    """``dst`` as a hard link to ``src``, or where that cannot be (another file system) a
    kernel copy (:func:`copy_out`)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return
    except OSError:
        pass
    with open(src, "rb") as fi:
        copy_out(fi.fileno(), 0, size, dst, str(src))


class LayerStore:
    """Full-capacity signs/u/v arrays of one layer in anonymous maps."""

    def __init__(self, info: Any) -> None:
        self.info = info
        m, n = info.matrix_shape
        nbk, k = info.n_blocks, info.rank
        self.maps = [anon_map(nbk * row) for row in info.part_bytes]
        self.signs = np.frombuffer(self.maps[0], np.uint8, nbk * info.signs_bytes).reshape(
            nbk, info.signs_bytes)
        self.u = np.frombuffer(self.maps[1], "<f2", nbk * m * k).reshape(nbk, m, k)
        self.v = np.frombuffer(self.maps[2], "<f2", nbk * k * n).reshape(nbk, k, n)
        self.loaded = 0

    def feeds(self, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.signs[:nb], self.u[:nb], self.v[:nb]

    def release_after(self, nb: int) -> int:
        """Give back the pages of rows ``nb..``; return the bytes released."""
        freed = 0
        for mm, row in zip(self.maps, self.info.part_bytes, strict=True):
            start = page_up(nb * row)
            if start < len(mm):
                mm.madvise(mmap.MADV_DONTNEED, start, len(mm) - start)
                freed += page_up(self.loaded * row) - start if self.loaded * row > start else 0
        self.loaded = min(self.loaded, nb)
        return freed

    def blocks(self, nb: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The first ``nb`` blocks' ``(signs, u, v)`` rows (they must be loaded)."""
        return [(self.signs[i], self.u[i], self.v[i]) for i in range(nb)]


class RowReader:
    """Reads the rows of one pre-gathered table from the weights file with ``pread``: only the
    rows a call names are read, into a fresh array; nothing of the table is mapped."""

    def __init__(self, fd: int, base: int, table: Table) -> None:
        self.fd = fd
        self.start = base + table.offset
        self.dtype, self.shape = np.dtype(table.dtype), table.shape
        self.row_bytes = table.bytes // table.shape[0]
        self.lookups = table.lookups

    def rows(self, ids: Any, what: str, distinct: Any = None) -> np.ndarray:
        """``table[ids]``: each distinct row read once (padding repeats one id: on the bench
        sentence 0.40 ms of reads a call became a fraction of it); ``distinct``: the ids'
        ``np.unique(..., return_inverse=True)`` when the caller has it (checked ids)."""
        ids = np.asarray(ids)
        if distinct is None:
            distinct = np.unique(ids.reshape(-1), return_inverse=True)
        uniq, inverse = distinct
        check_ids(uniq, self.shape[0], what)      # sorted: its ends are the range
        got = np.empty((uniq.size, self.row_bytes), np.uint8)
        for i, r in enumerate(uniq.tolist()):
            if os.preadv(self.fd, [got[i]], self.start + r * self.row_bytes) != self.row_bytes:
                raise PackageError(f"short read of row {r} of a table at byte {self.start}")
        return got[inverse].view(self.dtype).reshape(ids.shape + self.shape[1:])


__all__ = ["MMAP_THRESHOLD", "MEMORY_FILESYSTEMS", "FIX_REPACK", "fix_malloc_threshold",
           "trim_heap", "anon_map", "fs_type", "copy_out", "link_or_copy", "LayerStore",
           "RowReader"]
