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
import logging
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from edgestack import __version__
from edgestack.cli.outputs import input_paths, prepare_output  # noqa: F401 - for the commands
from edgestack.core import atomic
from edgestack.core.progress import Progress, logging_through_bars
from edgestack.core.text import printable, printable_lines
from edgestack.errors import BackendUnavailable, EdgestackError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_SKIPPED = 4


def _commands() -> list:
    from edgestack.cli import (  # lazy: cycle, the commands import edgestack.cli
        bench,
        compile,
        demo,
        diff,
        export,
        inspect,
        pack,
        parity,
        plan,
        profiles,
        quality,
        run,
        sensitivity,
        verify,
    )

    return [export, quality, sensitivity, compile, parity, verify, diff, bench, pack, inspect,
            plan, run, profiles, demo]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit 2), like every
    other input error: ``edgestack run: error: argument --repeat: ...; see `edgestack run
    --help```. Sub-command parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {line}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = _Parser(
        prog="edgestack",
        description="Compressed neural networks on edge devices: export compressed models "
        "to ONNX without re-densifying them, compile for edge targets, fit memory budgets.",
        epilog="Exit codes: 0 ok, 1 check failed (e.g. parity), 2 bad input, 3 internal "
        "error, 4 skipped (backend not available). `edgestack COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"edgestack {__version__}")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true",
                   help="only warnings and errors on stderr (no progress lines)")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="debug messages of edgestack's libraries too")
    g.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                   help="stderr log level (default info: progress lines)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (tqdm) on stderr: --progress shows them even when "
                        "stderr is not a terminal, --no-progress never (default: when stderr "
                        "is a terminal and progress lines are shown, i.e. not with -q)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _commands():
        module.add_parser(sub)
    return parser


CLI_HANDLER = "edgestack-cli"
"""Name of the stderr handler :func:`main` puts on the ``edgestack`` logger (and takes off)."""

LOG_LEVELS = ("debug", "info", "warning", "error")
"""``--log-level`` values: the ``logging`` level of the ``edgestack`` loggers on stderr."""


def progress(command: str) -> Callable[[str], None]:
    """The progress function of a command: ``[edgestack COMMAND] message`` lines on stderr at
    INFO through the ``edgestack.cli`` logger (``-q`` hides them); ``--json`` output on stdout
    stays one object."""
    logger = logging.getLogger(f"edgestack.cli.{command}")
    return lambda message: logger.info("[edgestack %s] %s", command, message)


def bars(args: argparse.Namespace) -> Progress:
    """The ``progress`` setting the command's library calls get
    (:mod:`edgestack.core.progress`): ``--progress`` / ``--no-progress`` when given, else
    none when the progress lines are hidden (``-q``, ``--log-level warning|error``), else
    ``None`` (bars when stderr is a terminal). Bars go to stderr, never into ``--json``
    output on stdout."""
    given = getattr(args, "progress", None)
    if given is not None:
        return bool(given)
    level = getattr(args, "log_level", None)
    if getattr(args, "quiet", False) or level in ("warning", "error"):
        return False
    return None


def warn(command: str, message: str) -> None:
    """A warning line of a command on stderr (shown unless ``--log-level error``); what it
    quotes of a package or model is escaped (:func:`~edgestack.core.text.printable`)."""
    logging.getLogger(f"edgestack.cli.{command}").warning("warning: %s",
                                                          printable_lines(message))


def _configure_logging(args: argparse.Namespace) -> logging.Handler:
    """Send the ``edgestack`` loggers (the CLI's progress, the libraries' messages) to stderr
    at the level the flags ask; returns the handler so :func:`main` can take it off again
    (the root logger and other libraries' loggers are left alone)."""
    level = args.log_level or ("warning" if args.quiet else "debug" if args.verbose
                               else "info")
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(CLI_HANDLER)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("edgestack")
    logger.addHandler(handler)
    # by default the commands' progress lines, and only warnings from the libraries
    # (their INFO lines, e.g. each export stage, show with -v or --log-level info)
    explicit = args.log_level is not None or args.verbose
    logger.setLevel(level.upper() if explicit else max(logging.WARNING,
                                                       logging.getLevelName(level.upper())))
    logging.getLogger("edgestack.cli").setLevel(level.upper())
    logger.propagate = False
    return handler


