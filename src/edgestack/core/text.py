"""Text shown on a terminal: names and paths read from a package or a model file are escaped.

A package's model name, layer names, graph input and output names and free-form metadata
are whatever its manifest or graph says; printed as they are, a name could carry an ANSI
escape sequence (recolour, move the cursor, rewrite earlier lines, set the window title) or
a newline that forges a line of output. :func:`printable` is the one place where such text
is made safe; the commands that print package contents (``inspect``, ``verify``, ``plan``,
``run``) and every error line go through it.
"""

from __future__ import annotations


def printable(value: object) -> str:
    """``str(value)`` with every character that is not printable written as a Python escape,
    as ``repr`` writes it: control characters (``ESC`` of an ANSI sequence as ``\\x1b``,
    newline ``\\n``, tab ``\\t``, ``DEL`` ``\\x7f``), C1 controls, and invisible format
    characters such as bidirectional overrides (``\\u202e``). Printable text, including
    non-ASCII letters, is unchanged; a backslash stays one backslash.

    Example: ``printable("m\\x1b[2Jodel\\n")`` is ``'m\\\\x1b[2Jodel\\\\n'`` (shown as
    ``m\\x1b[2Jodel\\n``).
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def printable_lines(text: object) -> str:
    """:func:`printable` of each line of ``text``, the line breaks kept: for text made of
    lines (a table) whose fields may hold names."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


__all__ = ["printable", "printable_lines"]
