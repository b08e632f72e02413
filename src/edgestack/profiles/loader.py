"""Reading profiles: the built-in TOML files shipped in this package, and users' files."""

from __future__ import annotations

import difflib
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from edgestack.errors import ProfileError
from edgestack.profiles.profile import Profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

SUFFIX = ".toml"


def _builtin_files() -> dict[str, Any]:
    """Built-in profile name -> its file (a Traversable: a Path unless zip-imported)."""
    files = {}
    for entry in resources.files("edgestack.profiles").iterdir():
        if entry.name.endswith(SUFFIX) and entry.is_file():
            files[entry.name[: -len(SUFFIX)]] = entry
    return dict(sorted(files.items()))


def builtin_names() -> list[str]:
    """The names of the profiles shipped with edgestack, sorted."""
    return list(_builtin_files())


def _parse_toml(data: bytes, where: str) -> dict[str, Any]:
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise ProfileError(f"{where}: reading TOML on Python {sys.version_info[0]}."
                           f"{sys.version_info[1]} needs the 'tomli' package "
                           "(pip install tomli); Python 3.11+ has tomllib built in")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{where}: not UTF-8 text (bad byte at offset {exc.start}); "
                           "TOML files must be UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message ends with "(at line L, column C)".
        raise ProfileError(f"{where}: not valid TOML: {exc}") from None


def _from_bytes(data: bytes, stem: str, where: str, source: str) -> Profile:
    doc = _parse_toml(data, where)
    name = doc.get("name")
    if isinstance(name, str) and name != stem:
        raise ProfileError(f"{where}: field 'name' must match the file name '{stem}', "
                           f"found '{name}' (rename the file to '{name}{SUFFIX}' or set "
                           f"name = \"{stem}\")")
    return Profile.from_dict(doc, source=source, where=where)


def load_profile_file(path: str | os.PathLike[str]) -> Profile:
    """Read and validate one profile file.

    Args:
        path: A TOML file; its ``name`` field must equal the file name without ``.toml``.

    Raises:
        ProfileError: The file is missing, unreadable, not TOML, or a field is invalid. The
            message starts with the path.
    """
    where = os.fspath(path)
    p = Path(path)
    if not p.exists():
        hint = ""
        if p.stem in _builtin_files() and p.parent == Path():
            hint = f" (the built-in profile is named '{p.stem}', without {SUFFIX})"
        raise ProfileError(f"{where}: no such profile file{hint}")
    if p.is_dir():
        raise ProfileError(f"{where}: is a directory, not a profile file (a .toml file)")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{where}: cannot read the profile file: {exc.strerror}") from None
    return _from_bytes(data, p.stem, where, source=str(p))


def _load_builtin(name: str, entry: Any) -> Profile:
    return _from_bytes(entry.read_bytes(), name, entry.name, source=str(entry))


def list_profiles() -> list[Profile]:
    """The built-in profiles, validated, sorted by name.

    Raises:
        ProfileError: A shipped file is invalid (a packaging bug; tests guard against it).
    """
    return [_load_builtin(name, entry) for name, entry in _builtin_files().items()]


def _looks_like_path(text: str) -> bool:
    return (text.endswith(SUFFIX) or "/" in text or os.sep in text
            or (os.altsep is not None and os.altsep in text))


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """Load a built-in profile by name, or a user's profile from a ``.toml`` path.

    A string is a path when it ends with ``.toml`` or contains a path separator; otherwise
    it is a built-in name (``rpi5-4gb``), and failing that an existing file.

    Args:
        name_or_path: A built-in name (see :func:`builtin_names`) or a path.

    Returns:
        The validated profile; :attr:`Profile.source` is the file it was read from.

    Raises:
        ProfileError: Unknown name (the message lists the built-in ones), or an invalid file.
    """
    if not isinstance(name_or_path, str):
        if isinstance(name_or_path, os.PathLike):
            return load_profile_file(name_or_path)
        raise ProfileError(f"a profile is a built-in name or a path, found "
                           f"{type(name_or_path).__name__} {name_or_path!r}")
    text = name_or_path
    if _looks_like_path(text):
        return load_profile_file(text)
    builtins = _builtin_files()
    if text in builtins:
        return _load_builtin(text, builtins[text])
    if Path(text).is_file():
        return load_profile_file(text)
    close = difflib.get_close_matches(text, list(builtins), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ProfileError(f"unknown profile '{text}'{hint}; built-in profiles: "
                       f"{', '.join(builtins)}; or give the path to a {SUFFIX} file "
                       "(see docs/profiles.md)")


__all__ = ["builtin_names", "list_profiles", "load_profile", "load_profile_file"]
