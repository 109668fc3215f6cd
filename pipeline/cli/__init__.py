"""The `ocpi-pipeline` command: run the services, the demo, migrations and queries."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from infra.settings import SettingsError, load_settings
from pipeline.cli.jobs import export, pull, replay
from pipeline.cli.partners import partners
from pipeline.cli.reports import report
from pipeline.cli.retention import retention_group
from pipeline.cli.services import demo, dev, serve, worker
from pipeline.cli.store import migrate, query, settings_cmd


class _Group(click.Group):
    """Turns configuration errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except SettingsError as exc:
            raise click.ClickException(f"configuration: {exc}") from None
        except OSError as exc:
            if not isinstance(exc.filename, str | bytes | os.PathLike):  # no file named (a socket, a process): a bug
                raise
            raise click.ClickException(_file_error(exc)) from None


def _file_error(exc: OSError) -> str:
    """A file or directory the command could not use, named; with the setting to fix when it is the data dir."""
    filename = os.fsdecode(exc.filename)
    message = f"{filename}: {exc.strerror or exc}"
    try:
        data_dir = load_settings().storage.path.resolve()
    except SettingsError:
        return message
    if Path(filename).resolve().is_relative_to(data_dir):
        return (f"{message}; OCPI_DATA_DIR ({data_dir}) must be a directory this user may create and write "
                "(the store, run files, secrets and job checkpoints live there)")
    return message


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Log level of this process.")
@click.pass_context
def cli(ctx: click.Context, log_level: str) -> None:
    """OCPI 2.2.1 ingestion and billing analytics: receivers -> Kafka/Avro -> Faust -> ClickHouse.

    Settings come from OCPI_* environment variables (see `ocpi-pipeline settings`).
    """
    logging.basicConfig(level=getattr(logging, log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = {"log_level": log_level, "settings_loader": load_settings}


for command in (serve, worker, dev, demo, migrate, query, settings_cmd, partners, replay, export, pull, report,
                retention_group):
    cli.add_command(command)

__all__ = ["cli"]
