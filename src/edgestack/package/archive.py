"""One-file form of a device package: an uncompressed tar, written and extracted atomically.

:func:`write_archive` writes ``manifest.json`` first, then the listed files in manifest order,
as regular-file members only (mode 0644, uid/gid 0, no user names, mtime = the manifest's
``created``), so the same package gives the same archive bytes. Every file is hashed while it
is copied and the archive is discarded if a hash differs from the manifest. Member data sits
at 512-byte aligned offsets, so :meth:`~edgestack.package.Package.open` reads and memory-maps
the archive in place.

:func:`extract_archive` opens the archive with the reader first, which refuses members that
could escape the target directory (absolute paths, ``..``, symlinks, hard links, devices,
FIFOs, sparse files, unsafe names) and members not listed in the manifest; it never calls
:meth:`tarfile.TarFile.extract`. Files are copied (and hash-checked) into a temporary sibling
directory that is renamed into place only when everything matched.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

from edgestack.core import atomic
from edgestack.errors import PackageError
from edgestack.package.format import MANIFEST_NAME
from edgestack.package.reader import Package, _pread_into
from edgestack.package.writer import replace_dir, temp_sibling

_CHUNK = 1 << 20


class _FileReader(io.RawIOBase):
    """Reads a listed file of an opened package sequentially, hashing what it hands out."""

    def __init__(self, pkg: Package, name: str) -> None:
        super().__init__()
        self._fd, self._base = pkg._source.locate(name)
        self._size = pkg.files[name].size
        self._pos = 0
        self._what = f"{pkg.path}: {name}"
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = min(len(view), self._size - self._pos)
        if n <= 0:
            return 0
        _pread_into(self._fd, view[:n], self._base + self._pos, self._what)
        self.sha.update(view[:n])
        self._pos += n
        return n


def _hash_error(pkg: Package, name: str, found: str) -> PackageError:
    return PackageError(
        f"{pkg.path}: file {name!r} is damaged: sha256 expected {pkg.files[name].sha256}, "
        f"found {found}; nothing was written. Re-copy the package from its source, or repack"
    )


def _mtime(created: str) -> int:
    try:
        when = _dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.timezone.utc)
        return max(0, int(when.timestamp()))
    except (ValueError, OverflowError, OSError):
        return 0


def write_archive(
    package_dir: str | os.PathLike[str],
    archive_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write the package at ``package_dir`` (a directory, or an archive to copy) as one ``.tar``.

    Raises:
        PackageError: the package fails its checks or a hash, or ``archive_path`` exists and
            ``overwrite`` is false (or it is a directory).
    """
    dest = Path(archive_path)
    if os.path.lexists(dest) and not overwrite:
        raise PackageError(
            f"{dest} already exists; pass overwrite=True to replace it, or choose another archive "
            "path"
        )
    if dest.is_dir() or dest.is_symlink():
        raise PackageError(
            f"{dest} is a directory or a symlink; refusing to replace it with an archive"
        )
    tmp = temp_sibling(dest, "tmp")
    with Package.open(package_dir) as pkg:
        mtime = _mtime(pkg.manifest.created)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as raw:
                with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    names = [MANIFEST_NAME, *pkg.files]
                    for name in names:
                        info = tarfile.TarInfo(name)
                        info.mode, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, "", ""
                        info.mtime = mtime
                        if name == MANIFEST_NAME:
                            data = pkg._source.manifest_bytes()  # verbatim: keeps unknown keys
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
                            continue
                        info.size = pkg.files[name].size
                        reader = _FileReader(pkg, name)
                        tar.addfile(info, io.BufferedReader(reader, _CHUNK))
                        found = reader.sha.hexdigest()
                        if found != pkg.files[name].sha256:
                            raise _hash_error(pkg, name, found)
                raw.flush()
                os.fsync(raw.fileno())
            atomic.replace_file(tmp, dest)  # one rename: the old archive or the new one
        except OSError as exc:
            raise PackageError(
                f"cannot write the archive {dest} ({exc}); check the path and free space"
            ) from None
        finally:
            if tmp.exists():
                tmp.unlink()
    return dest


def extract_archive(
    archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Extract a package archive to the directory ``dest``, atomically and hash-checked.

    Raises:
        PackageError: the archive is unsafe, malformed or damaged (nothing is written), or
            ``dest`` exists and ``overwrite`` is false (see :func:`replace_dir`).
    """
    out = Path(dest)
    if os.path.lexists(out) and not overwrite:
        raise PackageError(
            f"{out} already exists; pass overwrite=True to replace it, or choose another "
            "destination"
        )
    with Package.open(archive) as pkg:
        if not pkg.is_archive:
            raise PackageError(
                f"{pkg.path} is a package directory, not an archive; use it as it is, or "
                "write_archive() it"
            )
        tmp = temp_sibling(out, "tmp")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            (tmp / MANIFEST_NAME).write_bytes(pkg._source.manifest_bytes())
            for name in pkg.files:
                target = tmp / name
                # names passed check_path (relative, no '..'); parents are directories we create
                target.parent.mkdir(parents=True, exist_ok=True)
                reader = _FileReader(pkg, name)
                with open(target, "xb") as f:
                    while chunk := reader.read(_CHUNK):
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                found = reader.sha.hexdigest()
                if found != pkg.files[name].sha256:
                    raise _hash_error(pkg, name, found)
            replace_dir(tmp, out, overwrite, "destination")
        except OSError as exc:
            raise PackageError(
                f"cannot extract to {out} ({exc}); check the path and free space"
            ) from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["write_archive", "extract_archive"]
