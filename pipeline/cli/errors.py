"""One-line answers the commands give for what they depend on (instead of a traceback)."""

from __future__ import annotations

import click


def kafka_failed(where: str, exc: Exception, note: str | None = None) -> click.ClickException:
    """The broker at `where` down, unreachable or refusing (`exc`, a Kafka client's error)."""
    return click.ClickException(f"Kafka at {where} failed ({type(exc).__name__}: {exc}); check that it runs and "
                                "OCPI_KAFKA_BOOTSTRAP" + (f" ({note})" if note else ""))
