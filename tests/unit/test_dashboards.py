"""The Grafana dashboards are code: data source by template variable only, the ClickHouse plugin's macros used
the way the plugin expands them, and every panel's SQL valid against the migrated schema.

`render_panel_sql` expands a panel's SQL as grafana-clickhouse-datasource v4 does (pkg/macros/macros.go) and
substitutes the dashboards' template variables; the integration test runs the same on demo data.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from infra.clickhouse.client import connect
from infra.clickhouse.migrations import migrate
from pipeline import projection
from receivers.registry import PartnerRegistry, PartyRole

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
PLUGIN = "grafana-clickhouse-datasource"
DATASOURCE_REF = {"type": PLUGIN, "uid": "${datasource}"}
INTERVAL_S = 3600  # what Grafana passes as the interval for a 7-day range on a wide panel (order of magnitude)
RAW_DAYS = 30  # the dashboards' constant `raw_days`: OCPI_RETENTION_RAW_DAYS at its default

_MACRO = re.compile(r"\$__(\w+)(?:\(([^()]*)\))?")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def panel_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, raw SQL) of every query of every panel."""
    return [(panel["title"], target["rawSql"]) for panel in _panels(_load(path))
            for target in panel.get("targets", [])]


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render_panel_sql(sql: str, *, start: datetime, end: datetime, partners: list[str] | None = None) -> str:
    """The SQL Grafana would send: plugin macros expanded for [start, end], template variables substituted
    (`partner` = All: every value, nothing at all when there are none, as Grafana formats the All of a variable
    without options; the constant `raw_days`)."""

    def expand(match: re.Match[str]) -> str:
        name, arg = match.group(1), (match.group(2) or "").strip()
        date_time = {"fromTime": f"toDateTime({int(start.timestamp())})",
                     "toTime": f"toDateTime({int(end.timestamp())})",
                     "fromTime_ms": f"fromUnixTimestamp64Milli({int(start.timestamp() * 1000)})",
                     "toTime_ms": f"fromUnixTimestamp64Milli({int(end.timestamp() * 1000)})",
                     "interval_s": str(INTERVAL_S)}
        if name in date_time and match.group(2) is None:
            return date_time[name]
        if name == "timeFilter" and arg:
            return f"{arg} >= {date_time['fromTime']} AND {arg} <= {date_time['toTime']}"
        if name == "timeFilter_ms" and arg:
            return f"{arg} >= {date_time['fromTime_ms']} AND {arg} <= {date_time['toTime_ms']}"
        if name == "dateFilter" and arg:
            return (f"{arg} >= toDate('{start:%Y-%m-%d}') AND {arg} <= toDate('{end:%Y-%m-%d}')")
        if name == "timeInterval" and arg:
            return f"toStartOfInterval(toDateTime({arg}), INTERVAL {INTERVAL_S} second)"
        raise AssertionError(f"unknown or misused macro {match.group(0)!r}")

    rendered = _MACRO.sub(expand, sql)
    values = ", ".join(_quote(p) for p in (partners or []))
    rendered = rendered.replace("${partner:singlequote}", values).replace("${raw_days}", str(RAW_DAYS))
    leftover = re.search(r"\$\{?\w+", rendered)
    assert leftover is None, f"unsubstituted variable {leftover.group(0)!r} in:\n{rendered}"
    return rendered


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_the_data_source_is_a_template_variable_never_a_fixed_uid(path: Path) -> None:
    board = _load(path)
    assert board["id"] is None and board["uid"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", PLUGIN)
    assert variables["partner"]["datasource"] == DATASOURCE_REF
    panels = list(_panels(board))
    assert panels
    for panel in panels:
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, panel["title"]
            assert target["editorType"] == "sql" and target["rawSql"].strip(), panel["title"]
    # Nothing anywhere names the provisioned data source's uid (dashboards/provisioning/datasources).
    assert "ocpi-clickhouse" not in path.read_text(encoding="utf-8")


def test_dashboards_have_unique_uids_and_panel_ids() -> None:
    boards = [_load(p) for p in DASHBOARDS]
    assert len({b["uid"] for b in boards}) == len(boards) >= 4
    for board in boards:
        ids = [p["id"] for p in _panels(board)]
        assert len(ids) == len(set(ids)), board["uid"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_time_series_panels_bucket_with_the_plugin_macros(path: Path) -> None:
    for panel in _panels(_load(path)):
        for target in panel["targets"]:
            sql = target["rawSql"]
            assert re.search(r"\$__(timeFilter|dateFilter)\(", sql), f"{panel['title']}: no time range filter"
            if panel["type"] == "timeseries":
                assert target["format"] == 0 and re.search(r"\bAS time\b", sql), panel["title"]
                assert "$__timeInterval(" in sql or "toDateTime(day, 'UTC') AS time" in sql, panel["title"]


def test_render_expands_macros_like_the_plugin() -> None:
    start, end = datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 3, 2, 12, tzinfo=UTC)
    sql = ("SELECT $__timeInterval(t) AS time FROM x WHERE $__timeFilter(t) AND $__dateFilter(d) "
           "AND t < $__toTime AND p IN (${partner:singlequote})")
    assert render_panel_sql(sql, start=start, end=end, partners=["a'b", "c"]) == (
        f"SELECT toStartOfInterval(toDateTime(t), INTERVAL {INTERVAL_S} second) AS time FROM x "
        "WHERE t >= toDateTime(1709251200) AND t <= toDateTime(1709380800) "
        "AND d >= toDate('2024-03-01') AND d <= toDate('2024-03-02') AND t < toDateTime(1709380800) "
        "AND p IN ('a\\'b', 'c')")
    with pytest.raises(AssertionError, match="unknown or misused macro"):
        render_panel_sql("SELECT $__timeFilter() FROM x", start=start, end=end)
    with pytest.raises(AssertionError, match="unsubstituted variable"):
        render_panel_sql("SELECT $region FROM x", start=start, end=end)


@pytest.fixture(scope="module")
def schema(chdb_dsn: str) -> Iterator[Client]:
    """An empty, fully migrated database on the session's chDB path."""
    database = f"dash_{uuid.uuid4().hex[:8]}"
    client = connect(chdb_dsn)
    migrate(client, database)
    client.database = database
    yield client
    client.command(f"DROP DATABASE IF EXISTS {database}")
    client.close()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_query_runs_on_the_migrated_schema(schema: Client, path: Path) -> None:
    end = datetime.now(UTC)
    for title, sql in panel_queries(path):
        rendered = render_panel_sql(sql, start=end - timedelta(days=7), end=end, partners=["p1", "p2"])
        try:
            schema.query(rendered)
        except Exception as exc:
            pytest.fail(f"{path.name}: panel {title!r} failed: {exc}\n{rendered}")
    variable = next(v for v in _load(path)["templating"]["list"] if v["name"] == "partner")
    schema.query(variable["query"])


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_query_runs_before_any_partner_is_registered(schema: Client, path: Path) -> None:
    """The `partner` variable of an empty registry has no options; Grafana (scenes' MultiValueVariable) keeps
    All selected and formats it `${partner:singlequote}` as nothing. The anomaly panels, which add '' to the
    list (`IN (${partner:singlequote}, '')`), then sent `IN (, '')`: a syntax error instead of their rows."""
    end = datetime.now(UTC)
    for title, sql in panel_queries(path):
        rendered = render_panel_sql(sql, start=end - timedelta(days=7), end=end, partners=[])
        try:
            schema.query(rendered)
        except Exception as exc:
            pytest.fail(f"{path.name}: panel {title!r} failed: {exc}\n{rendered}")


def _panel_sql(path: Path, title: str) -> str:
    return next(sql for panel_title, sql in panel_queries(path) if panel_title == title)


def test_last_push_lists_registered_partners_silent_for_the_whole_range(schema: Client) -> None:
    """The panel is there to find silent partners: one that pushed nothing in the time range must be listed (it
    was not: the query read only the pushes in the range), a deleted one without pushes must not."""
    registry = PartnerRegistry(schema)
    ids = {name: f"lp-{name}-{uuid.uuid4().hex[:6]}" for name in ("active", "silent", "deleted")}
    for name, partner_id in ids.items():
        registry.register_direct(partner_id, name, [PartyRole(country_code="NL", party_id=f"L{name[:2].upper()}",
                                                             role="CPO", business_name=name)])
    registry.delete(ids["deleted"])
    end = datetime.now(UTC)

    def event(event_id: str, partner_id: str, received_at: datetime) -> list[Any]:
        return [event_id, partner_id, "SESSIONS", "PUT", "OBJECT", "NL", "LAC", "S1", None, None, received_at, "r",
                "c", "PUSH", "h", [], "{}", "t", 0, 0, "APPLIED", ""]

    schema.insert("raw_events", [event(f"{ids['active']}-1", ids["active"], end - timedelta(hours=1)),
                                 event(f"{ids['silent']}-1", ids["silent"], end - timedelta(days=10))],
                  column_names=list(projection.RAW_EVENT_COLUMNS))
    sql = render_panel_sql(_panel_sql(ROOT / "dashboards" / "partner-health.json", "Last push per partner"),
                           start=end - timedelta(days=7), end=end, partners=list(ids.values()))
    rows = {row[0]: row for row in schema.query(sql).result_rows}
    assert set(rows) == {ids["active"], ids["silent"]}
    assert rows[ids["silent"]][2] is None and rows[ids["silent"]][3] == 7 * 86400
    assert rows[ids["active"]][2] is not None and 3590 <= rows[ids["active"]][3] <= 3610
    assert next(iter(rows)) == ids["silent"]  # the silent one first


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_a_panel_that_counts_pushes_counts_pushes_only(schema: Client, path: Path) -> None:
    """A pull (`jobs pull`) or a restored replay writes `raw_events` rows too (source PULL, REPLAY): the ingestion
    dashboard's 'Pushes per module', 'Pushes per partner' and 'Relaxations applied' counted them as pushes, so a
    night's pull of a CPO's CDRs showed as thousands of pushes there, while partner health and `report health`
    (source PUSH) showed the partner's real pushes. Those panels count events now, and say so; a panel's
    `pushes` are pushes only."""
    partner = f"pp-{uuid.uuid4().hex[:6]}"
    end = datetime.now(UTC)

    def event(event_id: str, source: str) -> list[Any]:
        return [event_id, partner, "CDRS", "PUT", "OBJECT", "NL", "PPT", event_id, None, None,
                end - timedelta(hours=1), "r", "c", source, "h", ["NULL_IN_LIST:$.tariffs"], "{}", "t", 0, 0,
                "APPLIED", ""]

    schema.insert("raw_events", [event(f"{partner}-push", "PUSH"), event(f"{partner}-pull", "PULL"),
                                 event(f"{partner}-replay", "REPLAY")],
                  column_names=list(projection.RAW_EVENT_COLUMNS))
    for title, sql in panel_queries(path):
        result = schema.query(render_panel_sql(sql, start=end - timedelta(days=1), end=end, partners=[partner]))
        if "pushes" in result.column_names:
            counted = sum(int(dict(zip(result.column_names, r, strict=True))["pushes"]) for r in result.result_rows)
            assert counted == 1, f"{path.name}: panel {title!r} counts {counted} pushes"


def test_relaxations_applied_counts_the_events_that_needed_each_relaxation(schema: Client) -> None:
    """Every repair travels on the event as `NAME:$.json.path`, list indices included (`ocpi.compat`): the panel
    grouped by that whole string, so a relaxation was one row per path it was applied at (a Session's charging
    periods, a Location's EVSEs: as many rows as there are indices), and its `events` added up over the rows to more
    than the events that needed it. A row is a partner's relaxation now, with the events that needed it."""
    partner = f"rx-{uuid.uuid4().hex[:6]}"
    end = datetime.now(UTC)
    volume = "STRING_AS_NUMBER:$.charging_periods[{}].dimensions[0].volume"

    def event(n: int, relaxations: list[str]) -> list[Any]:
        return [f"{partner}-{n}", partner, "SESSIONS", "PUT", "OBJECT", "NL", "RXT", f"S{n}", None, None,
                end - timedelta(hours=1), "r", "c", "PUSH", "h", relaxations, "{}", "t", 0, n, "APPLIED", ""]

    schema.insert("raw_events", [
        event(1, [volume.format(0), volume.format(1), volume.format(2), "NULL_IN_LIST:$.tariff_ids"]),
        event(2, [volume.format(0)]), event(3, [])], column_names=list(projection.RAW_EVENT_COLUMNS))
    sql = render_panel_sql(_panel_sql(ROOT / "dashboards" / "ingestion.json", "Relaxations applied"),
                           start=end - timedelta(days=1), end=end, partners=[partner])
    result = schema.query(sql)
    rows = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
    assert [(r["partner_id"], r["relaxation"], r["events"]) for r in rows] == [
        (partner, "STRING_AS_NUMBER", 2), (partner, "NULL_IN_LIST", 1)]


def test_partner_health_counts_refusals_only_as_far_back_as_the_pushes_are_kept(schema: Client) -> None:
    """Pushes (`raw_events`) are kept OCPI_RETENTION_RAW_DAYS, refusals (`rejections`) as long as the histories:
    refusals older than the pushes still held were counted against none of their pushes, so the reject rate of a
    period reaching further back (the report's default: unbounded; a long time range) was too high, 1.0 for a
    module with only old refusals. Both sides now count from where the pushes are kept."""
    from infra.rejections import COLUMNS as REJECTION_COLUMNS
    from infra.rejections import Rejection
    from infra.settings import load_settings
    from pipeline import reports
    from pipeline.rejections import rejection_row

    partner = f"hp-{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC)
    raw_days = load_settings({}).retention.raw_days
    assert raw_days == RAW_DAYS

    def push(n: int, received_at: datetime) -> list[Any]:
        return [f"{partner}-{n}", partner, "SESSIONS", "PUT", "OBJECT", "NL", "HPT", f"S{n}", None, None, received_at,
                "r", "c", "PUSH", "h", [], "{}", "t", 0, n, "APPLIED", ""]

    def refusal(n: int, module: str, rejected_at: datetime) -> list[Any]:
        return rejection_row(Rejection(f"{partner}-r{n}", partner, module, "PUT", "/", 2001, 200, "bad", "$.x",
                                       "q", "c", rejected_at))

    # Within the retention: three pushes and one refusal. Beyond it: the pushes are gone (TTL), a refusal of
    # each module is still there.
    schema.insert("raw_events", [push(n, now - timedelta(days=2, minutes=n)) for n in range(3)],
                  column_names=list(projection.RAW_EVENT_COLUMNS))
    schema.insert("rejections", [refusal(1, "sessions", now - timedelta(days=1)),
                                 refusal(2, "sessions", now - timedelta(days=raw_days + 10)),
                                 refusal(3, "cdrs", now - timedelta(days=raw_days + 10))],
                  column_names=list(REJECTION_COLUMNS))
    want = [(partner, "SESSIONS", 3, 1, 0.25)]
    columns, rows = reports.run(schema, reports.health(reports.Period(), partner=partner, raw_days=raw_days))
    assert [tuple(row[:5]) for row in rows] == want
    assert columns[:5] == ["partner_id", "module", "pushes", "rejects", "reject_rate"]
    board = ROOT / "dashboards" / "partner-health.json"
    constant = next(v for v in _load(board)["templating"]["list"] if v["name"] == "raw_days")
    assert (constant["type"], constant["query"]) == ("constant", str(raw_days))
    sql = render_panel_sql(_panel_sql(board, "Pushes, rejects and lag per partner and module"),
                           start=now - timedelta(days=raw_days + 30), end=now, partners=[partner])
    assert [tuple(row[:5]) for row in schema.query(sql).result_rows] == want


def test_partner_health_keeps_raw_days_of_24_hours_across_a_daylight_saving_change(schema: Client) -> None:
    """Both count from `now64(6) - toIntervalDay(raw_days)`, which ClickHouse computes in the session time zone,
    the server's: where it has daylight saving time and the last raw_days days cross a change, they were 24 hours
    a day but one, of 23 or 25, so the window was an hour shorter or longer than the retention (the TTL counts
    days of 24 hours, on the UTC column). Now raw_days days are raw_days x 24 hours whatever the server's zone."""
    from zoneinfo import ZoneInfo

    from infra.rejections import COLUMNS as REJECTION_COLUMNS
    from infra.rejections import Rejection
    from pipeline import reports
    from pipeline.rejections import rejection_row

    zone = ZoneInfo("Europe/Berlin")
    now = datetime.now(UTC)
    # The fewest days back that cross one daylight saving change in that zone (the most recent one).
    days = next(d for d in range(1, 400)
                if (now - timedelta(days=d)).astimezone(zone).utcoffset() != now.astimezone(zone).utcoffset())
    cutoff = now - timedelta(days=days)
    partner = f"hz-{uuid.uuid4().hex[:6]}"

    def push(n: int, received_at: datetime) -> list[Any]:
        return [f"{partner}-{n}", partner, "SESSIONS", "PUT", "OBJECT", "NL", "HZT", f"S{n}", None, None, received_at,
                "r", "c", "PUSH", "h", [], "{}", "t", 0, n, "APPLIED", ""]

    def refusal(n: int, rejected_at: datetime) -> list[Any]:
        return rejection_row(Rejection(f"{partner}-r{n}", partner, "sessions", "PUT", "/", 2001, 200, "bad", "$.x",
                                       "q", "c", rejected_at))

    # Retention as configured for that many days (the migrations' 30 days would delete the pushes on insert).
    for table, column in (("raw_events", "received_at"), ("rejections", "rejected_at")):
        schema.command(f"ALTER TABLE {table} MODIFY TTL {column} + toIntervalDay({days + 400})")
    # Twenty minutes inside the window and twenty minutes outside it, on both sides.
    schema.insert("raw_events", [push(1, cutoff + timedelta(minutes=20)), push(2, cutoff - timedelta(minutes=20))],
                  column_names=list(projection.RAW_EVENT_COLUMNS))
    schema.insert("rejections", [refusal(1, cutoff + timedelta(minutes=20)),
                                 refusal(2, cutoff - timedelta(minutes=20))], column_names=list(REJECTION_COLUMNS))
    schema.set_client_setting("session_timezone", "Europe/Berlin")
    want = [(partner, "SESSIONS", 1, 1)]
    _columns, rows = reports.run(schema, reports.health(reports.Period(), partner=partner, raw_days=days))
    assert [tuple(row[:4]) for row in rows] == want
    board = ROOT / "dashboards" / "partner-health.json"
    panel = _panel_sql(board, "Pushes, rejects and lag per partner and module").replace("${raw_days}", str(days))
    sql = render_panel_sql(panel, start=now - timedelta(days=days + 30), end=now, partners=[partner])
    assert [tuple(row[:4]) for row in schema.query(sql).result_rows] == want


def test_partner_health_counts_a_refused_cdr_post_as_a_reject_not_as_a_push_too(schema: Client) -> None:
    """A CDR POSTed again with other content under a held id is refused (2001, in `rejections`) and published all
    the same, so the pipeline records the CONFLICT: its `raw_events` row has source PUSH. Health counted it as a
    push accepted and as a push refused, so one refused POST out of one read pushes 1, rejects 1, rate 0.5. A push
    whose request was refused (the same partner, module and X-Request-ID) is a reject only."""
    from infra.rejections import COLUMNS as REJECTION_COLUMNS
    from infra.rejections import Rejection
    from pipeline import reports
    from pipeline.rejections import rejection_row

    partner = f"hr-{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC)

    def post(n: int, request_id: str, outcome: str, cdr_id: str = "C1") -> list[Any]:
        return [f"{partner}-{n}", partner, "CDRS", "POST", "CDR", "NL", "HRT", cdr_id, None, None,
                now - timedelta(hours=n), request_id, "c", "PUSH", "h", [], "{}", "t", 0, n, outcome, ""]

    # The first POST of C1 (applied), a second one of other content (refused by the receiver, CONFLICT), and a
    # refused Session PUT with the same request id as the first POST (another module: not that push). X-Request-ID
    # is unique per request (04 §11), but not every partner keeps to it: a POST of another CDR, applied, under the
    # refused POST's request id is a push all the same.
    schema.insert("raw_events", [post(3, "q-first", "APPLIED"), post(1, "q-again", "CONFLICT"),
                                 post(2, "q-again", "APPLIED", "C2")],
                  column_names=list(projection.RAW_EVENT_COLUMNS))
    schema.insert("rejections", [
        rejection_row(Rejection(f"{partner}-r1", partner, "cdrs", "POST", "/ocpi/emsp/2.2.1/cdrs/", 2001, 200,
                                "another CDR is held under this id", "$.id", "q-again", "c", now - timedelta(hours=1))),
        rejection_row(Rejection(f"{partner}-r2", partner, "sessions", "PUT", "/", 2001, 200, "bad", "$.x",
                                "q-first", "c", now - timedelta(hours=2)))],
        column_names=list(REJECTION_COLUMNS))
    want = [(partner, "CDRS", 2, 1, 0.3333), (partner, "SESSIONS", 0, 1, 1.0)]
    _columns, rows = reports.run(schema, reports.health(reports.Period(), partner=partner, raw_days=RAW_DAYS))
    assert [tuple(row[:5]) for row in rows] == want
    board = ROOT / "dashboards" / "partner-health.json"
    sql = render_panel_sql(_panel_sql(board, "Pushes, rejects and lag per partner and module"),
                           start=now - timedelta(days=1), end=now, partners=[partner])
    assert [tuple(row[:5]) for row in schema.query(sql).result_rows] == want


def test_the_anomaly_panels_show_the_anomalies_no_partner_can_be_named_for(schema: Client) -> None:
    """A row ClickHouse refused of a table without a partner column (EVSEs, connectors, charging periods, ...) is a
    ROW_REFUSED anomaly with partner_id '': the panels filtered on the partner variable, whose All is the list of
    the registry's partners, so these anomalies, to be settled by hand, were never shown."""
    from pipeline.records import Anomaly, AnomalyRow

    now = datetime.now(UTC)
    party = f"A{uuid.uuid4().hex[:2].upper()}"
    partner = f"an-{uuid.uuid4().hex[:6]}"
    schema.insert("anomalies", [
        projection.anomaly_row(AnomalyRow(Anomaly.ROW_REFUSED, "connectors", "NL", party, "LOC1", "h1", "e1", "",
                                          "refused", now - timedelta(hours=1))),
        projection.anomaly_row(AnomalyRow(Anomaly.STALE_UPDATE, "SESSIONS", "NL", party, "S1", "", "e2", partner,
                                          "stale", now - timedelta(hours=1)))],
        column_names=list(projection.ANOMALY_COLUMNS))
    board = ROOT / "dashboards" / "reconciliation.json"
    sql = render_panel_sql(_panel_sql(board, "Anomalies"), start=now - timedelta(days=1), end=now, partners=[partner])
    assert sorted(row[0] for row in schema.query(sql).result_rows if row[3] == party) == ["ROW_REFUSED",
                                                                                         "STALE_UPDATE"]
    sql = render_panel_sql(_panel_sql(board, "Anomalies per kind"), start=now - timedelta(days=1), end=now,
                           partners=[partner])
    assert {row[1] for row in schema.query(sql).result_rows} >= {"ROW_REFUSED", "STALE_UPDATE"}
    # No partner registered (the variable's All is then formatted as nothing): still the partnerless ones.
    sql = render_panel_sql(_panel_sql(board, "Anomalies"), start=now - timedelta(days=1), end=now, partners=[])
    assert [row[0] for row in schema.query(sql).result_rows if row[3] == party] == ["ROW_REFUSED"]


def test_the_largest_deltas_name_the_currency_of_their_cost(schema: Client) -> None:
    """Cost deltas only compare within a currency (a CDR in another currency than its session has none): the panel
    listed `delta_cost_excl_vat` without saying in which, so 40 SEK and 40 EUR read the same."""
    from decimal import Decimal

    from pipeline.reconcile import RECONCILIATION_COLUMNS

    now = datetime.now(UTC)
    partner = f"ld-{uuid.uuid4().hex[:6]}"

    def row(subject_id: str, currency: str, delta_kwh: str, delta_cost: str) -> list[Any]:
        values = dict(country_code="SE", party_id="LDT", subject="CDR", subject_id=subject_id, partner_id=partner,
                      currency=currency, outcome="MISMATCH", method="SESSION_ID", session_id="S1",
                      cdr_ids=[subject_id], session_kwh=Decimal(10), cdr_kwh=Decimal(10) + Decimal(delta_kwh),
                      delta_kwh=Decimal(delta_kwh), session_cost_excl_vat=Decimal(5),
                      cdr_cost_excl_vat=Decimal(5) + Decimal(delta_cost), delta_cost_excl_vat=Decimal(delta_cost),
                      delta_start_s=None, delta_end_s=None, late=False, due_at=None,
                      event_time=now - timedelta(hours=1), version=2)
        return [values[c] for c in RECONCILIATION_COLUMNS]

    schema.insert("reconciliation", [row("C1", "SEK", "2", "40"), row("C2", "EUR", "1", "40")],
                  column_names=list(RECONCILIATION_COLUMNS))
    panel = _panel_sql(ROOT / "dashboards" / "reconciliation.json", "Largest energy deltas (CDR minus session)")
    sql = render_panel_sql(panel, start=now - timedelta(days=1), end=now, partners=[partner])
    result = schema.query(sql)
    named = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
    assert [(r["subject_id"], r["delta_cost_excl_vat"], r.get("currency")) for r in named] == [
        ("C1", Decimal("40.0000"), "SEK"), ("C2", Decimal("40.0000"), "EUR")]


def test_outcomes_over_time_count_sessions_and_cdrs_apart(schema: Client) -> None:
    """A session and its CDR each have a reconciliation row, both MATCHED when they agree: 'Outcomes over time'
    grouped by outcome alone, so one match was 2 MATCHED, and a session its two CDRs bill twice (each CDR MATCHED on
    its own, the session MISMATCH) read as 2 matches and 1 mismatch. Each subject is a series of its own, as the
    'Outcomes' table and the reconciliation report count them."""
    from decimal import Decimal

    from pipeline.reconcile import RECONCILIATION_COLUMNS

    now = datetime.now(UTC)
    partner = f"ot-{uuid.uuid4().hex[:6]}"

    def row(subject: str, subject_id: str, outcome: str) -> list[Any]:
        values = dict(country_code="NL", party_id="OTT", subject=subject, subject_id=subject_id, partner_id=partner,
                      currency="EUR", outcome=outcome, method="SESSION_ID", session_id="S1", cdr_ids=[],
                      session_kwh=Decimal(10), cdr_kwh=Decimal(10), delta_kwh=Decimal(0),
                      session_cost_excl_vat=Decimal(5), cdr_cost_excl_vat=Decimal(5),
                      delta_cost_excl_vat=Decimal(0), delta_start_s=None, delta_end_s=None, late=False, due_at=None,
                      event_time=now - timedelta(hours=1), version=2)
        return [values[c] for c in RECONCILIATION_COLUMNS]

    # S1 matched by C1; S2 billed twice, by C2 and C3.
    schema.insert("reconciliation", [row("SESSION", "S1", "MATCHED"), row("CDR", "C1", "MATCHED"),
                                     row("SESSION", "S2", "MISMATCH"), row("CDR", "C2", "MATCHED"),
                                     row("CDR", "C3", "MATCHED")], column_names=list(RECONCILIATION_COLUMNS))
    board = ROOT / "dashboards" / "reconciliation.json"
    sql = render_panel_sql(_panel_sql(board, "Outcomes over time"), start=now - timedelta(days=1), end=now,
                           partners=[partner])
    result = schema.query(sql)
    got = {tuple(value for name, value in zip(result.column_names, r, strict=True) if name != "time")
           for r in result.result_rows}
    assert got == {("SESSION", "MATCHED", 1), ("SESSION", "MISMATCH", 1), ("CDR", "MATCHED", 3)}


def test_a_cdr_billed_off_in_cost_alone_is_among_the_largest_deltas(schema: Client) -> None:
    """'Largest deltas' ordered its 50 rows by the kWh delta, the cost delta only breaking ties: a CDR re-priced by
    the CPO (the same kWh, 100 EUR more) has a kWh delta of 0, so it came after every matched CDR whose metering
    differed by a few Wh, and with 50 of those it was not shown at all. The cost deltas are listed by their size."""
    from decimal import Decimal

    from pipeline.reconcile import RECONCILIATION_COLUMNS

    # Dated apart from the other tests' rows (one module-scoped schema): 60 rows would fill their panels too.
    then = datetime.now(UTC) - timedelta(days=30)
    partner = f"lc-{uuid.uuid4().hex[:6]}"

    def row(subject_id: str, outcome: str, delta_kwh: str, delta_cost: str) -> list[Any]:
        values = dict(country_code="NL", party_id="LCT", subject="CDR", subject_id=subject_id, partner_id=partner,
                      currency="EUR", outcome=outcome, method="SESSION_ID", session_id=f"S-{subject_id}",
                      cdr_ids=[subject_id], session_kwh=Decimal(10), cdr_kwh=Decimal(10) + Decimal(delta_kwh),
                      delta_kwh=Decimal(delta_kwh), session_cost_excl_vat=Decimal(5),
                      cdr_cost_excl_vat=Decimal(5) + Decimal(delta_cost), delta_cost_excl_vat=Decimal(delta_cost),
                      delta_start_s=None, delta_end_s=None, late=False, due_at=None,
                      event_time=then, version=2)
        return [values[c] for c in RECONCILIATION_COLUMNS]

    metered = [row(f"M{n:02d}", "MATCHED", "0.005", "0.0010") for n in range(60)]
    schema.insert("reconciliation", [*metered, row("REPRICED", "MISMATCH", "0", "100")],
                  column_names=list(RECONCILIATION_COLUMNS))
    board = ROOT / "dashboards" / "reconciliation.json"
    firsts = {}
    for title, sql in panel_queries(board):
        if title.startswith("Largest"):
            rendered = render_panel_sql(sql, start=then - timedelta(days=1), end=then + timedelta(days=1),
                                        partners=[partner])
            result = schema.query(rendered)
            rows = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
            firsts[title] = rows[0]["subject_id"] if rows else None
    assert "REPRICED" in firsts.values(), firsts



def test_a_top_list_of_amounts_shows_every_currency_s_largest(schema: Client) -> None:
    """'Per location' (top 100 by revenue) and 'Largest cost deltas' (top 50) ranked amounts of every currency
    together: 5,000 JPY came before 400 EUR (about 30 EUR before 400), so in a store with a hundred yen locations or
    fifty yen deltas the euro ones were not listed at all. Each currency now has its own top list."""
    from decimal import Decimal

    from pipeline.reconcile import RECONCILIATION_COLUMNS

    then = datetime.now(UTC) - timedelta(days=40)  # apart from the other tests' rows (one module-scoped schema)
    partner = f"tc-{uuid.uuid4().hex[:6]}"

    def line(location: str, currency: str, cost: str) -> list[Any]:
        return [then.date(), partner, "NL", "TCT", location, f"C-{location}", currency, False, Decimal("10"),
                Decimal(cost), None, then, 1]

    def delta(subject_id: str, currency: str, cost: str) -> list[Any]:
        values = dict(country_code="NL", party_id="TCT", subject="CDR", subject_id=subject_id, partner_id=partner,
                      currency=currency, outcome="MISMATCH", method="SESSION_ID", session_id=f"S-{subject_id}",
                      cdr_ids=[subject_id], session_kwh=Decimal(10), cdr_kwh=Decimal(10), delta_kwh=Decimal(0),
                      session_cost_excl_vat=Decimal(5), cdr_cost_excl_vat=Decimal(5) + Decimal(cost),
                      delta_cost_excl_vat=Decimal(cost), delta_start_s=None, delta_end_s=None, late=False,
                      due_at=None, event_time=then, version=2)
        return [values[c] for c in RECONCILIATION_COLUMNS]

    schema.insert("billing_lines", [*(line(f"JP{n:03d}", "JPY", "5000") for n in range(120)),
                                    line("EU1", "EUR", "400")],
                  column_names=["day", "partner_id", "country_code", "party_id", "location_id", "cdr_id", "currency",
                                "credit", "energy_kwh", "cost_excl_vat", "cost_incl_vat", "received_at", "version"])
    schema.insert("reconciliation", [*(delta(f"JP{n:03d}", "JPY", "1000") for n in range(60)),
                                     delta("EU1", "EUR", "100")], column_names=list(RECONCILIATION_COLUMNS))
    for board, title in (("billing.json", "Per location"),
                         ("reconciliation.json", "Largest cost deltas (CDR minus session)")):
        sql = render_panel_sql(_panel_sql(ROOT / "dashboards" / board, title), start=then - timedelta(days=1),
                               end=then + timedelta(days=1), partners=[partner])
        result = schema.query(sql)
        rows = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
        assert {r["currency"] for r in rows} == {"JPY", "EUR"}, title
        assert max(r.get("location_id", r.get("subject_id")) for r in rows if r["currency"] == "EUR") == "EU1"

# Panels that reduce each numeric field to one value unless told to show every row (Grafana's stat/common.ts
# addStandardDataReduceOptions: `reduceOptions.values` defaults to false, "Calculate", with `lastNotNull`).
_REDUCING_PANELS = {"stat", "gauge", "bargauge", "piechart"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_reducing_panels_of_grouped_rows_show_every_row(path: Path) -> None:
    """A stat or pie chart on a query with one row per group (per currency, per source) showed a single number:
    with `reduceOptions.values` false (Grafana's default) the panel reduces the numeric column over the rows to
    its last value, so 'Revenue per currency' showed the revenue of the alphabetically last currency, unnamed,
    and 'Events by source' a pie of one slice. Showing every row labels each value with its row's strings."""
    for panel in _panels(_load(path)):
        if panel["type"] not in _REDUCING_PANELS:
            continue
        grouped = any(re.search(r"\bGROUP BY\b", target["rawSql"]) for target in panel["targets"])
        values = panel.get("options", {}).get("reduceOptions", {}).get("values", False)
        assert values or not grouped, f"{path.name}: panel {panel['title']!r} reduces its rows to one value"


_MONEY = re.compile(r"cost|revenue|price|amount", re.IGNORECASE)
_NUMERIC = re.compile(r"^(Nullable\()?(U?Int\d+|Float\d+|Decimal)")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_returns_the_columns_its_panel_needs(schema: Client, path: Path) -> None:
    """What the panels' columns are, by their types on the migrated schema: a time series has a DateTime `time`,
    string labels and numbers; a reducing panel numbers; an amount of money is a Decimal (a Float64 sum drifts by
    cents) and comes with the currency it is in (amounts of different currencies are never added up)."""
    end = datetime.now(UTC)
    for panel in _panels(_load(path)):
        for target in panel["targets"]:
            rendered = render_panel_sql(target["rawSql"], start=end - timedelta(days=7), end=end, partners=["p1"])
            columns = [(row[0], row[1]) for row in schema.query(f"DESCRIBE TABLE ({rendered})").result_rows]
            types = dict(columns)
            where = f"{path.name}: panel {panel['title']!r}: {columns}"
            numeric = [name for name, kind in columns if _NUMERIC.match(kind)]
            if panel["type"] == "timeseries":
                assert columns[0][0] == "time" and re.match(r"DateTime", columns[0][1]), where
                assert numeric and all(_NUMERIC.match(kind) or "String" in kind for _n, kind in columns[1:]), where
            if panel["type"] in _REDUCING_PANELS:
                assert numeric, where
            money = [name for name in types if _MONEY.search(name)]
            assert all("Decimal" in types[name] for name in money), where
            assert not money or "currency" in types, where


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_reads_deduplicated_rows(schema: Client, path: Path) -> None:
    """ReplacingMergeTree tables hold every version of a row until a merge, which may never come: a panel reading
    one without FINAL counts a CDR, an event or an outcome once per version. A view must read FINAL itself."""
    engines = dict(schema.query("SELECT name, engine FROM system.tables WHERE database = currentDatabase()")
                   .result_rows)
    views = dict(schema.query("SELECT name, create_table_query FROM system.tables WHERE database = currentDatabase() "
                              "AND engine = 'View'").result_rows)
    queries = [(title, sql) for title, sql in panel_queries(path)]
    queries += [(v["name"], v["query"]) for v in _load(path)["templating"]["list"] if v["type"] == "query"]
    for title, sql in queries:
        for table, final in re.findall(r"\b(?:FROM|JOIN)\s+(\w+)(\s+FINAL\b)?", sql):
            engine = engines.get(table)
            if engine is None:
                continue  # a subquery's alias, not a table
            if "ReplacingMergeTree" in engine:
                assert final, f"{path.name}: {title!r} reads {table} without FINAL"
            else:
                assert engine == "View" and "FINAL" in views[table], f"{path.name}: {title!r} reads {table} ({engine})"


def test_the_billing_dashboard_shows_the_revenue_report_s_numbers_for_all_partners(schema: Client) -> None:
    """The billing dashboard says it shows the numbers of `ocpi-pipeline report revenue`, but its `partner` variable
    listed the registered partners only, so All left out the CDRs billed under a partner id missing from `partners`:
    revenue the report counts and the dashboard did not. All now lists the billed partner ids too."""
    from decimal import Decimal

    from pipeline import reports

    now = datetime.now(UTC)
    party = f"B{uuid.uuid4().hex[:2].upper()}"
    registered, gone = f"bl-{uuid.uuid4().hex[:6]}", f"bl-gone-{uuid.uuid4().hex[:6]}"
    PartnerRegistry(schema).register_direct(
        registered, "Billed", [PartyRole(country_code="NL", party_id=party, role="CPO", business_name="Billed")])

    def line(partner_id: str, cdr_id: str, cost: str) -> list[Any]:
        return [now.date(), partner_id, "NL", party, "LOC1", cdr_id, "EUR", False, Decimal("10"), Decimal(cost),
                None, now, 1]

    schema.insert("billing_lines", [line(registered, "C1", "5"), line(gone, "C2", "7")],
                  column_names=["day", "partner_id", "country_code", "party_id", "location_id", "cdr_id", "currency",
                                "credit", "energy_kwh", "cost_excl_vat", "cost_incl_vat", "received_at", "version"])
    _columns, report = reports.run(schema, reports.revenue(reports.Period(), party=f"NL/{party}"))
    assert [(row[3], row[6]) for row in report] == [(2, Decimal("12"))]

    board = ROOT / "dashboards" / "billing.json"
    variable = next(v for v in _load(board)["templating"]["list"] if v["name"] == "partner")
    everyone = [str(row[0]) for row in schema.query(variable["query"]).result_rows]  # All: every option
    sql = render_panel_sql(_panel_sql(board, "Per CPO party"), start=now - timedelta(days=1),
                           end=now + timedelta(days=1), partners=everyone)
    rows = [row for row in schema.query(sql).result_rows if row[1] == party]
    assert [(row[3], row[5], row[6]) for row in rows] == [(2, Decimal("20"), Decimal("12"))]


def test_the_reconciliation_dashboard_shows_every_partner_s_outcomes_for_all_partners(schema: Client) -> None:
    """The reconciliation dashboard's `partner` variable listed the registered partners only, so All left out the
    outcomes and anomalies written under a partner id missing from `partners` (as the billing dashboard left out
    their CDRs): `report reconciliation` counts them, the dashboard did not. All now lists those partner ids too."""
    from decimal import Decimal

    from pipeline import reports
    from pipeline.reconcile import RECONCILIATION_COLUMNS
    from pipeline.records import Anomaly, AnomalyRow

    now = datetime.now(UTC)
    party = f"R{uuid.uuid4().hex[:2].upper()}"
    registered, gone = f"rc-{uuid.uuid4().hex[:6]}", f"rc-gone-{uuid.uuid4().hex[:6]}"
    PartnerRegistry(schema).register_direct(
        registered, "Reconciled", [PartyRole(country_code="NL", party_id=party, role="CPO", business_name="R")])

    def row(partner_id: str, subject_id: str) -> list[Any]:
        values = dict(country_code="NL", party_id=party, subject="CDR", subject_id=subject_id, partner_id=partner_id,
                      currency="EUR", outcome="MATCHED", method="SESSION_ID", session_id="S1", cdr_ids=[subject_id],
                      session_kwh=Decimal(10), cdr_kwh=Decimal(10), delta_kwh=Decimal(0),
                      session_cost_excl_vat=Decimal(5), cdr_cost_excl_vat=Decimal(5),
                      delta_cost_excl_vat=Decimal(0), delta_start_s=None, delta_end_s=None, late=False, due_at=None,
                      event_time=now - timedelta(hours=1), version=2)
        return [values[c] for c in RECONCILIATION_COLUMNS]

    schema.insert("reconciliation", [row(registered, "C1"), row(gone, "C2")],
                  column_names=list(RECONCILIATION_COLUMNS))
    schema.insert("anomalies", [projection.anomaly_row(AnomalyRow(
        Anomaly.STALE_UPDATE, "SESSIONS", "NL", party, "S9", "", "e9", gone, "stale", now - timedelta(hours=1)))],
        column_names=list(projection.ANOMALY_COLUMNS))
    _columns, report = reports.run(schema, reports.reconciliation(reports.Period(), party=f"NL/{party}"))
    assert [row[5] for row in report] == [2]

    board = ROOT / "dashboards" / "reconciliation.json"
    variable = next(v for v in _load(board)["templating"]["list"] if v["name"] == "partner")
    everyone = [str(row[0]) for row in schema.query(variable["query"]).result_rows]  # All: every option
    assert "" not in everyone

    def rendered(title: str) -> str:
        return render_panel_sql(_panel_sql(board, title), start=now - timedelta(days=1), end=now + timedelta(hours=1),
                                partners=everyone)

    deltas = [row for row in schema.query(rendered("Largest energy deltas (CDR minus session)")).result_rows
              if row[1] == party]
    assert sorted(row[3] for row in deltas) == ["C1", "C2"]
    anomalies = [row for row in schema.query(rendered("Anomalies")).result_rows if row[3] == party]
    assert [(row[0], row[4]) for row in anomalies] == [("STALE_UPDATE", 1)]


def test_the_billing_dashboard_shows_charging_revenue_apart_from_home_charging_compensation(schema: Client) -> None:
    """A CDR with home_charging_compensation true is energy the eMSP compensates TO the driver: the revenue panels
    counted it as the location's charging revenue. They show charging only now, as the revenue report's CHARGING
    rows, and the compensation (credits netted) has a panel of its own."""
    from decimal import Decimal

    now = datetime.now(UTC)
    partner, party = f"hc-{uuid.uuid4().hex[:6]}", f"H{uuid.uuid4().hex[:2].upper()}"

    def line(cdr_id: str, kwh: str, cost: str, *, credit: bool = False, home: bool = False) -> list[Any]:
        return [now.date(), partner, "NL", party, "LOC1", cdr_id, "EUR", credit, Decimal(kwh), Decimal(cost),
                Decimal(cost), now, 1, home]

    schema.insert("billing_lines", [line("C1", "10", "5"), line("H1", "4", "2", home=True),
                                    line("H2", "3", "1", home=True), line("H1-C", "-4", "-2", credit=True, home=True)],
                  column_names=["day", "partner_id", "country_code", "party_id", "location_id", "cdr_id", "currency",
                                "credit", "energy_kwh", "cost_excl_vat", "cost_incl_vat", "received_at", "version",
                                "home_charging_compensation"])
    board = ROOT / "dashboards" / "billing.json"

    def rows(title: str) -> list[dict[str, Any]]:
        sql = render_panel_sql(_panel_sql(board, title), start=now - timedelta(days=1), end=now + timedelta(days=1),
                               partners=[partner])
        result = schema.query(sql)
        return [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]

    charging = {"Revenue per day (excl. VAT)": {"revenue": Decimal("5")}, "Energy per day": {"kwh": Decimal("10")},
                "CDRs": {"cdrs": 1, "credit_cdrs": 0}, "Energy (kWh)": {"kwh": Decimal("10")},
                "Revenue per currency": {"revenue_excl_vat": Decimal("5")},
                "Per CPO party": {"cdrs": 1, "energy_kwh": Decimal("10"), "revenue_excl_vat": Decimal("5")},
                "Per location": {"cdrs": 1, "energy_kwh": Decimal("10"), "revenue_excl_vat": Decimal("5")}}
    for title, want in charging.items():
        [row] = rows(title)
        assert {k: row[k] for k in want} == want, title
    [compensation] = [r for r in rows("Home charging compensation (owed to drivers)") if r["party_id"] == party]
    assert {k: compensation[k] for k in ("currency", "cdrs", "credit_cdrs", "energy_kwh", "amount_excl_vat",
                                         "amount_incl_vat")} == {
        "currency": "EUR", "cdrs": 2, "credit_cdrs": 1, "energy_kwh": Decimal("3"), "amount_excl_vat": Decimal("1"),
        "amount_incl_vat": Decimal("1")}


def test_every_billing_panel_agrees_with_the_revenue_report_and_hand_totals_at_the_period_s_edges(
        schema: Client) -> None:
    """For one time range and partner, every billing panel shows what `report revenue` shows for those UTC days
    and that partner, and what billing should by hand: the first and last day of the range counted whole, the days
    either side not at all; a credit netted, a duplicate credit left out, incl. VAT summed where given and the
    lines without it counted; each currency apart; the other partner's lines (of the same party) not counted; home
    charging compensation only in its own panel."""
    from datetime import date
    from decimal import Decimal

    from pipeline import reports
    from pipeline.reconcile import CREDIT_LINK_COLUMNS

    partner, other = f"ag-{uuid.uuid4().hex[:6]}", f"ag-hub-{uuid.uuid4().hex[:6]}"
    party = f"A{uuid.uuid4().hex[:2].upper()}"
    first, last = date(2024, 3, 4), date(2024, 3, 6)
    now = datetime.now(UTC)

    def line(day: date, cdr_id: str, kwh: str, excl: str, incl: str | None, *, sender: str = partner,
             currency: str = "EUR", credit: bool = False, home: bool = False) -> list[Any]:
        return [day, sender, "NL", party, "LOC1", cdr_id, currency, credit, Decimal(kwh), Decimal(excl),
                None if incl is None else Decimal(incl), now, 1, home]

    schema.insert("billing_lines", [
        line(first - timedelta(days=1), "BEFORE", "100", "100", "121"),
        line(first, "C1", "10", "5", "6.05"),
        line(first, "C1-CR", "-10", "-5", "-6.05", credit=True),
        line(first, "C1-CR2", "-10", "-5", "-6.05", credit=True),  # a DUPLICATE_CREDIT
        line(first, "C2", "8", "4", None),
        line(last, "C3", "3", "2", "2.42"),
        line(last, "U1", "7", "9", "10", currency="USD"),
        line(last, "H1", "4", "1", "1.21", home=True),
        line(last, "HUB1", "50", "50", "60.5", sender=other),
        line(last + timedelta(days=1), "AFTER", "100", "100", "121")],
        column_names=["day", "partner_id", "country_code", "party_id", "location_id", "cdr_id", "currency",
                      "credit", "energy_kwh", "cost_excl_vat", "cost_incl_vat", "received_at", "version",
                      "home_charging_compensation"])
    link = dict(country_code="NL", party_id=party, credit_cdr_id="C1-CR2", credited_cdr_id="C1", partner_id=partner,
                status="DUPLICATE_CREDIT", credit_cost_excl_vat=Decimal(-5), credited_cost_excl_vat=Decimal(5),
                amount_matches=True, received_at=now, due_at=now, version=2)
    schema.insert("credit_links", [[link[c] for c in CREDIT_LINK_COLUMNS]], column_names=list(CREDIT_LINK_COLUMNS))

    charging = {"EUR": (3, 1, Decimal("11"), Decimal("6"), Decimal("2.42"), 1),  # C1 netted by C1-CR, C2, C3
                "USD": (1, 0, Decimal("7"), Decimal("9"), Decimal("10"), 0)}
    columns, report = reports.run(schema, reports.revenue(reports.Period(first, last), party=f"NL/{party}",
                                                          partner=partner))
    by_kind = {(r["kind"], r["currency"]): (r["cdrs"], r["credit_cdrs"], r["energy_kwh"], r["revenue_excl_vat"],
                                            r["revenue_incl_vat"], r["lines_without_incl_vat"])
               for r in (dict(zip(columns, row, strict=True)) for row in report)}
    assert by_kind == {**{("CHARGING", c): v for c, v in charging.items()},
                       ("HOME_CHARGING_COMPENSATION", "EUR"): (1, 0, Decimal("4"), Decimal("1"), Decimal("1.21"), 0)}

    board = ROOT / "dashboards" / "billing.json"
    # A range from within the first day to within the last: the plugin's $__dateFilter takes both days whole.
    start, end = datetime(2024, 3, 4, 13, tzinfo=UTC), datetime(2024, 3, 6, 2, tzinfo=UTC)

    def rows(title: str) -> list[dict[str, Any]]:
        result = schema.query(render_panel_sql(_panel_sql(board, title), start=start, end=end, partners=[partner]))
        return [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]

    [party_eur, party_usd] = sorted(rows("Per CPO party"), key=lambda r: r["currency"])
    for got in (party_eur, party_usd):
        assert (got["cdrs"], got["credit_cdrs"], got["energy_kwh"], got["revenue_excl_vat"], got["revenue_incl_vat"],
                got["lines_without_incl_vat"]) == charging[got["currency"]]
    assert {r["currency"]: (r["cdrs"], r["energy_kwh"], r["revenue_excl_vat"]) for r in rows("Per location")} == {
        c: (v[0], v[2], v[3]) for c, v in charging.items()}
    assert {r["currency"]: r["revenue_excl_vat"] for r in rows("Revenue per currency")} == {
        c: v[3] for c, v in charging.items()}
    assert rows("CDRs") == [{"cdrs": 4, "credit_cdrs": 1}]
    assert rows("Energy (kWh)") == [{"kwh": Decimal("18")}]
    assert {(r["time"].date(), r["kwh"]) for r in rows("Energy per day")} == {(first, Decimal("8")),
                                                                             (last, Decimal("10"))}
    assert {(r["time"].date(), r["currency"], r["revenue"]) for r in rows("Revenue per day (excl. VAT)")} == {
        (first, "EUR", Decimal("4")), (last, "EUR", Decimal("2")), (last, "USD", Decimal("9"))}
    [home] = rows("Home charging compensation (owed to drivers)")
    assert (home["cdrs"], home["energy_kwh"], home["amount_excl_vat"]) == (1, Decimal("4"), Decimal("1"))
