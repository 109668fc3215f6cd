"""`ocpi-pipeline report ...`: the named reports of `pipeline.reports`, read-only, as a table, JSON or CSV."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any

import aiokafka.errors
import click
import kafka.errors

from infra.clickhouse.client import ClickHouseUnavailable, connect_for
from infra.kafka.bootstrap import KafkaNotConfigured, resolve_bootstrap
from infra.settings import load_settings
from pipeline import reports
from pipeline.cli.errors import kafka_failed
from pipeline.cli.store import render_rows


def _date(_ctx: click.Context, param: click.Parameter, value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a date YYYY-MM-DD", param=param) from None


def _given(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A filter's value; an empty one is refused, not taken for none (`--party "$UNSET"` would report every party's
    figures, with `--by day` summed as if they were that party's)."""
    if value is not None and not value.strip():
        raise click.BadParameter("empty: give a value, or leave the option out for all", param=param)
    return value


def _period_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--from/--to (UTC dates, inclusive) and --format, shared by the store reports."""
    for option in reversed((
        click.option("--from", "start", callback=_date, metavar="YYYY-MM-DD",
                     help="First UTC day of the period (inclusive); default: unbounded."),
        click.option("--to", "end", callback=_date, metavar="YYYY-MM-DD",
                     help="Last UTC day of the period (inclusive); default: unbounded."),
        click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
                     show_default=True),
    )):
        command = option(command)
    return command


def _period(start: date | None, end: date | None) -> reports.Period:
    try:
        return reports.Period(start, end)
    except reports.ReportError as exc:
        raise click.UsageError(str(exc)) from None


def _show(build: Callable[[], reports.ReportQuery], fmt: str) -> None:
    """Build the report (parameter errors are usage errors), run it read-only and print it."""
    try:
        query = build()
    except reports.ReportError as exc:
        raise click.UsageError(str(exc)) from None
    settings = load_settings()
    try:
        client = connect_for(settings, readonly=True)
        columns, rows = reports.run(client, query)
    except ClickHouseUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(f"report failed: {exc}") from None
    _echo(columns, rows, fmt)


def _echo(columns: list[str], rows: list[Sequence[Any]], fmt: str) -> None:
    click.echo(render_rows(columns, rows, fmt), nl=False)


@click.group()
def report() -> None:
    """Named reports: revenue, reconciliation, anomalies, partner health, rejections; and consumer lag.

    The store reports read ClickHouse with a read-only connection, so they work against a ClickHouse server and
    against the embedded store while `dev` runs; their periods are UTC dates, both ends inclusive. consumer-lag
    reads the worker's offsets from Kafka (a running `dev`'s, or OCPI_KAFKA_BOOTSTRAP's).

    Example: ocpi-pipeline report revenue --from 2024-05-01 --to 2024-05-31 --by location
    """


@report.command()
@_period_options
@click.option("--by", type=click.Choice(reports.GROUPINGS), default="party", show_default=True,
              help="Group by CPO party, location or day (always also by currency).")
@click.option("--party", metavar="CC/PID", callback=_given,
              help="Only this CPO party, e.g. NL/TNM (case-insensitive; a / in either part as %2F).")
@click.option("--partner", metavar="ID", callback=_given, help="Only CDRs pushed by this partner.")
def revenue(start: date | None, end: date | None, fmt: str, by: str, party: str | None,
            partner: str | None) -> None:
    """Energy and revenue from CDRs per party, location or day, credit CDRs netted.

    Energy in kWh, revenue excl. and incl. VAT, per currency, by the UTC day the CDR ended. incl_vat is optional
    in OCPI: revenue incl. VAT sums the CDRs that give it, lines_without_incl_vat counts the others.

    A credit CDR counts with negative energy and cost, so it cancels the CDR it credits. A second credit of
    the same CDR (DUPLICATE_CREDIT) and a credit that names a credit CDR (CREDIT_OF_CREDIT) are left out:
    they would cancel it twice.

    kind (last column): CHARGING, or HOME_CHARGING_COMPENSATION for CDRs of sessions on a driver's home charger
    (and their credits), whose amounts are owed to the driver, not revenue: a row of their own.

    Example: ocpi-pipeline report revenue --from 2024-05-01 --to 2024-05-31 --party NL/TNM --by day
    """
    _show(lambda: reports.revenue(_period(start, end), by=by, party=party, partner=partner), fmt)


@report.command()
@_period_options
@click.option("--party", metavar="CC/PID", callback=_given, help="Only this CPO party.")
def reconciliation(start: date | None, end: date | None, fmt: str, party: str | None) -> None:
    """Sessions matched with CDRs: outcomes per party, subject and currency, with the summed kWh and cost deltas.

    Example: ocpi-pipeline report reconciliation --from 2024-05-01 --format json
    """
    _show(lambda: reports.reconciliation(_period(start, end), party=party), fmt)


@report.command()
@_period_options
@click.option("--party", metavar="CC/PID", callback=_given, help="Only this CPO party.")
@click.option("--kind", callback=_given, help="Only this kind of anomaly (e.g. STALE_UPDATE; any case): one the "
              "pipeline flags, another is refused.")
def anomalies(start: date | None, end: date | None, fmt: str, party: str | None, kind: str | None) -> None:
    """Anomalies the pipeline flagged, per kind, module and party, first and last seen.

    Example: ocpi-pipeline report anomalies --from 2024-05-01 --party BE/BEC
    """
    _show(lambda: reports.anomalies(_period(start, end), party=party, kind=kind), fmt)


@report.command()
@_period_options
@click.option("--partner", metavar="ID", callback=_given, help="Only this partner.")
def health(start: date | None, end: date | None, fmt: str, partner: str | None) -> None:
    """Partner ingestion health per partner and module: pushes, rejects, reject rate, lag p50/p95/max (s).

    Lag is the time from the receiver taking a push to its row being written to ClickHouse. Pushes are kept
    OCPI_RETENTION_RAW_DAYS, refusals longer: both count within that many last days at most.

    Example: ocpi-pipeline report health --from 2024-05-01 --partner cpo-acme
    """
    raw_days = load_settings().retention.raw_days
    _show(lambda: reports.health(_period(start, end), partner=partner, raw_days=raw_days), fmt)


@report.command()
@_period_options
@click.option("--partner", metavar="ID", callback=_given, help="Only this partner.")
def rejections(start: date | None, end: date | None, fmt: str, partner: str | None) -> None:
    """Refused pushes per partner, module, status and field path, with an example reason.

    Example: ocpi-pipeline report rejections --partner cpo-acme --format csv
    """
    _show(lambda: reports.rejections(_period(start, end), partner=partner), fmt)


@report.command("consumer-lag")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def consumer_lag(fmt: str) -> None:
    """Kafka records the worker has not processed yet, per topic, and how long before retention deletes them.

    lag: records between the worker's committed offsets (or the log start) and the end offsets;
    oldest_unread: when the oldest of them was written; retention_left_days: OCPI_RETENTION_RAW_DAYS minus its
    age, the time the worker has to catch up before Kafka deletes it unread; lost: records retention already
    deleted past the committed offsets, between them and the log start (never processed; not counted where the
    group has no offset left). Needs Kafka: OCPI_KAFKA_BOOTSTRAP, or a running `dev`
    (its embedded broker).

    Example: ocpi-pipeline report consumer-lag
    """
    settings = load_settings()
    try:
        bootstrap = resolve_bootstrap(settings)
        columns, rows = asyncio.run(reports.consumer_lag(settings.kafka, bootstrap, settings.pipeline.app_id,
                                                         reports.consumed_topics(settings),
                                                         retention_days=settings.retention.raw_days))
    except KafkaNotConfigured as exc:
        raise click.ClickException(str(exc)) from None
    except (aiokafka.errors.KafkaError, kafka.errors.KafkaError) as exc:  # the broker down, unreachable, refusing
        raise kafka_failed(bootstrap, exc) from None
    except Exception as exc:
        raise click.ClickException(f"report failed: {exc}") from None
    _echo(columns, rows, fmt)
