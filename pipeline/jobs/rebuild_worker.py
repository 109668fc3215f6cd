"""`python -m pipeline.jobs.rebuild_worker APP_ID`: the pipeline's worker under another consumer group.

A rebuild (`pipeline.jobs.rebuild`) starts it with OCPI_CLICKHOUSE_DATABASE naming a fresh database, so the
live rules (`pipeline.app.create_app`, whatever they are at the time) fill it from the start of the topics.
"""

from __future__ import annotations

import logging
import sys

import faust

from infra.kafka.bootstrap import resolve_bootstrap
from infra.settings import load_settings
from pipeline.app import create_app


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m pipeline.jobs.rebuild_worker APP_ID")
    settings = load_settings()
    pipeline = create_app(settings, resolve_bootstrap(settings), app_id=argv[1])
    worker = faust.Worker(pipeline.app, loglevel=logging.INFO, quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main(sys.argv)