@dataclass(frozen=True)
class Bound:
    """The values a numeric option accepts: ``lo`` <= value (``lo`` < value with ``above``),
    value <= ``hi``; ``cpus``: at most this machine's CPU count (``os.cpu_count()``: more
    threads than CPUs only slow a run down, and a huge count would hang it). Integers and
    finite floats only (argparse gives the type)."""

    lo: float | None = None
    hi: float | None = None
    above: bool = False
    cpus: bool = False

    def problem(self, value: float) -> str | None:
        """Why ``value`` is refused (the expected range), or None."""
        hi = (os.cpu_count() or 1) if self.cpus else self.hi
        ok = math.isfinite(value) and (self.lo is None or (
            value > self.lo if self.above else value >= self.lo)) and (hi is None or value <= hi)
        if ok:
            return None
        kind = "an integer" if isinstance(value, int) else "a number"
        if self.lo is not None and hi is not None:
            want = f"{kind} from {self.lo:g} to {hi:g}"
        elif self.lo is not None:
            want = f"{kind} {'>' if self.above else '>='} {self.lo:g}"
        else:
            want = f"{kind} <= {hi:g}"
        return want + (" (this machine's CPUs)" if self.cpus else "")


COUNT = Bound(1)
"""A count of one or more (``--repeat``, ``--batch``, ``--iterations``, ...)."""
NONNEG = Bound(0)
"""Zero or more (tolerances, ``--warmup``, ``--calib-n``, ...)."""
POSITIVE = Bound(0, above=True)
"""More than zero (``--seconds``, ``--factor-bits``, ...)."""
THREADS = Bound(1, cpus=True)
"""``--threads``: 1 to the CPUs of this machine."""


def bounds(parser: argparse.ArgumentParser, **limits: Bound) -> None:
    """Declare the accepted range of numeric options of a command (by ``dest``); :func:`main`
    checks them before the command runs, so a bad count exits 2 at once."""
    parser.set_defaults(_bounds={**(parser.get_default("_bounds") or {}), **limits})


def check_bounds(args: argparse.Namespace) -> None:
    """Refuse the numeric options outside their :func:`bounds`, all in one line.

    Raises:
        EdgestackError: ``--repeat 0: expected an integer >= 1, found 0; ...``.
    """
    bad = []
    for dest, bound in (getattr(args, "_bounds", None) or {}).items():
        value = getattr(args, dest, None)
        if value is None or isinstance(value, bool):
            continue
        want = bound.problem(value)
        if want is not None:
            bad.append(f"--{dest.replace('_', '-')} {value!r}: expected {want}")
    if bad:
        raise EdgestackError(f"bad {'; bad '.join(bad)}; pass a value in the range")


def one_line(message: object) -> str:
    """An error message as one line (its lines joined, whitespace runs collapsed, other
    control characters escaped: :func:`~edgestack.core.text.printable`): every input error
    is one line on stderr, and a name it quotes from a package cannot write to the
    terminal."""
    return printable(" ".join(str(message).split()))


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
    handler = _configure_logging(args)
    try:
        # log lines printed while a bar is on stderr go through tqdm, above the bar
        check_bounds(args)
        atomic.sweep(tempfile.gettempdir())  # scratch folders of killed runs (never raises)
        with logging_through_bars(bars(args), [logging.getLogger("edgestack")]):
            code = int(args.run(args))
        sys.stdout.flush()              # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:
        # the reader went away (`edgestack profiles list | head -1`): end quietly, as Unix
        # tools do, with stdout pointed at /dev/null so the interpreter's final flush is quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except BackendUnavailable as exc:  # the input is fine; this machine cannot run it
        if want_json:
            emit_json({"ok": False, "skipped": True, "error": str(exc),
                       "error_type": type(exc).__name__})
        print(f"edgestack {args.command}: skipped: {one_line(exc)}", file=sys.stderr)
        return EXIT_SKIPPED
    except EdgestackError as exc:
        if want_json:
            emit_json({"ok": False, "error": str(exc), "error_type": type(exc).__name__})
        print(f"edgestack {args.command}: error: {one_line(exc)}", file=sys.stderr)
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
    finally:
        logger = logging.getLogger("edgestack")
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
        logging.getLogger("edgestack.cli").setLevel(logging.NOTSET)


def cli_entry() -> None:  # pragma: no cover - console-script shim
    sys.exit(main())
