"""The ``edgestack`` command: a thin layer over the public API.

Each sub-command lives in its own module with ``add_parser(subparsers)`` and
``run(args) -> int``. Exit codes (documented in docs/cli.md):

    0  success
    1  the job ran but its check failed (parity above tolerance, failed self-test)
    2  bad input or unusable environment (an EdgestackError), or bad usage
    3  internal error (a bug: please report it)
    4  skipped: the requested backend or target is not available on this machine
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from collections.abc import Sequence

from edgestack import __version__
from edgestack.errors import EdgestackError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_SKIPPED = 4


def _commands() -> list:
    from edgestack.cli import (
        bench,
        compile,
        demo,
        export,
        pack,
        parity,
        plan,
        profiles,
        quality,
        run,
        verify,
    )

    return [export, quality, compile, parity, verify, bench, pack, plan, run, profiles, demo]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="edgestack",
        description="Compressed neural networks on edge devices: export compressed models "
        "to ONNX without re-densifying them, compile for edge targets, fit memory budgets.",
        epilog="Exit codes: 0 ok, 1 check failed (e.g. parity), 2 bad input, 3 internal "
        "error, 4 skipped (backend not available). `edgestack COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"edgestack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _commands():
        module.add_parser(sub)
    return parser


def emit_json(obj: object) -> None:
    """Print one JSON document to stdout."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    want_json = getattr(args, "json", False)
    # torch 2.13's own use of a deprecated pytree API inside torch.export: not actionable
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    try:
        return int(args.run(args))
    except EdgestackError as exc:
        if want_json:
            emit_json({"ok": False, "error": str(exc), "error_type": type(exc).__name__})
        print(f"edgestack {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"edgestack {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last-resort report of a bug
        traceback.print_exc()
        if want_json:
            emit_json({"ok": False, "error": f"internal error: {exc!r}",
                       "error_type": "InternalError"})
        print(f"edgestack {args.command}: internal error (a bug in edgestack): {exc!r}",
              file=sys.stderr)
        return EXIT_INTERNAL


def cli_entry() -> None:  # pragma: no cover - console-script shim
    sys.exit(main())
