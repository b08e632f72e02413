"""The :class:`Profile` dataclass and the validation of every field.

A profile describes one device as the toolchain needs it: which target compiles for it, the
CPU architecture, the precision to run in, the threads to use, the bytes the model may use
(``memory_budget``: weights, activation arena and runtime overhead together, as the runtime
planner counts them) and, optionally, a latency target. The TOML layout and the shipped
profiles are documented in docs/profiles.md.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgestack.errors import ProfileError
from edgestack.profiles.sizes import EXPECTED as _SIZE_EXPECTED
from edgestack.profiles.sizes import format_size, size_problem

TARGETS = ("ort-cpu", "ort-arm", "openvino-cpu", "tensorrt-gpu")
ARCHES = ("x86_64", "aarch64")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
THREADS_RANGE = (1, 256)

REQUIRED_FIELDS = ("name", "description", "target", "arch", "precision", "threads",
                   "memory_budget")
OPTIONAL_FIELDS = ("latency_target_ms", "graph_optimization", "device_memory_total", "notes")
FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS

#: The architecture each target implies, where it implies one (the ONNX Runtime targets are
#: named by their CPU family; OpenVINO and TensorRT run on both).
TARGET_ARCH = {"ort-cpu": "x86_64", "ort-arm": "aarch64"}

#: The precisions each target can run. ONNX Runtime's CPU kernels have no bf16 and fp16 only
#: on ARM (MLAS fp16 kernels need ARMv8.2 FP16); OpenVINO CPU runs bf16 on AVX512-BF16/AMX
#: x86 and fp16 on ARM; TensorRT runs all four.
TARGET_PRECISIONS = {
    "ort-cpu": ("fp32", "int8"),
    "ort-arm": ("fp32", "fp16", "int8"),
    "openvino-cpu": ("fp32", "fp16", "bf16", "int8"),
    "tensorrt-gpu": ("fp32", "fp16", "bf16", "int8"),
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

#: What each field must be, as the messages say it.
EXPECTED = {
    "name": "a non-empty string of letters, digits, '.', '_' or '-'",
    "description": "a non-empty string",
    "target": "one of " + ", ".join(TARGETS),
    "arch": "one of " + ", ".join(ARCHES),
    "precision": "one of " + ", ".join(PRECISIONS),
    "threads": f"an integer in {THREADS_RANGE[0]}..{THREADS_RANGE[1]}",
    "memory_budget": _SIZE_EXPECTED,
    "latency_target_ms": "a positive number of milliseconds",
    "graph_optimization": "one of " + ", ".join(GRAPH_OPTIMIZATIONS),
    "device_memory_total": _SIZE_EXPECTED,
    "notes": "a string",
}

_TOML_TYPES = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
               (list, "an array"), (dict, "a table"))


def _toml_type(value: object) -> str:
    for cls, name in _TOML_TYPES:
        if isinstance(value, cls):
            return name
    return "a date/time" if hasattr(value, "isoformat") else f"a {type(value).__name__}"


def _show(value: object) -> str:
    """A value as TOML would write it (short)."""
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    text = value.isoformat() if hasattr(value, "isoformat") else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _found(value: object, wrong_type: bool) -> str:
    return f"{_show(value)} ({_toml_type(value)})" if wrong_type else _show(value)


@dataclass(frozen=True)
class Profile:
    """One device profile.

    Constructing a ``Profile`` validates every field (raising :class:`ProfileError`) and
    normalizes sizes to int bytes and ``latency_target_ms`` to float, so
    ``Profile(..., memory_budget="1.5GiB")`` holds ``1610612736``.

    Attributes:
        name: The profile's name (the file stem of its TOML file).
        description: One line saying which device this is.
        target: The compile target: ``ort-cpu``, ``ort-arm``, ``openvino-cpu`` or
            ``tensorrt-gpu``.
        arch: The CPU architecture: ``x86_64`` or ``aarch64``.
        precision: The precision to run in: ``fp32``, ``fp16``, ``bf16`` or ``int8``.
        threads: Intra-op threads for the runtime, 1..256.
        memory_budget: Bytes the model may use: weights, activation arena and runtime
            overhead together.
        latency_target_ms: The latency to aim for per inference, or None.
        graph_optimization: Graph optimization level: ``disable``, ``basic``,
            ``extended`` or ``all`` (ONNX Runtime's levels; default ``all``).
        device_memory_total: The device's total memory in bytes (for a GPU that shares RAM
            with the CPU, that RAM), or None.
        notes: Free text, or None.
        source: The file the profile was read from (not part of the profile's value: not in
            :meth:`to_dict`, not compared).
    """

    name: str
    description: str
    target: str
    arch: str
    precision: str
    threads: int
    memory_budget: int
    latency_target_ms: float | None = None
    graph_optimization: str = "all"
    device_memory_total: int | None = None
    notes: str | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = self.source or (f"profile '{self.name}'" if isinstance(self.name, str)
                                else "profile")
        values = {name: getattr(self, name) for name in FIELDS}
        for name, value in _validate_fields(values, where).items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None,
                  where: str | None = None) -> Profile:
        """Build a profile from a mapping such as a parsed TOML file or :meth:`to_dict`.

        Args:
            data: Field name -> value. Unknown fields and missing required fields are
                errors; sizes may be int bytes or strings with units.
            source: Recorded as :attr:`source` (the file it came from), if given.
            where: How error messages name the input (default: ``source``, or
                ``"profile"``).

        Raises:
            ProfileError: A field is unknown, missing or invalid.
        """
        where = where or source or "profile"
        if not isinstance(data, Mapping):
            raise ProfileError(f"{where}: a profile must be a table of fields, "
                               f"found {_toml_type(data)}")
        unknown = [k for k in data if k not in FIELDS]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, FIELDS, n=1)
                if close:
                    hints.append(f"'{k}' (did you mean '{close[0]}'?)")
                else:
                    hints.append(f"'{k}'")
            plural = "s" if len(unknown) > 1 else ""
            raise ProfileError(f"{where}: unknown field{plural} {', '.join(hints)}; "
                               f"allowed fields: {', '.join(FIELDS)}")
        missing = [k for k in REQUIRED_FIELDS if k not in data]
        if missing:
            listed = "; ".join(f"'{k}': {EXPECTED[k]}" for k in missing)
            plural = "s" if len(missing) > 1 else ""
            raise ProfileError(f"{where}: missing required field{plural} {listed}")
        values = _validate_fields(dict(data), where)
        return cls(**values, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The profile's fields as a JSON- and TOML-ready dict (sizes in bytes).

        Optional fields that are unset (None) are left out; ``Profile.from_dict(p.to_dict())
        == p``.
        """
        out: dict[str, Any] = {}
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def summary(self) -> str:
        """One line: name, target, arch, precision, threads, budget."""
        latency = (f", {self.latency_target_ms:g} ms target"
                   if self.latency_target_ms is not None else "")
        return (f"{self.name}: {self.target} {self.arch} {self.precision}, "
                f"{self.threads} threads, budget {format_size(self.memory_budget)}{latency}")


