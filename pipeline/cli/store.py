"""Store commands: migrate, query, settings."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import click
from clickhouse_connect.driver.exceptions import ClickHouseError
from rich.console import Console
from rich.text import Text

from infra.clickhouse.client import (
    ClickHouseUnavailable,
    connect,
    connect_for,
    effective_dsn,
    kills,
    names_outfile,
    redact_dsn,
    select,
    several_statements,
)
from infra.clickhouse.migrations import MigrationError, available_migrations, unknown_migrations
from infra.clickhouse.migrations import migrate as apply_migrations
from infra.settings import documented_settings, load_settings, mask, secret_variables
from pipeline.cli.tables import folded_table


@click.command()
def migrate() -> None:
    """Apply pending ClickHouse schema migrations (idempotent).

    Example: ocpi-pipeline migrate
    """
    settings = load_settings()
    dsn, password = effective_dsn(settings)
    database = settings.clickhouse.database
    try:
        client = connect(dsn, password=password)
        applied = apply_migrations(client, database)
        unknown = unknown_migrations(client, database)
    except (ClickHouseUnavailable, MigrationError) as exc:
        raise click.ClickException(str(exc)) from None
    except ClickHouseError as exc:  # it answered, then refused (a read-only user, no CREATE grant) or went away
        raise click.ClickException(f"ClickHouse at {redact_dsn(dsn)} failed: {' '.join(str(exc).split())}") from None
    total = len(available_migrations())
    if applied:
        for m in applied:
            click.echo(f"applied {m.version:04d}_{m.name}")
    if unknown:
        # A rollback must not fail here (migrations only add), but the operator must know the schema is ahead.
        click.echo(f"schema has every one of this release's {total} migrations in database {database}, and "
                   f"{len(unknown)} this release does not know ({', '.join(unknown)}): a newer release applied "
                   "them; nothing was undone")
    else:
        click.echo(f"schema up to date ({total} migrations) in database {database}")


def _plain(value: Any) -> Any:
    """A value as JSON holds it: Decimals exact as text (every digit written out: str() of a scale above 6 is in
    exponent notation, 1E-8), times in ISO 8601, arrays, tuples and maps element by element, anything else JSON has
    no type for (UUID, IP address) as its text."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _json(plain: Any) -> Any:
    """A `_plain` value as JSON may hold it: nan and inf (ClickHouse's average of no rows, a division by zero) are
    null, as ClickHouse's own JSON formats write them; NaN and Infinity are not JSON, and parsers refuse them."""
    if isinstance(plain, float) and not math.isfinite(plain):
        return None
    if isinstance(plain, list):
        return [_json(v) for v in plain]
    if isinstance(plain, dict):
        return {k: _json(v) for k, v in plain.items()}
    return plain


def _cell(value: Any) -> Any:
    """A value for one CSV or table cell: a nested one (array, tuple, map) as its JSON text."""
    plain = _plain(value)
    return json.dumps(_json(plain), allow_nan=False) if isinstance(plain, list | dict) else plain


def render_rows(columns: list[str], rows: list[Sequence[Any]], fmt: str) -> str:
    """Rows as a rich table, JSON (a list of objects) or CSV."""
    if fmt == "json":
        return json.dumps([{c: _json(_plain(v)) for c, v in zip(columns, row, strict=True)} for row in rows],
                          indent=2, allow_nan=False) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([[_cell(v) for v in row] for row in rows])
        return out.getvalue()
    # Text, not str: rich would read brackets in values (CPOs' names, reasons, payloads) as markup. Folded, never
    # cut with an ellipsis: a value that does not fit its column wraps onto the next line, whole.
    table = folded_table(*map(Text, columns))
    for row in rows:
        table.add_row(*(Text("" if v is None else str(_cell(v))) for v in row))
    console = Console(record=True, width=160)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


@click.command()
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def query(sql: str, fmt: str) -> None:
    """Run a read-only SQL query against the store and print the result.

    Works against a ClickHouse server, and against the embedded store while `dev` or `demo` holds it
    (through that instance's admin endpoint, found in the run file). Writes are refused, and so is more than one
    statement, and KILL (a read-only connection may cancel its user's queries: while `dev` runs, the worker's).

    Billing totals come from `billable_lines` (one line per CDR, a credit CDR's negated; a second credit of a
    CDR, DUPLICATE_CREDIT, and a credit of a credit CDR, CREDIT_OF_CREDIT, left out), not from sums over
    `cdrs`, where a credit CDR repeats the positive energy of the CDR it cancels. Its lines of home charging
    compensation CDRs (home_charging_compensation true, migration 0027) are amounts owed to drivers, not charging
    revenue: leave them out of the totals, or group by the flag.

    Example: ocpi-pipeline query "SELECT country_code, party_id, currency, sum(energy_kwh), sum(cost_excl_vat)
    FROM billable_lines WHERE NOT home_charging_compensation GROUP BY 1, 2, 3"
    """
    settings = load_settings()
    if names_outfile(sql):  # chDB, opened here without a running instance, would write it whatever readonly says
        raise click.ClickException("INTO OUTFILE writes a file: `query` runs read-only queries")
    try:
        client = connect_for(settings, readonly=True)
        if several_statements(client, sql):  # chDB would run them all and mix their rows into one result
            raise click.ClickException("`query` runs one statement; this holds several: run them one at a time")
        if kills(client, sql):  # readonly lets it cancel its user's queries: under `dev`, the worker's inserts
            raise click.ClickException("KILL cancels running queries: `query` runs read-only queries")
        columns, rows = select(client, sql)
    except click.ClickException:
        raise
    except ClickHouseUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(f"query failed: {exc}") from None
    click.echo(render_rows(columns, rows, fmt), nl=False)


@click.command("settings")
def settings_cmd() -> None:
    """Show every setting: its environment variable, value in effect (secrets masked) and meaning."""
    settings = load_settings()
    secrets = secret_variables()
    from infra.settings import as_environ

    current = as_environ(settings)
    table = folded_table("variable", "value", "default", "meaning")
    for _section, var, default, doc in documented_settings():
        value = current.get(var, "")
        if var == "OCPI_ADMIN_TOKEN" and not os.environ.get(var):
            # load_settings fills in a random token for this process alone: shown masked, it looked configured.
            value = "(random per run)"
        elif var in secrets:
            value = mask(value)
        elif var == "OCPI_CLICKHOUSE_DSN":
            value = redact_dsn(value)  # http://user:password@host: the password is a secret too
        # Text, not str: rich would read brackets in a value (a party name, a token) as markup.
        table.add_row(var, Text(value), Text(default), Text(doc))
    Console().print(table)
