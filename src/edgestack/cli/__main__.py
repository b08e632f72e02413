from edgestack.cli import cli_entry

cli_entry()