def _bad(where: str, name: str, value: object, wrong_type: bool, extra: str = "") -> ProfileError:
    return ProfileError(f"{where}: field '{name}' must be {EXPECTED[name]}, "
                        f"found {_found(value, wrong_type)}{extra}")


def _choice(where: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise _bad(where, name, value, wrong_type=True)
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        raise _bad(where, name, value, wrong_type=False,
                   extra=f" (did you mean '{close[0]}'?)" if close else "")
    return value


def _size(where: str, name: str, value: object) -> int:
    n, reason = size_problem(value)
    if n is None:
        wrong_type = not isinstance(value, (str, int)) or isinstance(value, bool)
        raise _bad(where, name, value, wrong_type, extra=f": {reason}")
    return n


def _validate_fields(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check each field in ``values`` (all of FIELDS present, None for unset optionals
    allowed) and return the normalized values. Raises ProfileError on the first problem."""
    out: dict[str, Any] = {}

    name = values["name"]
    if not isinstance(name, str):
        raise _bad(where, "name", name, wrong_type=True)
    if not _NAME_RE.match(name):
        raise _bad(where, "name", name, wrong_type=False)
    out["name"] = name

    desc = values["description"]
    if not isinstance(desc, str):
        raise _bad(where, "description", desc, wrong_type=True)
    if not desc.strip():
        raise _bad(where, "description", desc, wrong_type=False)
    out["description"] = desc

    out["target"] = _choice(where, "target", values["target"], TARGETS)
    out["arch"] = _choice(where, "arch", values["arch"], ARCHES)
    out["precision"] = _choice(where, "precision", values["precision"], PRECISIONS)

    threads = values["threads"]
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise _bad(where, "threads", threads, wrong_type=True)
    lo, hi = THREADS_RANGE
    if not lo <= threads <= hi:
        raise _bad(where, "threads", threads, wrong_type=False)
    out["threads"] = threads

    out["memory_budget"] = _size(where, "memory_budget", values["memory_budget"])

    latency = values.get("latency_target_ms")
    if latency is not None:
        if isinstance(latency, bool) or not isinstance(latency, (int, float)):
            raise _bad(where, "latency_target_ms", latency, wrong_type=True)
        if not (math.isfinite(latency) and latency > 0):
            raise _bad(where, "latency_target_ms", latency, wrong_type=False)
        latency = float(latency)
    out["latency_target_ms"] = latency

    graph_opt = values.get("graph_optimization")
    out["graph_optimization"] = ("all" if graph_opt is None else
                                 _choice(where, "graph_optimization", graph_opt,
                                         GRAPH_OPTIMIZATIONS))

    total = values.get("device_memory_total")
    out["device_memory_total"] = (None if total is None else
                                  _size(where, "device_memory_total", total))

    notes = values.get("notes")
    if notes is not None and not isinstance(notes, str):
        raise _bad(where, "notes", notes, wrong_type=True)
    out["notes"] = notes

    # Fields that must agree with each other.
    need_arch = TARGET_ARCH.get(out["target"])
    if need_arch and out["arch"] != need_arch:
        raise ProfileError(f"{where}: field 'arch' must be {need_arch} for target "
                           f"'{out['target']}', found '{out['arch']}' (for an "
                           f"{out['arch']} device use target "
                           f"'{'ort-arm' if out['arch'] == 'aarch64' else 'ort-cpu'}')")
    allowed = TARGET_PRECISIONS[out["target"]]
    if out["precision"] not in allowed:
        raise ProfileError(f"{where}: field 'precision' must be one of {', '.join(allowed)} "
                           f"for target '{out['target']}', found '{out['precision']}'")
    if out["device_memory_total"] is not None and out["memory_budget"] > out["device_memory_total"]:
        raise ProfileError(
            f"{where}: field 'memory_budget' ({format_size(out['memory_budget'])}) must not "
            f"exceed field 'device_memory_total' ({format_size(out['device_memory_total'])})")
    return out


__all__ = ["Profile", "TARGETS", "ARCHES", "PRECISIONS", "GRAPH_OPTIMIZATIONS", "FIELDS",
           "REQUIRED_FIELDS", "OPTIONAL_FIELDS", "THREADS_RANGE", "TARGET_ARCH",
           "TARGET_PRECISIONS"]
