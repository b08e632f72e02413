"""``python -m edgestack``: the ``edgestack`` command."""

from edgestack.cli import cli_entry

cli_entry()
