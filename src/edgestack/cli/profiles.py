"""``edgestack profiles``: list the built-in device profiles, show one (built-in or a file)."""

from __future__ import annotations

import argparse
import textwrap

from edgestack.cli import EXIT_OK, emit_json

_COLUMNS = ("name", "target", "arch", "precision", "threads", "budget", "latency target")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profiles",
        help="list and show device profiles",
        description="Device profiles say how to build and run a model for one device: "
        "target, CPU architecture, precision, threads, memory budget and latency target. "
        "Built-in profiles ship with edgestack; a profile of your own is a TOML file "
        "(docs/profiles.md).",
    )
    actions = p.add_subparsers(dest="profiles_command", metavar="ACTION", required=True)
    lst = actions.add_parser("list", help="table of the built-in profiles",
                             description="List the built-in device profiles.")
    lst.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    lst.set_defaults(run=run)
    show = actions.add_parser("show", help="every field of one profile",
                              description="Validate and show one profile: a built-in name "
                              "(see `edgestack profiles list`) or the path to a .toml file.")
    show.add_argument("profile", metavar="NAME|PATH",
                      help="built-in profile name, or path to a profile .toml file")
    show.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    show.set_defaults(run=run)


def _latency(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:g} ms"


def table(profiles: list) -> str:
    """The ``profiles list`` table: one row per profile, aligned columns."""
    from edgestack.profiles import format_size  # lazy: keeps CLI start light

    rows = [_COLUMNS] + [
        (p.name, p.target, p.arch, p.precision, str(p.threads), format_size(p.memory_budget),
         _latency(p.latency_target_ms))
        for p in profiles
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    right = {4}  # numbers read better right-aligned
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                 enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def details(profile) -> str:
    """The ``profiles show`` text: one field per line, sizes with their bytes."""
    from edgestack.profiles import FIELDS, format_size  # lazy: keeps CLI start light

    width = max(len(f) for f in FIELDS + ("file",))
    lines = []
    for name in FIELDS:
        value = getattr(profile, name)
        if value is None:
            text = "-"
        elif name in ("memory_budget", "device_memory_total"):
            text = f"{format_size(value)} ({value} bytes)"
        elif name == "latency_target_ms":
            text = f"{value:g}"
        else:
            text = str(value)
        if name == "notes" and value:
            pad = " " * (width + 2)
            text = textwrap.fill(" ".join(text.split()), width=96, initial_indent=pad,
                                 subsequent_indent=pad).lstrip()
        lines.append(f"{name.ljust(width)}  {text}")
    lines.append(f"{'file'.ljust(width)}  {profile.source or '-'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from edgestack.profiles import list_profiles, load_profile  # lazy: keeps CLI start light

    if args.profiles_command == "list":
        profiles = list_profiles()
        if args.json:
            emit_json({"ok": True, "profiles": [p.to_dict() for p in profiles]})
        else:
            print(table(profiles))
            print(f"\n{len(profiles)} built-in profiles; `edgestack profiles show NAME` for "
                  "every field")
        return EXIT_OK
    if args.profiles_command == "show":
        profile = load_profile(args.profile)
        if args.json:
            emit_json({"ok": True, "profile": profile.to_dict(), "file": profile.source})
        else:
            print(details(profile))
        return EXIT_OK
    raise AssertionError(f"unhandled profiles action {args.profiles_command!r}")  # pragma: no cover
