"""`python -m pipeline ...` is the `ocpi-pipeline` command (the stack starts its children this way)."""

from pipeline.cli import cli

cli()
