"""One-line answers the commands give for what they depend on (instead of a traceback)."""

from __future__ import annotations

import math

import click


def kafka_failed(where: str, exc: Exception, note: str | None = None) -> click.ClickException:
    """The broker at `where` down, unreachable or refusing (`exc`, a Kafka client's error)."""
    return click.ClickException(f"Kafka at {where} failed ({type(exc).__name__}: {exc}); check that it runs and "
                                "OCPI_KAFKA_BOOTSTRAP" + (f" ({note})" if note else ""))


def seconds(value: float | None, *, least: float | None) -> float | None:
    """A number of seconds, finite, above `least` (None: 0 or more). nan slips through click.FloatRange (every
    comparison with it is false), and inf would wait for ever."""
    if value is None:
        return None
    if not math.isfinite(value) or (value <= least if least is not None else value < 0):
        raise click.BadParameter("expected a finite number of seconds " + ("> 0" if least is not None else ">= 0"))
    return value
