"""`ocpi-pipeline query` / `report` output: every ClickHouse value the driver hands back renders in every format."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from infra.clickhouse.client import connect
from infra.clickhouse.migrations import migrate
from pipeline.cli.store import render_rows
from tests.conftest import unique

pytestmark = pytest.mark.clickhouse

# Columns `query` meets in our own tables: cdr_charging_periods.dimension_volumes (Array(Decimal)),
# reconciliation.cdr_ids (Array(String)), and the usual types a user's SELECT builds.
SQL = ("SELECT [toDecimal64('39.2607', 4), toDecimal64('2.35', 4)] AS volumes, ['C1', 'C2'] AS cdr_ids, "
       "[toDateTime64('2024-05-01 10:00:00', 6, 'UTC')] AS times, map('EUR', toDecimal64('1.5', 4)) AS by_currency, "
       "toUUID('61f0c404-5cb3-11e7-907b-a6006ad3dba0') AS id, toDecimal64('-2.5', 4) AS cost")


@pytest.fixture
def result(chdb_dsn: str) -> Iterator[tuple[list[str], list[list[object]]]]:
    client: Client = connect(chdb_dsn, readonly=True)
    answer = client.query(SQL)
    yield list(answer.column_names), [list(row) for row in answer.result_rows]


WANT = {"volumes": ["39.2607", "2.3500"], "cdr_ids": ["C1", "C2"], "times": ["2024-05-01T10:00:00+00:00"],
        "by_currency": {"EUR": "1.5000"}, "id": str(uuid.UUID("61f0c404-5cb3-11e7-907b-a6006ad3dba0")),
        "cost": "-2.5000"}


def test_json_renders_arrays_maps_and_uuids_as_the_scalars_are(result: tuple[list[str], list[list[object]]]) -> None:
    """`query --format json` ended in a traceback (Decimal/UUID not JSON serializable) on an Array(Decimal) column
    such as cdr_charging_periods.dimension_volumes, or a UUID."""
    columns, rows = result
    assert json.loads(render_rows(columns, rows, "json")) == [WANT]


def test_csv_and_table_cells_hold_values_not_python_reprs(result: tuple[list[str], list[list[object]]]) -> None:
    """A list cell was written as Python's repr ("[Decimal('39.2607'), ...]", "[datetime.datetime(...)]"): a
    nested value is its JSON text, with the scalars written as at the top level."""
    columns, rows = result
    [header, cells] = list(csv.reader(io.StringIO(render_rows(columns, rows, "csv"))))
    assert header == columns
    decoded = {name: (json.loads(cell) if isinstance(WANT[name], list | dict) else cell)
               for name, cell in zip(header, cells, strict=True)}
    assert decoded == WANT
    table = render_rows(columns, rows, "table")
    assert "Decimal(" not in table and "datetime.datetime" not in table and "UUID(" not in table


def test_table_cells_are_shown_as_stored_never_read_as_rich_markup() -> None:
    """Strings come from CPOs (names, reasons, payloads): "[north]" vanished from a table cell (read as a style)
    and "[/b]" ended `query` in a MarkupError."""
    values = ["Station [north]", "a[/b]", "[bold]x[/bold]"]
    table = render_rows(["name"], [[v] for v in values], "table")
    for value in values:
        assert value in table


def test_decimals_of_any_scale_are_written_out_never_in_exponent_notation(chdb_dsn: str) -> None:
    """A Decimal of a scale above 6 (a product of two amounts: Decimal(18, 4) x Decimal(18, 4) has scale 8) came out as
    Python's str of it, in exponent notation: '1E-8' for 0.00000001 and '0E-8' for a zero, in the table, the CSV
    and the JSON of `query`, which a spreadsheet or a script reads as a float or as text. Every digit is written
    out now, the scale kept."""
    client: Client = connect(chdb_dsn, readonly=True)
    answer = client.query("SELECT toDecimal64('0.00000001', 8) AS tiny, toDecimal32(0, 9) AS zero, "
                          "toDecimal64('2.5', 4) * toDecimal64('-0.0001', 4) AS product, "
                          "[toDecimal64('0.0000001', 7)] AS nested")
    columns, rows = list(answer.column_names), [list(row) for row in answer.result_rows]
    want = {"tiny": "0.00000001", "zero": "0.000000000", "product": "-0.00025000", "nested": ["0.0000001"]}
    assert json.loads(render_rows(columns, rows, "json")) == [want]
    [_header, cells] = list(csv.reader(io.StringIO(render_rows(columns, rows, "csv"))))
    assert cells == ["0.00000001", "0.000000000", "-0.00025000", '["0.0000001"]']
    table = render_rows(columns, rows, "table")
    assert "E-" not in table and "0.00000001" in table and "0.000000000" in table and "-0.00025000" in table


def test_every_format_ends_its_last_line() -> None:
    """`query`/`report --format json` printed the closing bracket without a newline: the shell prompt followed it on
    the same line, and outputs appended to one file (`>> all.json`) ran together ("][")."""
    for fmt in ("json", "csv", "table"):
        assert render_rows(["a"], [[1]], fmt).endswith("\n"), fmt
        assert render_rows(["a"], [], fmt).endswith("\n"), fmt


def test_json_holds_no_nan_or_infinity(chdb_dsn: str) -> None:
    """`query --format json` of an average over no rows (ClickHouse: nan) or a division by zero (inf) printed NaN and
    Infinity, which are not JSON: jq, JavaScript and most parsers refuse the whole output. They are null now, as
    ClickHouse's own JSON formats write them (and in the JSON text of a nested CSV cell); the table and CSV keep nan
    and inf."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    client: Client = connect(chdb_dsn, readonly=True)
    answer = client.query("SELECT avg(x) AS mean, 1 / 0 AS up, -1 / 0 AS down, [0 / 0] AS nested, 0.5 AS half "
                          "FROM (SELECT 1 AS x) WHERE x = 0")
    columns, rows = list(answer.column_names), [list(row) for row in answer.result_rows]
    assert json.loads(render_rows(columns, rows, "json"), parse_constant=refuse) == [
        {"mean": None, "up": None, "down": None, "nested": [None], "half": 0.5}]
    [_header, cells] = list(csv.reader(io.StringIO(render_rows(columns, rows, "csv"))))
    assert cells == ["nan", "inf", "-inf", "[null]", "0.5"]


