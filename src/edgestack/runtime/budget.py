"""Memory budgets: an explicit size, a device profile's ``memory_budget``, or live memory.

``--auto`` (:func:`available_memory`) takes the smallest of ``psutil.virtual_memory().available``
and the cgroup limit left (v2: ``memory.max - memory.current``; v1:
``memory.limit_in_bytes - memory.usage_in_bytes``), minus a safety margin of
:data:`AUTO_MARGIN_FRACTION` of it (at least :data:`AUTO_MARGIN_MIN`): other processes may
allocate between planning and loading, and the kernel needs page cache to read the package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgestack.errors import BudgetError, ProfileError
from edgestack.profiles import load_profile, parse_size

AUTO_MARGIN_FRACTION = 0.10
AUTO_MARGIN_MIN = 32 * 2**20
_UNLIMITED = 2**60


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_limit_left(root: str | os.PathLike[str] = "/sys/fs/cgroup") -> int | None:
    """Bytes the cgroup of this process may still allocate, or None when unlimited/unknown."""
    base = Path(root)
    rel = ""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and (parts[0] == "0" or "memory" in parts[1].split(",")):
                rel = parts[2].lstrip("/")
                if parts[0] == "0":
                    break
    except OSError:
        pass
    for folder in ([base / rel, base] if rel else [base]):
        limit = _read_int(folder / "memory.max")
        if limit is not None:
            used = _read_int(folder / "memory.current") or 0
            return None if limit >= _UNLIMITED else max(0, limit - used)
    for folder in ([base / "memory" / rel, base / "memory"] if rel else [base / "memory"]):
        limit = _read_int(folder / "memory.limit_in_bytes")
        if limit is not None:
            used = _read_int(folder / "memory.usage_in_bytes") or 0
            return None if limit >= 2**62 else max(0, limit - used)
    return None


def available_memory() -> dict[str, Any]:
    """``{"available", "cgroup_left", "budget", "margin"}`` in bytes (see the module doc)."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    left = cgroup_limit_left()
    free = min(avail, left) if left is not None else avail
    margin = max(AUTO_MARGIN_MIN, int(free * AUTO_MARGIN_FRACTION))
    return {"available": avail, "cgroup_left": left, "margin": margin,
            "budget": max(0, free - margin)}


def resolve_budget(budget: Any = None, *, profile: Any = None,
                   auto: bool = False) -> tuple[int | None, str]:
    """``(bytes, source)`` from exactly one of ``budget`` (bytes or a size string such as
    ``"48MB"``), ``profile`` (a Profile or its name), ``auto``; ``(None, "unlimited")`` when
    none is given.

    Raises:
        BudgetError: more than one source, or a bad size; ProfileError: unknown profile.
    """
    given = [x for x in (budget is not None, profile is not None, bool(auto)) if x]
    if len(given) > 1:
        raise BudgetError("give one memory budget source: --budget SIZE, --profile NAME or "
                          "--auto, not several")
    if budget is not None:
        try:
            return parse_size(budget, "budget"), f"--budget {budget}"
        except ProfileError as exc:
            raise BudgetError(str(exc)) from None
    if profile is not None:
        p = load_profile(profile) if isinstance(profile, str) else profile
        return int(p.memory_budget), f"profile {p.name}"
    if auto:
        info = available_memory()
        if info["budget"] <= 0:
            raise BudgetError(
                f"--auto: only {info['available'] / 2**20:.0f} MiB available (cgroup left: "
                f"{info['cgroup_left']}), less than the {info['margin'] / 2**20:.0f} MiB "
                "safety margin; free memory or give --budget"
            )
        left = info["cgroup_left"]
        left_text = "unlimited" if left is None else f"{left / 2**20:.0f} MiB"
        return int(info["budget"]), (
            f"auto: available {info['available'] / 2**20:.0f} MiB, cgroup left {left_text}, "
            f"margin {info['margin'] / 2**20:.0f} MiB")
    return None, "unlimited"


__all__ = ["resolve_budget", "available_memory", "cgroup_limit_left", "AUTO_MARGIN_FRACTION",
           "AUTO_MARGIN_MIN"]
