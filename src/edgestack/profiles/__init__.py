"""Device profiles: TOML data for real devices, and a loader that validates every field.

A profile says how to build and run a model for one device: the compile target, the CPU
architecture, the precision, the threads and the memory budget (the bytes the model may use:
weights, activation arena and runtime overhead). Built-in profiles ship as ``*.toml`` files in
this package; users write their own in the same format (docs/profiles.md).

This package imports only the standard library (the on-device runtime imports it)::

    from edgestack.profiles import load_profile, parse_size
    p = load_profile("rpi5-4gb")           # or load_profile("my-board.toml")
    p.memory_budget                         # 1610612736 (bytes)
    parse_size("48MB"), parse_size("1.5GiB")
"""

from edgestack.profiles.loader import builtin_names, list_profiles, load_profile, load_profile_file
from edgestack.profiles.profile import (
    ARCHES,
    FIELDS,
    GRAPH_OPTIMIZATIONS,
    OPTIONAL_FIELDS,
    PRECISIONS,
    REQUIRED_FIELDS,
    TARGETS,
    Profile,
)
from edgestack.profiles.sizes import format_size, parse_size

__all__ = [
    "Profile",
    "list_profiles",
    "load_profile",
    "load_profile_file",
    "builtin_names",
    "parse_size",
    "format_size",
    "TARGETS",
    "ARCHES",
    "PRECISIONS",
    "GRAPH_OPTIMIZATIONS",
    "FIELDS",
    "REQUIRED_FIELDS",
    "OPTIONAL_FIELDS",
]
