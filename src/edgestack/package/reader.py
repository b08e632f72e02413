"""Read a device package (a directory or an uncompressed ``.tar``) without trusting its bytes.

:meth:`Package.open` checks, before handing anything out: the manifest (size bound, UTF-8 and
JSON syntax, magic, schema version, keys and types, file names, and what it must agree with
itself on: see :class:`~edgestack.package.format.Manifest`), and that every listed file is
present, a regular file, and has its listed size. :meth:`Package.verify` hashes every file.
Everything a user can break raises :class:`~edgestack.errors.PackageError`.

Reading blocks: :meth:`Package.read_into` reads a listed file's bytes with ``os.preadv``
straight into buffers the caller gives (the runtime's layer stores), :meth:`Package.read_prefix`
into a fresh numpy buffer placed so that every byte keeps its file offset's alignment modulo 64
in memory (block parts stay 64-byte aligned; :meth:`Package.views_of` slices it into blocks).
The :class:`ByteCounter` at :attr:`Package.counter` adds exactly the block-file bytes those
system calls returned, whether the OS served them from disk or its page cache: reading the
bytes tier ``t+1`` adds to tier ``t`` counts ``tiers[t+1].bytes - tiers[t].bytes`` and nothing
else. :meth:`verify` and whole-file reads (:meth:`read_file`) are not counted.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import stat
import tarfile
import threading
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgestack.errors import PackageError
from edgestack.package.format import (
    BLOCK_ALIGN,
    BLOCK_FILE,
    FACTOR_DTYPES,
    MANIFEST_NAME,
    MAX_ARCHIVE_MEMBERS,
    MAX_MANIFEST_BYTES,
    BlockRecord,
    FileEntry,
    Golden,
    LayerInfo,
    Manifest,
    Tier,
    check_path,
)

_CHUNK = 1 << 20
_IOV_MAX = 1000  # buffers per preadv call (Linux IOV_MAX is 1024)
_MAX_TAR_META = 1 << 20  # largest tar header/pax/longname read we allow
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}
_NPZ_ERRORS = (ValueError, OSError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile)
_FIX_COPY = "re-copy the package from its source, or repack the model"


class ByteCounter:
    """Counts the block-file bytes a :class:`Package` read from storage.

    Attributes:
        bytes_read: bytes returned by ``pread`` calls made by ``read_prefix``/``read_into``.
        reads: how many ranges were read.
        ranges: the ``(start, end)`` byte ranges read, in order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Set every count back to zero."""
        with self._lock:
            self.bytes_read = 0
            self.reads = 0
            self.ranges: list[tuple[int, int]] = []

    def _add_read(self, start: int, end: int) -> None:
        with self._lock:
            self.bytes_read += end - start
            self.reads += 1
            self.ranges.append((start, end))

    def __repr__(self) -> str:
        return f"ByteCounter(bytes_read={self.bytes_read}, reads={self.reads})"


class BlockView(NamedTuple):
    """One block's parts as numpy views: ``signs`` uint8 ``[ceil(m*n/8)]``, ``u`` ``[m, k]``,
    ``v`` ``[k, n]`` (float16)."""

    layer: str
    block: int
    signs: np.ndarray
    u: np.ndarray
    v: np.ndarray


# ------------------------------------------------------------------------------------------
# Sources: where the bytes of a package's files live
# ------------------------------------------------------------------------------------------


def _pread_into(fd: int, bufs: memoryview | list[memoryview], offset: int, what: str) -> int:
    """Fill ``bufs`` (one byte buffer, or several filled in turn: a scatter read, up to
    :data:`_IOV_MAX` buffers per ``preadv``) from ``fd`` at ``offset``; return the bytes
    read (their total size)."""
    iovs = [b for b in ([bufs] if isinstance(bufs, memoryview) else bufs) if len(b)]
    total = sum(len(b) for b in iovs)
    done = 0
    i = 0
    while i < len(iovs):
        try:
            if hasattr(os, "preadv"):
                got = os.preadv(fd, iovs[i : i + _IOV_MAX], offset + done)
            else:  # pragma: no cover - platforms without preadv
                chunk = os.pread(fd, min(len(iovs[i]), 1 << 30), offset + done)
                iovs[i][: len(chunk)] = chunk
                got = len(chunk)
        except OSError as exc:
            raise PackageError(
                f"{what}: cannot read ({exc}); check the file and its permissions"
            ) from None
        if got == 0:
            raise PackageError(
                f"{what}: expected {total} bytes at offset {offset}, found end of file after "
                f"{done}; the file was truncated after the package was opened: {_FIX_COPY}"
            )
        done += got
        while got and i < len(iovs):  # skip the filled buffers, trim a partly filled one
            n = len(iovs[i])
            if got >= n:
                got -= n
                i += 1
            else:
                iovs[i] = iovs[i][got:]
                got = 0
    return done


class _Source:
    """Where the files of a package live (a directory or a tar archive): ``size(name)``
    (None when absent), ``locate(name)`` (file descriptor, offset), the archive's
    ``members`` (a directory has none: its unlisted files are ignored)."""

    display: str
    kind: str
    members: dict[str, tuple[int, int]] = {}

    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def locate(self, name: str) -> tuple[int, int]:
        raise NotImplementedError

    def manifest_bytes(self) -> bytes:
        size = self.size(MANIFEST_NAME)
        if size is None:
            raise PackageError(
                f"{self.display}: no {MANIFEST_NAME} in this {self.kind}, so it is not a device "
                "package; pass the directory or .tar that PackageWriter.finish(), "
                "write_archive() or extract_archive() made")
        if size > MAX_MANIFEST_BYTES:
            raise PackageError(
                f"{self.display}: {MANIFEST_NAME} is {size} bytes, more than the "
                f"{MAX_MANIFEST_BYTES} allowed; it is not an edgestack manifest, or is damaged")
        fd, base = self.locate(MANIFEST_NAME)
        buf = bytearray(size)
        _pread_into(fd, memoryview(buf), base, f"{self.display}: {MANIFEST_NAME}")
        return bytes(buf)

    def check_files(self, manifest: Manifest) -> None:
        """Every listed file is present with its listed size; an archive holds nothing else."""
        for name, entry in manifest.files.items():
            found = self.size(name)
            if found is None:
                raise PackageError(
                    f"{self.display}: file {name!r} (role {entry.role}, {entry.size} bytes) is "
                    f"listed in {MANIFEST_NAME} but missing from the {self.kind}; {_FIX_COPY}")
            if found != entry.size:
                hint = ("truncated (an interrupted copy or download?)" if found < entry.size
                        else "larger than listed")
                raise PackageError(
                    f"{self.display}: file {name!r} is {hint}: expected {entry.size} bytes "
                    f"(manifest), found {found}; {_FIX_COPY}")
        extra = [n for n in self.members if n != MANIFEST_NAME and n not in manifest.files]
        if extra:
            raise PackageError(
                f"{self.display}: archive members {', '.join(map(repr, extra[:5]))} are not listed "
                f"in {MANIFEST_NAME}; a package archive holds only listed files: {_FIX_COPY}")


class _DirSource(_Source):
    is_archive = False
    kind = "directory"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.display = str(root)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _lstat(self, name: str) -> os.stat_result | None:
        """lstat ``name``, refusing symlinks and non-directories on the way; None if missing."""
        cur = self.root
        parts = name.split("/")
        for i, part in enumerate(parts):
            cur = cur / part
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise PackageError(
                    f"{self.display}: cannot stat {name!r} ({exc}); check permissions"
                ) from None
            last = i == len(parts) - 1
            if stat.S_ISLNK(st.st_mode):
                raise PackageError(
                    f"{self.display}: {'/'.join(parts[: i + 1])!r} is a symlink; a package holds "
                    "regular files only (a link could point outside it): replace it with the file"
                )
            if not last and not stat.S_ISDIR(st.st_mode):
                raise PackageError(
                    f"{self.display}: {'/'.join(parts[: i + 1])!r} is not a directory, but "
                    f"{name!r} is listed below it; {_FIX_COPY}"
                )
            if last:
                if not stat.S_ISREG(st.st_mode):
                    raise PackageError(
                        f"{self.display}: {name!r} is not a regular file; {_FIX_COPY}"
                    )
                return st
        return None  # pragma: no cover

    def size(self, name: str) -> int | None:
        st = self._lstat(name)
        return None if st is None else st.st_size

    def locate(self, name: str) -> tuple[int, int]:
        with self._lock:
            if name not in self._fds:
                flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
                try:
                    self._fds[name] = os.open(self.root / name, flags)
                except OSError as exc:
                    raise PackageError(
                        f"{self.display}: cannot open {name!r} ({exc}); {_FIX_COPY}"
                    ) from None
            return self._fds[name], 0

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        # not contextlib.suppress: at interpreter shutdown its module global may be gone
        try:  # noqa: SIM105
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class _GuardedFile(io.RawIOBase):
    """A read-only file for :mod:`tarfile` that refuses huge metadata reads (a hostile pax or
    long-name header could otherwise make tarfile allocate its claimed size)."""

    def __init__(self, raw: io.BufferedReader, display: str) -> None:
        super().__init__()
        self._raw = raw
        self._display = display

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0 or n > _MAX_TAR_META:
            raise PackageError(
                f"{self._display}: an archive header claims {n} bytes of metadata (at most "
                f"{_MAX_TAR_META}); the archive is damaged or not a package archive: {_FIX_COPY}"
            )
        return self._raw.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


class _TarSource(_Source):
    is_archive = True
    kind = "archive"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.display = str(path)
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - held open, closed by close()
        except OSError as exc:
            raise PackageError(f"{self.display}: cannot open the archive ({exc})") from None
        try:
            self.archive_size = os.fstat(self._file.fileno()).st_size
            self.members = self._scan()
        except BaseException:
            self._file.close()
            raise

    def _scan(self) -> dict[str, tuple[int, int]]:
        head = self._file.read(512)
        for magic, kind in _COMPRESSED_MAGIC.items():
            if head.startswith(magic):
                raise PackageError(
                    f"{self.display}: this is a {kind} file; package archives are uncompressed "
                    "tar files (so blocks stay seekable): decompress it, or make it with "
                    "edgestack.package.write_archive()"
                )
        if len(head) < 512 or head[257:262] != b"ustar":
            raise PackageError(
                f"{self.display}: not a tar archive (no ustar header at offset 257); expected a "
                "package directory or a .tar made by edgestack.package.write_archive()"
            )
        self._file.seek(0)
        members: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(fileobj=_GuardedFile(self._file, self.display), mode="r:") as tar:
                for count, info in enumerate(iter(tar.next, None)):
                    if count >= MAX_ARCHIVE_MEMBERS:
                        raise PackageError(
                            f"{self.display}: more than {MAX_ARCHIVE_MEMBERS} archive members; not "
                            "a package archive"
                        )
                    self._add_member(members, info)
        except PackageError:
            raise
        except Exception as exc:  # tarfile raises many types on malformed input
            raise PackageError(
                f"{self.display}: the archive is damaged or not a tar file "
                f"({type(exc).__name__}: {str(exc)[:120]}); {_FIX_COPY}"
            ) from None
        return members

    def _add_member(self, members: dict[str, tuple[int, int]], info: tarfile.TarInfo) -> None:
        name = info.name
        while name.startswith("./"):
            name = name[2:]
        name = name.rstrip("/") if info.isdir() else name
        if name in ("", ".") and info.isdir():
            return
        where = f"{self.display}: archive member"
        try:
            check_path(name, where)
        except PackageError as exc:
            raise PackageError(
                f"{exc}. The archive tries to write outside the package or uses an unsafe name; "
                "refusing it"
            ) from None
        kinds = (
            (info.issym(), "a symlink"),
            (info.islnk(), "a hard link"),
            (info.ischr() or info.isblk(), "a device file"),
            (info.isfifo(), "a FIFO"),
            (info.issparse(), "a sparse file"),
        )
        for bad, kind in kinds:
            if bad:
                raise PackageError(
                    f"{where} {name!r} is {kind}; package archives hold regular files only, so "
                    "refusing it: make the archive with edgestack.package.write_archive()"
                )
        if info.isdir():
            return
        if not info.isreg():
            raise PackageError(
                f"{where} {name!r} has tar type {info.type!r}; package archives hold regular files "
                "only"
            )
        if name in members:
            raise PackageError(
                f"{where} {name!r} appears twice; the archive is ambiguous: {_FIX_COPY}"
            )
        end = info.offset_data + info.size
        if end > self.archive_size:
            raise PackageError(
                f"{where} {name!r} is truncated: expected {info.size} bytes at offset "
                f"{info.offset_data}, the archive ends at {self.archive_size} "
                f"({max(0, self.archive_size - info.offset_data)} bytes of the member "
                f"present); {_FIX_COPY}"
            )
        members[name] = (info.offset_data, info.size)

    def size(self, name: str) -> int | None:
        return self.members[name][1] if name in self.members else None

    def locate(self, name: str) -> tuple[int, int]:
        return self._file.fileno(), self.members[name][0]

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------------------
# Package
# ------------------------------------------------------------------------------------------


class FileMap:
    """A read-only, shared memory map of one listed file of a package (directory or archive).

    ``array`` is the file's bytes (uint8, read-only); pages become resident only when read,
    are backed by the page cache (not anonymous memory), and :meth:`drop` hands a range's
    resident pages back without unmapping it (the next read faults them in again from the
    page cache). Made by :meth:`Package.map_file`.
    """

    def __init__(self, fd: int, base: int, size: int, display: str) -> None:
        start = base - base % mmap.ALLOCATIONGRANULARITY
        self.shift = base - start
        self.size = size
        try:
            self._mm = mmap.mmap(fd, self.shift + size, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ, offset=start) if size else None
        except (OSError, ValueError) as exc:
            raise PackageError(f"{display}: cannot memory-map {size} bytes at offset {base} "
                               f"({exc}); {_FIX_COPY}") from None
        self.array = (np.frombuffer(self._mm, np.uint8, size, self.shift) if self._mm is not None
                      else np.empty(0, np.uint8))

    def drop(self, start: int, end: int) -> None:
        """Give back the resident pages of file bytes ``[start, end)`` (whole pages that
        the range touches; the mapping stays valid)."""
        if self._mm is None or end <= start:
            return
        page = mmap.PAGESIZE
        lo = (self.shift + start) // page * page
        hi = min(len(self._mm), -(-(self.shift + end) // page) * page)
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class Package:
    """An opened, structurally checked device package (directory or ``.tar``).

    Use :meth:`open`. Attributes: ``path``, ``manifest`` (:class:`~.format.Manifest`),
    ``counter`` (:class:`ByteCounter` of block-file reads). Close with :meth:`close` or a
    ``with`` block; views and chunks handed out stay valid after closing.
    """

    def __init__(self, path: Path, source: _Source, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self.counter = ByteCounter()
        self._source = source

    # ---- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Package:
        """Open and check a package directory or ``.tar`` archive (no hashing: see
        :meth:`verify`).

        Raises:
            PackageError: the path is missing, not a package, or fails a check.
        """
        p = Path(path)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise PackageError(
                f"{p}: no such file or directory; expected a package directory or .tar archive"
            ) from None
        except OSError as exc:
            raise PackageError(f"{p}: cannot access ({exc})") from None
        if stat.S_ISDIR(st.st_mode):
            source: _Source = _DirSource(p)
        elif stat.S_ISREG(st.st_mode):
            source = _TarSource(p)
        else:
            raise PackageError(
                f"{p}: neither a directory nor a regular file; expected a package directory or "
                ".tar archive"
            )
        try:
            manifest = Manifest.from_bytes(source.manifest_bytes(), str(p))
            source.check_files(manifest)
        except BaseException:
            source.close()
            raise
        return cls(p, source, manifest)

    def close(self) -> None:
        """Close the package's files (buffers already handed out stay valid)."""
        self._source.close()

    def __enter__(self) -> Package:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Package({str(self.path)!r}, model={self.manifest.model.name!r}, "
            f"target={self.manifest.target!r}, tiers={len(self.tiers)}, layers={len(self.layers)})"
        )

    # ---- manifest shortcuts -----------------------------------------------------------
    @property
    def is_archive(self) -> bool:
        """Whether the package is read from a ``.tar`` archive."""
        return self._source.is_archive

    @property
    def files(self) -> Mapping[str, FileEntry]:
        return self.manifest.files

    @property
    def layers(self) -> Mapping[str, LayerInfo]:
        return self.manifest.layers

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return self.manifest.tiers

    @property
    def block_index(self) -> tuple[BlockRecord, ...]:
        return self.manifest.block_index

    @property
    def golden_info(self) -> Golden | None:
        return self.manifest.golden

    @property
    def graph_file(self) -> str:
        """Name of the model graph file (the one file with role ``graph``)."""
        return next(n for n, e in self.files.items() if e.role == "graph")

    @property
    def block_file_size(self) -> int:
        """Size of ``blocks.bin`` (0 when the package has no BitStack layers)."""
        entry = self.files.get(BLOCK_FILE)
        return entry.size if entry else 0

    # ---- whole files ------------------------------------------------------------------
    def _entry(self, name: str) -> FileEntry:
        if not isinstance(name, str) or name not in self.files:
            listed = ", ".join(map(repr, list(self.files)[:10]))
            raise PackageError(
                f"{self.path}: no file {name!r} in the package; listed files: {listed}"
            )
        return self.files[name]

    def _read_hashed(self, name: str, keep: bool, verify: bool = True) -> bytes | None:
        """Read a whole listed file in chunks, hashing as it goes (into one buffer that is
        returned with ``keep``, else through a chunk-sized scratch buffer); with ``verify``
        its sha256 must be the manifest's."""
        entry = self._entry(name)
        fd, base = self._source.locate(name)
        digest = hashlib.sha256()
        out = memoryview(bytearray(entry.size if keep else min(_CHUNK, entry.size)))
        pos = 0
        while pos < entry.size:
            n = min(_CHUNK, entry.size - pos)
            view = out[pos : pos + n] if keep else out[:n]
            _pread_into(fd, view, base + pos, f"{self.path}: {name}")
            digest.update(view)
            pos += n
        if verify and digest.hexdigest() != entry.sha256:
            raise PackageError(
                f"{self.path}: file {name!r} is damaged: sha256 expected {entry.sha256}, found "
                f"{digest.hexdigest()} ({entry.size} bytes); it changed after packing: "
                f"{_FIX_COPY}")
        return out.tobytes() if keep else None

    def verify(self, names: list[str] | None = None) -> None:
        """Hash every listed file (or ``names``) and compare with the manifest; the block
        file's records are hashed on the same pass (``block_sha256``), so a package that
        verifies serves every tier.

        Raises:
            PackageError: naming the first file (and block record) whose sha256 differs,
                expected vs found.
        """
        for name in self.files if names is None else names:
            if name == BLOCK_FILE:
                self._verify_blocks()
            else:
                self._read_hashed(name, keep=False)

    def _verify_blocks(self) -> None:
        """Hash the block file in chunks, the whole file and each record's span (the spans
        tile the file), and compare with the manifest; the error names the first record
        that differs."""
        entry = self._entry(BLOCK_FILE)
        fd, base = self._source.locate(BLOCK_FILE)
        whole = hashlib.sha256()
        records = self.block_index
        buf = memoryview(bytearray(min(_CHUNK, entry.size)))
        i, span, pos = 0, hashlib.sha256(), 0
        first_bad = ""
        while pos < entry.size:
            n = min(_CHUNK, entry.size - pos)
            view = buf[:n]
            _pread_into(fd, view, base + pos, f"{self.path}: {BLOCK_FILE}")
            whole.update(view)
            done = 0
            while done < n:
                rec = records[i]
                take = min(n - done, rec.end - (pos + done))
                span.update(view[done:done + take])
                done += take
                if pos + done == rec.end:
                    if not first_bad and span.hexdigest() != rec.sha256:
                        first_bad = (f"block record {i} ({self._record_text(rec)}) is the "
                                     f"first that differs: sha256 {span.hexdigest()}, "
                                     f"block_sha256[{i}] {rec.sha256}")
                    i, span = i + 1, hashlib.sha256()
            pos += n
        found = whole.hexdigest()
        if found == entry.sha256 and first_bad:
            raise PackageError(
                f"{self.path}: {MANIFEST_NAME} is damaged: {BLOCK_FILE!r} has the listed "
                f"sha256, but {first_bad}; {_FIX_COPY}")
        if found != entry.sha256:
            why = first_bad or ("every block record matches block_sha256, so the manifest's "
                                "files entry is wrong")
            raise PackageError(
                f"{self.path}: file {BLOCK_FILE!r} is damaged: sha256 expected {entry.sha256}, "
                f"found {found} ({entry.size} bytes); {why}; it changed after packing: "
                f"{_FIX_COPY}")

    @staticmethod
    def _record_text(rec: BlockRecord) -> str:
        return (f"layer {rec.layer!r}, block {rec.block}, bytes [{rec.span_start}, "
                f"{rec.end})")

    def check_record(self, rec: BlockRecord, parts: Sequence[Any]) -> None:
        """Check bytes read for serving: ``parts`` (byte buffers, in file order) are record
        ``rec``'s span, ``[rec.span_start, rec.end)``, as packed (their sha256 is the
        manifest's ``block_sha256`` of the record). Call it on the bytes that will be used,
        after reading them into memory the caller owns, before using them.

        Raises:
            PackageError: naming the file and the record, expected vs found.
        """
        digest = hashlib.sha256()
        size = 0
        for part in parts:
            digest.update(part)
            size += memoryview(part).nbytes
        if size != rec.end - rec.span_start:
            raise PackageError(f"{self.path}: check_record: expected the {rec.end - rec.span_start}"
                               f" bytes of the record's span, found {size}")
        found = digest.hexdigest()
        if found != rec.sha256:
            index = self.block_index.index(rec)
            raise PackageError(
                f"{self.path}: file {BLOCK_FILE!r} changed on disk: block record {index} "
                f"({self._record_text(rec)}) has sha256 {found}, the manifest's "
                f"block_sha256[{index}] is {rec.sha256}; its bytes are not used: {_FIX_COPY}")

    def read_file(self, name: str, *, verify: bool = True) -> bytes:
        """The whole content of a listed file (e.g. the graph), hash-checked by default."""
        data = self._read_hashed(name, keep=True, verify=verify)
        assert data is not None
        return data

    def locate(self, name: str) -> tuple[int, int]:
        """``(file descriptor, offset)`` of a listed file's first byte (the package file's
        own descriptor in an archive; valid until :meth:`close`).

        Raises:
            PackageError: unknown file, or it cannot be opened.
        """
        return self._source.locate(self._entry(name).name)

    def map_file(self, name: str) -> FileMap:
        """A read-only shared memory map of a listed file (directory or archive member; not
        hash-checked: call :meth:`verify` first).

        Raises:
            PackageError: unknown file, or the file cannot be mapped.
        """
        fd, base = self.locate(name)
        return FileMap(fd, base, self._entry(name).size, f"{self.path}: {name}")

    def file_path(self, name: str) -> Path:
        """Filesystem path of a listed file; directory packages only.

        Raises:
            PackageError: unknown file, or the package is an archive (extract it first).
        """
        if self.is_archive:
            raise PackageError(
                f"{self.path}: {name!r} is inside an archive and has no path of its own; "
                "extract it with edgestack.package.extract_archive() first")
        return self.path / self._entry(name).name

    def golden(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The golden ``(inputs, outputs)`` arrays for the self-test (hash-checked).

        Raises:
            PackageError: the package has no golden data, or a golden file is unreadable.
        """
        info = self.golden_info
        if info is None:
            raise PackageError(
                f"{self.path}: the package has no golden data; repack with "
                "PackageWriter.add_golden(inputs, outputs) to enable the self-test"
            )
        return self._load_npz(info.inputs), self._load_npz(info.outputs)

    def _load_npz(self, name: str) -> dict[str, np.ndarray]:
        data = self.read_file(name)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        except PackageError:
            raise
        except _NPZ_ERRORS as exc:
            raise PackageError(
                f"{self.path}: golden file {name!r} is not a readable .npz without pickles "
                f"({type(exc).__name__}: {str(exc)[:120]}); repack the model"
            ) from None

    # ---- block file -------------------------------------------------------------------
    def _int_arg(self, value: Any, what: str, lo: int, hi: int) -> int:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if not ok or not lo <= int(value) <= hi:
            raise PackageError(
                f"{self.path}: {what} must be an integer in [{lo}, {hi}], found {value!r}"
            )
        return int(value)

    def read_prefix(self, start: int, end: int, *, verify: bool = True) -> np.ndarray:
        """Read block-file bytes ``[start, end)`` into a new uint8 buffer (counted).

        The buffer is placed so that ``buffer[i]`` has the alignment of file offset
        ``start + i`` modulo 64. With ``verify``, every record whose span lies inside the
        range is checked (:meth:`check_record`); a tier's prefix and a tier step are whole
        spans.

        Raises:
            PackageError: a bad range, a read error, or a record that does not match.
        """
        size = self.block_file_size
        end = self._int_arg(end, "end", 0, size)
        start = self._int_arg(start, "start", 0, end)
        n = end - start
        raw = np.empty(n + BLOCK_ALIGN, dtype=np.uint8)
        shift = (start - raw.ctypes.data) % BLOCK_ALIGN
        data = raw[shift : shift + n]
        if n:
            self.read_into(BLOCK_FILE, [memoryview(data)], start)
        if verify:
            for rec in self.block_index:
                if start <= rec.span_start and rec.end <= end:
                    self.check_record(rec, [data[rec.span_start - start : rec.end - start]])
        return data

    def read_into(self, name: str, buffers: list[memoryview], offset: int) -> int:
        """Read a listed file's bytes from ``offset`` straight into ``buffers`` (byte
        memoryviews the caller owns, filled in turn: a scatter read with ``os.preadv``);
        return the bytes read. Block-file reads are counted in :attr:`counter`, like
        :meth:`read_prefix`'s.

        Raises:
            PackageError: unknown file, a range beyond the file's listed size, or a read
                error (e.g. the file was truncated after the package was opened).
        """
        entry = self._entry(name)
        total = sum(len(b) for b in buffers)
        if not 0 <= offset <= entry.size - total:
            raise PackageError(f"{self.path}: {name}: cannot read {total} bytes at offset "
                               f"{offset} of a {entry.size}-byte file")
        if not total:
            return 0
        fd, base = self._source.locate(name)
        got = _pread_into(fd, buffers, base + offset, f"{self.path}: {name}")
        if name == BLOCK_FILE:
            self.counter._add_read(offset, offset + got)
        return got

    def view(self, rec: BlockRecord, buf: np.ndarray, base: int) -> BlockView:
        """Views of the parts of block record ``rec`` in ``buf``, block-file bytes from
        offset ``base``."""
        info = self.layers[rec.layer]
        m, n = info.matrix_shape
        dtype = np.dtype(FACTOR_DTYPES[info.dtype])
        signs = buf[rec.signs - base : rec.signs - base + info.signs_bytes]
        u = buf[rec.u - base : rec.u - base + info.u_bytes].view(dtype).reshape(m, info.rank)
        v = buf[rec.v - base : rec.v - base + info.v_bytes].view(dtype).reshape(info.rank, n)
        return BlockView(rec.layer, rec.block, signs, u, v)

    def views_of(self, data: np.ndarray, start: int) -> list[BlockView]:
        """Views of the blocks whose spans lie wholly inside ``data``, a buffer of
        block-file bytes from offset ``start`` (as returned by :meth:`read_prefix`, which
        checked exactly those records)."""
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 1:
            raise PackageError(
                f"{self.path}: expected a 1-D uint8 buffer, found {data.dtype} {data.shape}"
            )
        end = start + data.size
        return [self.view(rec, data, start) for rec in self.block_index
                if start <= rec.span_start and rec.end <= end]


__all__ = ["ByteCounter", "BlockView", "FileMap", "Package"]
