"""Byte sizes written by people: ``"48MB"``, ``"1.5 GiB"``, ``"1024"`` or ``1024``.

Both unit families are accepted, case-insensitively, with or without a space:

=========  ============  =========  ============
decimal    bytes         binary     bytes
=========  ============  =========  ============
``B``      1             ``B``      1
``kB``     1000          ``KiB``    1024
``MB``     1000**2       ``MiB``    1024**2
``GB``     1000**3       ``GiB``    1024**3
``TB``     1000**4       ``TiB``    1024**4
=========  ============  =========  ============

A plain number is bytes. Fractions are allowed with a unit (``"1.5GB"``) and rounded to the
nearest byte; a fraction of a single byte, zero, negative sizes and unknown units are refused
with a :class:`~edgestack.errors.ProfileError` that says why. Arithmetic is decimal, so
``"1.1GB"`` is exactly 1_100_000_000 bytes, never 1_099_999_999.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from edgestack.errors import ProfileError

#: Unit name (lower case) -> bytes.
UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

# Display spelling of each unit, in the order format_size tries them (largest first).
_DISPLAY = (("TiB", 1024**4), ("TB", 1000**4), ("GiB", 1024**3), ("GB", 1000**3),
            ("MiB", 1024**2), ("MB", 1000**2), ("KiB", 1024), ("kB", 1000))

UNITS_HELP = "B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"

_SIZE_RE = re.compile(r"^\s*([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")

MAX_SIZE = 2**64
"""The largest size accepted (16 EiB): larger numbers are typos, and beyond Decimal's 28
digits rounding them would fail."""

EXPECTED = ("a positive number of bytes (an integer, or a string with a unit such as '48MB' "
            "or '1.5GiB')")


def _describe(value: object) -> str:
    """``value`` as a message shows it: strings quoted, with its type when it is not one."""
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value!r} (a float)"
    return f"{value!r} (a {type(value).__name__})"


def size_problem(value: object) -> tuple[int | None, str | None]:
    """Parse ``value`` without raising: ``(bytes, None)`` or ``(None, reason)``.

    The reason is a short clause ("unknown unit 'XB'; ...") for callers that build their
    own message, such as the profile validator, which names the file and the field.
    """
    if isinstance(value, bool):
        return None, "a boolean is not a size"
    if isinstance(value, int):
        if value < 0:
            return None, "a size cannot be negative"
        if value == 0:
            return None, "a size must be more than 0 bytes"
        if value > MAX_SIZE:
            return None, "more than 2^64 bytes (what a 64-bit machine can address) is not a size"
        return value, None
    if isinstance(value, float):
        return None, ("a float is not a number of bytes; write an integer, or a string "
                      "with a unit such as '1.5GB'")
    if not isinstance(value, str):
        return None, f"a {type(value).__name__} is not a size"
    m = _SIZE_RE.match(value)
    if not m:
        if not value.strip():
            return None, "the string is empty"
        return None, "not a number followed by an optional unit"
    sign, number, unit = m.groups()
    factor = UNITS.get(unit.lower()) if unit else 1
    if factor is None:
        return None, f"unknown unit '{unit}'; use {UNITS_HELP}"
    try:
        exact = Decimal(number) * factor
    except InvalidOperation:  # pragma: no cover - the regex only lets numbers through
        return None, "not a number"
    if sign == "-" and exact != 0:
        return None, "a size cannot be negative"
    if exact == 0:
        return None, "a size must be more than 0 bytes"
    if exact > MAX_SIZE:
        return None, "more than 2^64 bytes (what a 64-bit machine can address) is not a size"
    if factor == 1 and exact != exact.to_integral_value():
        return None, "a fraction of a byte is not a size"
    n = int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    if n == 0:
        return None, "less than one byte is not a size"
    return n, None


def parse_size(value: str | int, what: str = "size") -> int:
    """Parse a byte size: ``"48MB"``, ``"48 MB"``, ``"48MiB"``, ``"1.5GB"``, ``"1024"``, ``1024``.

    Args:
        value: An int (bytes) or a string: a number with an optional unit (``B``, ``kB``,
            ``MB``, ``GB``, ``TB``, ``KiB``, ``MiB``, ``GiB``, ``TiB``; case-insensitive).
        what: What the value is, for the error message (e.g. ``"--budget"``).

    Returns:
        The size in bytes, a positive int.

    Raises:
        ProfileError: ``value`` is not a positive size (negative, zero, a float, a bad number
            or an unknown unit); the message names ``what``, the value and the reason.
    """
    n, reason = size_problem(value)
    if n is None:
        raise ProfileError(f"{what} must be {EXPECTED}, found {_describe(value)}: {reason}")
    return n


def format_size(n: int) -> str:
    """Format a byte count for people, exactly where it can be.

    Picks the largest unit, binary or decimal, in which ``n`` is written exactly with at most
    two decimals (``50331648 -> "48 MiB"``, ``48000000 -> "48 MB"``,
    ``1500000000 -> "1.5 GB"``); otherwise rounds to two decimals in binary units
    (``123456789 -> "117.74 MiB"``). The output is accepted by :func:`parse_size`.

    Args:
        n: A number of bytes (negative numbers get a leading ``-``).

    Returns:
        The formatted size, e.g. ``"1.5 GiB"`` or ``"512 B"``.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"format_size takes an int number of bytes, got {type(n).__name__}")
    if n < 0:
        return "-" + format_size(-n)
    for unit, factor in _DISPLAY:
        if n >= factor and (n * 100) % factor == 0:
            return f"{_trim(Decimal(n) / factor)} {unit}"
    if n < 1024:
        return f"{n} B"
    for unit, factor in _DISPLAY:
        if unit.endswith("iB") and n >= factor:
            return f"{_trim((Decimal(n) / factor).quantize(Decimal('0.01')))} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover - n >= 1024 matches KiB


def _trim(d: Decimal) -> str:
    """``Decimal`` to text without trailing zeros or exponent: 1.50 -> "1.5", 48 -> "48"."""
    text = f"{d:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


__all__ = ["UNITS", "UNITS_HELP", "EXPECTED", "MAX_SIZE", "parse_size", "format_size",
           "size_problem"]