@pytest.mark.parametrize("command", [
    ["query", "SELECT country_code, sum(total_energy) AS kwh FROM cdrs FINAL WHERE 0 GROUP BY country_code;"],
    ["query", "SELECT country_code, sum(total_energy) AS kwh FROM cdrs FINAL WHERE 0 GROUP BY country_code -- none"],
    ["report", "revenue", "--from", "2024-05-01", "--to", "2024-05-31"],
])
def test_an_empty_result_still_has_its_header(command: list[str], chdb_dsn: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """ClickHouse sends no header with an empty result (HTTP Native format, and chDB), so clickhouse-connect gave
    no column names: `report revenue --format csv > revenue.csv` for a period without CDRs wrote an empty file,
    not a header line, and the table format printed a blank line, as if the command had failed."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    database = unique("empty")
    owner = connect(chdb_dsn)
    migrate(owner, database)
    try:
        for name, value in {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": database,
                            "OCPI_DATA_DIR": str(tmp_path)}.items():
            monkeypatch.setenv(name, value)
        as_csv = CliRunner().invoke(cli, [*command, "--format", "csv"])
        assert as_csv.exit_code == 0, as_csv.output
        [header] = list(csv.reader(io.StringIO(as_csv.output)))
        assert header[:2] == (["country_code", "kwh"] if command[0] == "query" else ["country_code", "party_id"])
        as_table = CliRunner().invoke(cli, [*command, "--format", "table"], env={"COLUMNS": "300"})
        assert as_table.exit_code == 0 and header[-1] in as_table.output, as_table.output
        assert json.loads(CliRunner().invoke(cli, [*command, "--format", "json"]).output) == []
    finally:
        owner.command(f"DROP DATABASE IF EXISTS {database}")


def test_a_wide_table_shows_every_value_whole() -> None:
    """The report's default format: at 160 columns rich cut what did not fit with an ellipsis, so two locations
    sharing their first characters read as one (report revenue --by location), and a long number lost digits."""
    columns = ["country_code", "party_id", "location_id", "currency", "cdrs", "credit_cdrs", "energy_kwh",
               "revenue_excl_vat", "revenue_incl_vat", "lines_without_incl_vat"]
    rows = [["NL", "TNM", f"LOCATION-AMSTERDAM-CENTRAAL-000{n}", "EUR", 123456, 1234,
             Decimal("12345678901234.1234"), Decimal("-12345678901234.1234"), Decimal("12345678901234.1234"), 0]
            for n in (1, 2)]
    table = render_rows(columns, rows, "table")
    assert "…" not in table
    lines = table.splitlines()
    for index, want in ((3, "LOCATION-AMSTERDAM-CENTRAAL-0001LOCATION-AMSTERDAM-CENTRAAL-0002"),
                        (7, "12345678901234.123412345678901234.1234")):
        assert "".join(line.split("│")[index].strip() for line in lines if "│" in line) == want


def test_query_on_the_embedded_store_writes_no_file(chdb_dsn: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a running `dev`, `query` opens chDB itself, whose readonly does not cover INTO OUTFILE: the "read-only"
    query wrote the file (the shim refuses it; `query --help` says writes are refused)."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    target = tmp_path / "written.tsv"
    for name, value in {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_DATA_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    for sql in (f"SELECT 1 INTO OUTFILE '{target}'", f"SELECT 1 INTO /* c */ outfile '{target}' APPEND"):
        result = CliRunner().invoke(cli, ["query", sql])
        assert result.exit_code == 1 and "INTO OUTFILE" in result.output, result.output
    assert not target.exists()


def test_query_refuses_several_statements_instead_of_mixing_their_results(chdb_dsn: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """chDB runs every statement of `SELECT 1 AS a; SELECT 2 AS b` and hands back their rows as one result: the
    second statement's rows came out under the first one's columns (`"a": 2`), or as garbage when the columns
    differed. A ClickHouse server refuses several statements in one request; so does `query` now, by ClickHouse's
    own parser (a `;` in a literal or a comment, or one at the end, is no second statement)."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    for name, value in {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": "default",
                        "OCPI_DATA_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    for sql in ("SELECT 1 AS a; SELECT 2 AS b", "SELECT 1 AS a; SELECT 'x' AS b, 3 AS c", "SELECT 1 AS a ;\nSELECT 2"):
        result = CliRunner().invoke(cli, ["query", "--format", "json", sql])
        assert result.exit_code == 1 and "one statement" in result.output, result.output
    for sql, value in (("SELECT 1 AS a;", 1), ("SELECT ';' AS a", ";"), ("SELECT 1 AS a /* ; SELECT 2 */", 1),
                       ("SELECT 1 AS a -- ; SELECT 2\n", 1), ("SELECT 'x;y' AS a; -- done", "x;y")):
        result = CliRunner().invoke(cli, ["query", "--format", "json", sql])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == [{"a": value}], sql


def _summing_query_examples() -> list[str]:
    """The SQL of every `ocpi-pipeline query` example that adds amounts up: `query --help` and README."""
    import re

    from pipeline.cli.store import query

    texts = [query.help or "", (Path(__file__).resolve().parents[3] / "README.md").read_text()]
    found = [match.group(1) for text in texts
             for match in re.finditer(r'ocpi-pipeline query (?:--format \w+ )?"([^"]+)"', text)]
    return [sql for sql in found if "sum(" in sql.lower()]


def test_the_query_examples_that_add_up_cdrs_give_what_is_billed(client: Client) -> None:
    """The examples summed `cdrs.total_energy`, which OCPI does not negate on a credit CDR: a CDR corrected by a
    credit and a new CDR counted three times (28 kWh for the 8 billed), and the help's, grouped by party_id alone,
    added up parties of different countries. Whatever an example adds up must be what billing counts."""
    from pipeline.cdrs import process_cdrs
    from pipeline.state import CdrState

    from .builders import Harness, cdr, event
    from .test_store import write

    write(client, Harness(process_cdrs, CdrState).run(
        event("CDR", cdr("C1", kwh="10", cost="2.50")),
        event("CDR", cdr("C1-C", kwh="10", cost="-2.50", credit=True, credit_reference="C1")),
        event("CDR", cdr("C2", kwh="8", cost="2.00"))).batch)
    examples = _summing_query_examples()
    assert len(examples) >= 2  # the help's and README's
    billed = {Decimal("8"), Decimal("2.00"), Decimal("2.42")}  # kWh, excl. and incl. VAT
    for sql in examples:
        result = client.query(sql)
        totals = {name: sum(row[i] for row in result.result_rows)
                  for i, name in enumerate(result.column_names)
                  if result.result_rows and isinstance(result.result_rows[0][i], Decimal)}
        assert totals and set(totals.values()) <= billed, (sql, totals)


@pytest.mark.parametrize("command", [
    ["report", "revenue", "--by", "day", "--party", ""],
    ["report", "revenue", "--partner", ""],
    ["report", "reconciliation", "--party", " "],
    ["report", "anomalies", "--kind", ""],
    ["report", "health", "--partner", ""],
    ["report", "rejections", "--partner", ""],
])
def test_an_empty_filter_is_refused_not_taken_for_none(command: list[str], tmp_path: Path) -> None:
    """`report revenue --by day --party ""` (a script's unset variable, `--party "$PARTY"`) reported every party's
    revenue, summed per day, as that party's: an empty filter was taken for none."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    result = CliRunner().invoke(cli, command, env={"OCPI_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2, (result.output, result.exception)
    assert "empty" in result.output


def test_an_unknown_anomaly_kind_is_refused_not_reported_as_none(chdb_dsn: str, tmp_path: Path) -> None:
    """`report anomalies --kind STALE_UPDATES` (a typo) printed an empty table and exited 0: as if no such anomaly
    had been flagged. A kind the pipeline does not flag is a usage error naming the kinds it does; any case is
    taken, as before."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    database = unique("kinds")
    owner = connect(chdb_dsn)
    migrate(owner, database)
    env = {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": database, "OCPI_DATA_DIR": str(tmp_path)}
    try:
        result = CliRunner().invoke(cli, ["report", "anomalies", "--kind", "STALE_UPDATES"], env=env)
        assert result.exit_code == 2, (result.output, result.exception)
        assert "STALE_UPDATES" in result.output and "STALE_UPDATE," in result.output, result.output
        result = CliRunner().invoke(cli, ["report", "anomalies", "--kind", "stale_update"], env=env)
        assert result.exit_code == 0, (result.output, result.exception)
    finally:
        owner.command(f"DROP DATABASE IF EXISTS {database}")


def test_query_refuses_kill(chdb_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`readonly=1` lets a connection KILL the queries of its own user, and every connection to a `dev` shim is the
    user `default`: `query "KILL QUERY WHERE 1"` while `dev` ran cancelled the worker's inserts and the receivers'
    reads (measured through the shim: QUERY_WAS_CANCELLED). A read-only command refuses it, in any spelling."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    for name, value in {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": "default",
                        "OCPI_DATA_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    for sql in ("KILL QUERY WHERE 1", "/* c */ kill\nquery WHERE query_id = 'x' SYNC", "KILL MUTATION WHERE 1"):
        result = CliRunner().invoke(cli, ["query", sql])
        assert result.exit_code == 1 and "KILL" in result.output.splitlines()[-1], result.output
    result = CliRunner().invoke(cli, ["query", "--format", "json", "SELECT 'KILL QUERY' AS a"])
    assert result.exit_code == 0 and json.loads(result.output) == [{"a": "KILL QUERY"}], result.output


async def test_a_statement_without_a_result_prints_no_rows_through_the_shim(chdb_dsn: str, tmp_path: Path) -> None:
    """A statement that returns no result set (`USE ocpi`, a SYSTEM statement readonly lets pass as a no-op), asked
    over HTTP (a `dev` shim), came back as one row of one empty string without any column: `query --format json`
    ended in a ValueError traceback (zip() argument 2 is longer than argument 1), table and CSV printed a phantom
    row. No columns is no result: nothing to print, in every format."""
    import asyncio

    from click.testing import CliRunner

    from infra.clickhouse.client import chdb_path
    from infra.clickhouse.shim import ChdbEngine, ClickHouseShim
    from pipeline.cli import cli

    connect(chdb_dsn)  # this process holds the engine, as `dev` does
    shim = await ClickHouseShim(ChdbEngine(chdb_path(chdb_dsn)), "s3cret").start()
    env = {"OCPI_CLICKHOUSE_DSN": shim.dsn, "OCPI_CLICKHOUSE_DATABASE": "default", "OCPI_DATA_DIR": str(tmp_path)}
    try:
        results = {fmt: await asyncio.to_thread(CliRunner().invoke, cli, ["query", "--format", fmt, "USE default"],
                                                env=env)
                   for fmt in ("json", "csv", "table")}
    finally:
        await shim.stop()
    for fmt, result in results.items():
        assert result.exit_code == 0, (fmt, result.output, result.exception)
    assert json.loads(results["json"].output) == []
    assert results["csv"].output.strip() == ""


def test_migrate_over_a_schema_a_newer_release_migrated_says_so(chdb_dsn: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """After a rollback to an older release, `migrate` said "schema up to date" over a database a newer release had
    migrated further: the operator was not told that the schema is ahead of the code now running on it. It still
    succeeds (a rollback must not fail at its migrate step; migrations only add) and names what it does not know."""
    from click.testing import CliRunner

    from infra.clickhouse.migrations import available_migrations
    from pipeline.cli import cli

    database = unique("ahead")
    owner = connect(chdb_dsn)
    migrate(owner, database)
    newest = max(m.version for m in available_migrations())
    try:
        owner.insert(f"`{database}`.schema_migrations", [[newest + 1, "from_a_newer_release", "0" * 64,
                                                          datetime.now(UTC)]],
                     column_names=["version", "name", "checksum", "applied_at"])
        for name, value in {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": database,
                            "OCPI_DATA_DIR": str(tmp_path)}.items():
            monkeypatch.setenv(name, value)
        result = CliRunner().invoke(cli, ["migrate"])
        assert result.exit_code == 0, result.output
        assert "up to date" not in result.output
        assert f"{newest + 1:04d}_from_a_newer_release" in result.output and "newer release" in result.output
    finally:
        owner.command(f"DROP DATABASE IF EXISTS {database}")
