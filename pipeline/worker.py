"""Run the Faust worker in this process until SIGINT/SIGTERM."""

from __future__ import annotations

import logging

import faust

from infra.kafka.bootstrap import resolve_bootstrap
from infra.settings import Settings
from pipeline.app import create_app


def run_worker(settings: Settings, *, loglevel: str = "warning") -> None:
    pipeline = create_app(settings, resolve_bootstrap(settings))
    worker = faust.Worker(pipeline.app, loglevel=getattr(logging, loglevel.upper()), quiet=True)
    worker.execute_from_commandline()  # installs signal handlers, stops cleanly, exits the process
