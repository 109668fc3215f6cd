"""Reports and dashboard panels end to end: simulated CPOs and hand-made pushes through the real stack (HTTP →
Kafka → Faust → chDB), then the reports (through the CLI) and every Grafana panel's SQL against that data.

One module-scoped stack run feeds every test here (the machine is shared): the simulated CPOs of the demo
(their billing totals are known from `Expected`), plus a partner `report-cpo` (DE/RPT) whose seven CDRs
(two credits; three of home charging compensation) and two refused pushes have totals written out below.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from click.testing import CliRunner
from clickhouse_connect.driver.client import Client

from infra.clickhouse.client import connect
from infra.settings import Settings, load_settings
from pipeline import reports
from pipeline.cli import cli
from pipeline.demo import provision_demo_partners
from pipeline.simulator import Expected, SimulatedCpo, Traffic
from pipeline.stack import Stack
from receivers.registry import PartnerRegistry, PartyRole
from tests.unit.test_dashboards import DASHBOARDS, panel_queries, render_panel_sql

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse]

BASE = "/ocpi/emsp/2.2.1"
_JSON = msgspec.json.Encoder(decimal_format="number")  # exact amounts as JSON numbers
PARTNER = "report-cpo"


def _cdr(cdr_id: str, location: str, end: str, kwh: str, excl: str, incl: str, *,
         credit_of: str | None = None, home: bool = False) -> dict[str, Any]:
    start = (datetime.fromisoformat(end.replace("Z", "+00:00")) - timedelta(hours=1)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    body: dict[str, Any] = {
        "country_code": "DE", "party_id": "RPT", "id": cdr_id, "start_date_time": start, "end_date_time": end,
        "cdr_token": {"country_code": "NL", "party_id": "OPP", "uid": "TOKEN1", "type": "RFID",
                      "contract_id": "NL-OPP-C00001"},
        "auth_method": "WHITELIST",
        "cdr_location": {"id": location, "address": "Hauptstrasse 1", "city": "Berlin", "postal_code": "10115",
                         "country": "DEU", "coordinates": {"latitude": "52.520008", "longitude": "13.404954"},
                         "evse_uid": f"{location}-1", "evse_id": f"DE*RPT*E{location}1", "connector_id": "1",
                         "connector_standard": "IEC_62196_T2", "connector_format": "SOCKET",
                         "connector_power_type": "AC_3_PHASE"},
        "currency": "EUR",
        "charging_periods": [{"start_date_time": start, "dimensions": [{"type": "ENERGY", "volume": Decimal(kwh)}]}],
        "total_cost": {"excl_vat": Decimal(excl), "incl_vat": Decimal(incl)},
        "total_energy": Decimal(kwh), "total_time": 1, "last_updated": end,
    }
    if credit_of:
        body |= {"credit": True, "credit_reference_id": credit_of}
    if home:
        body["home_charging_compensation"] = True
    return body


# Known inputs: (CDR, expected billing effect). A credit CDR repeats the positive energy of the CDR it
# cancels and carries its negated cost; billing counts both negative.
REPORT_CDRS = [
    _cdr("RPT-A", "L1", "2024-03-01T10:00:00Z", "10.0", "5.00", "6.05"),
    _cdr("RPT-B", "L2", "2024-03-01T12:00:00Z", "20.0", "8.00", "9.68"),
    _cdr("RPT-C", "L1", "2024-03-02T09:00:00Z", "7.5", "3.00", "3.63"),
    _cdr("RPT-A-CREDIT", "L1", "2024-03-02T11:00:00Z", "10.0", "-5.00", "-6.05", credit_of="RPT-A"),
    # Home charging compensation (owed to the driver, billed apart from charging): RPT-H2 is left after the credit.
    _cdr("RPT-H", "L3", "2024-03-01T14:00:00Z", "6.0", "1.50", "1.82", home=True),
    _cdr("RPT-H2", "L3", "2024-03-01T15:00:00Z", "4.0", "1.00", "1.21", home=True),
    _cdr("RPT-H-CREDIT", "L3", "2024-03-01T16:00:00Z", "6.0", "-1.50", "-1.82", credit_of="RPT-H", home=True),
]


@dataclass
class DemoData:
    settings: Settings
    env: dict[str, str]
    client: Client
    expected: Expected
    consumer_lag: list[tuple[Any, ...]]
    module_records: int


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": "Token " + base64.b64encode(token.encode()).decode()}


async def _wait(client: Client, sql: str, want: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    got = -1
    while time.monotonic() < deadline:
        got = int((await asyncio.to_thread(client.query, sql)).result_rows[0][0])
        if got >= want:
            return got
        await asyncio.sleep(0.5)
    return got


async def _populate(settings: Settings) -> tuple[Expected, list[tuple[Any, ...]], int]:
    stack = await Stack(settings).start()
    try:
        client = stack.clickhouse
        assert client is not None
        partners = await asyncio.to_thread(provision_demo_partners, client)
        roles = [PartyRole(country_code="DE", party_id="RPT", role="CPO", business_name="Report CPO")]
        _, token = await asyncio.to_thread(PartnerRegistry(client).register_direct, PARTNER, "Report CPO", roles)

        expected = Expected()
        traffic = Traffic(credit_share=0.3, stale_share=0.3)
        cpos = [SimulatedCpo(stack.base_url, t, parties, seed=11 + i, traffic=traffic)
                for i, (t, parties) in enumerate(partners.values())]
        for result in await asyncio.gather(*(cpo.run(6) for cpo in cpos)):
            expected.merge(result)
        assert expected.rejected == 0

        async with httpx.AsyncClient(base_url=stack.base_url, headers=_auth(token), timeout=30) as http:
            for body in REPORT_CDRS:
                answer = await http.post(f"{BASE}/cdrs", content=_JSON.encode(body),
                                         headers={"Content-Type": "application/json"})
                assert answer.json()["status_code"] == 1000, answer.text
            bad_session = {"country_code": "DE", "party_id": "RPT", "id": "S1"}  # far from a Session
            refused = await http.put(f"{BASE}/sessions/DE/RPT/S1", json=bad_session,
                                     headers={"X-Request-ID": "refused-1"})
            assert refused.json()["status_code"] == 2001
            malformed = await http.post(f"{BASE}/cdrs", content=b"{not json",
                                        headers={"Content-Type": "application/json"})
            assert malformed.status_code == 400

        await _wait(client, "SELECT count() FROM cdrs FINAL", len(expected.cdrs) + len(REPORT_CDRS))
        await _wait(client, "SELECT count() FROM sessions FINAL WHERE status = 'COMPLETED'", len(expected.sessions))
        await _wait(client, "SELECT count() FROM rejections FINAL", 2)
        await _wait(client, "SELECT count() FROM reconciliation FINAL WHERE party_id = 'RPT'", len(REPORT_CDRS))
        await _wait(client, "SELECT count() FROM reconciliation FINAL WHERE party_id = 'RPT' AND outcome = 'CREDITED'",
                    2)
        stack.check_children()

        # Consumer lag while the worker runs: it commits within a second or two of writing (seconds more on a
        # slow, loaded machine: the wait ends as soon as the lag is 0).
        topics = reports.consumed_topics(settings)
        lag: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            _columns, rows = await reports.consumer_lag(settings.kafka, stack.bootstrap, settings.pipeline.app_id,
                                                        topics, retention_days=settings.retention.raw_days)
            lag = [tuple(r) for r in rows]
            if lag and all(r[4] == 0 for r in lag):
                break
            await asyncio.sleep(0.5)
        module_records = sum(r[3] for r in lag if r[0] in settings.kafka.module_topics)
        return expected, lag, module_records
    finally:
        await stack.stop()


@pytest.fixture(scope="module")
def demo(broker: str, session_tmp: Path, chdb_dsn: str) -> Iterator[DemoData]:
    name = f"rep_{uuid.uuid4().hex[:8]}"
    env = {
        "OCPI_DATA_DIR": str(session_tmp / name), "OCPI_CLICKHOUSE_DSN": chdb_dsn,
        "OCPI_CLICKHOUSE_DATABASE": name, "OCPI_KAFKA_BOOTSTRAP": broker, "OCPI_KAFKA_FLAVOR": "tansu",
        "OCPI_TOPIC_LOCATIONS": f"{name}.locations", "OCPI_TOPIC_SESSIONS": f"{name}.sessions",
        "OCPI_TOPIC_CDRS": f"{name}.cdrs", "OCPI_TOPIC_REJECTIONS": f"{name}.rejections",
        "OCPI_TOPIC_PARTY_FACTS": f"{name}.facts", "OCPI_TOPIC_RECONCILIATION": f"{name}.reconciliation",
        "OCPI_PIPELINE_APP_ID": name, "OCPI_TOPIC_PARTITIONS": "2", "OCPI_KAFKA_SEND_TIMEOUT": "5",
        "OCPI_ADMIN_TOKEN": "test-admin-token", "PATH": os.environ.get("PATH", ""),
    }
    settings = load_settings(env).with_overrides(http={"port": 0})
    expected, lag, module_records = asyncio.run(_populate(settings))
    client = connect(chdb_dsn, database=name)
    try:
        # The CLI reads the same store (the stack is stopped, so it opens the chDB path itself, as `query` does).
        yield DemoData(settings, env, client, expected, lag, module_records)
    finally:
        client.close()


def report(demo: DemoData, *args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(cli, ["report", *args, "--format", "json"], env=demo.env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


# --- revenue ------------------------------------------------------------------------------------------------

def test_revenue_by_party_nets_credits_exactly(demo: DemoData) -> None:
    rows = report(demo, "revenue", "--party", "de/rpt")
    assert rows == [{"country_code": "DE", "party_id": "RPT", "currency": "EUR", "cdrs": 3, "credit_cdrs": 1,
                     "energy_kwh": "27.5000", "revenue_excl_vat": "11.0000", "revenue_incl_vat": "13.3100",
                     "lines_without_incl_vat": 0, "kind": "CHARGING"},
                    {"country_code": "DE", "party_id": "RPT", "currency": "EUR", "cdrs": 2, "credit_cdrs": 1,
                     "energy_kwh": "4.0000", "revenue_excl_vat": "1.0000", "revenue_incl_vat": "1.2100",
                     "lines_without_incl_vat": 0, "kind": "HOME_CHARGING_COMPENSATION"}]


def test_revenue_by_location_and_by_day_with_a_period(demo: DemoData) -> None:
    by_location = report(demo, "revenue", "--party", "DE/RPT", "--by", "location")
    assert [(r["location_id"], r["cdrs"], r["credit_cdrs"], r["energy_kwh"], r["revenue_excl_vat"], r["kind"])
            for r in by_location] == [("L1", 2, 1, "7.5000", "3.0000", "CHARGING"),
                                      ("L2", 1, 0, "20.0000", "8.0000", "CHARGING"),
                                      ("L3", 2, 1, "4.0000", "1.0000", "HOME_CHARGING_COMPENSATION")]
    by_day = report(demo, "revenue", "--party", "DE/RPT", "--by", "day")
    assert [(r["day"], r["cdrs"], r["credit_cdrs"], r["energy_kwh"], r["revenue_excl_vat"], r["revenue_incl_vat"],
             r["kind"]) for r in by_day] == [
        ("2024-03-01", 2, 0, "30.0000", "13.0000", "15.7300", "CHARGING"),
        ("2024-03-01", 2, 1, "4.0000", "1.0000", "1.2100", "HOME_CHARGING_COMPENSATION"),
        ("2024-03-02", 1, 1, "-2.5000", "-2.0000", "-2.4200", "CHARGING")]
    second_day = report(demo, "revenue", "--from", "2024-03-02", "--to", "2024-03-02")
    assert [(r["party_id"], r["energy_kwh"], r["revenue_excl_vat"]) for r in second_day] == [
        ("RPT", "-2.5000", "-2.0000")]
    assert report(demo, "revenue", "--from", "2024-03-03", "--to", "2024-03-31") == []


def test_revenue_of_the_simulated_cpos_equals_what_they_pushed(demo: DemoData) -> None:
    rows = report(demo, "revenue", "--by", "party")
    simulated = {f"{r['country_code']}/{r['party_id']}": (Decimal(r["energy_kwh"]), Decimal(r["revenue_excl_vat"]))
                 for r in rows if r["party_id"] != "RPT"}
    assert simulated == {party: (demo.expected.kwh_by_party[party], demo.expected.cost_by_party[party])
                         for party in demo.expected.cost_by_party}
    assert sum(r["credit_cdrs"] for r in rows if r["party_id"] != "RPT") == len(demo.expected.credited) > 0


def test_report_rejects_bad_parameters() -> None:
    runner = CliRunner()
    bad_party = runner.invoke(cli, ["report", "revenue", "--party", "DERPT"])
    assert bad_party.exit_code == 2 and "COUNTRY_CODE/PARTY_ID" in bad_party.output
    backwards = runner.invoke(cli, ["report", "revenue", "--from", "2024-03-02", "--to", "2024-03-01"])
    assert backwards.exit_code == 2 and "after it ends" in backwards.output
    not_a_date = runner.invoke(cli, ["report", "health", "--from", "yesterday"])
    assert not_a_date.exit_code == 2 and "YYYY-MM-DD" in not_a_date.output


# --- health, rejections, lag ----------------------------------------------------------------------------------

def test_health_counts_pushes_and_rejects_per_partner_and_module(demo: DemoData) -> None:
    rows = {(r["partner_id"], r["module"]): r for r in report(demo, "health")}
    cdrs, sessions = rows[(PARTNER, "CDRS")], rows[(PARTNER, "SESSIONS")]
    assert (cdrs["pushes"], cdrs["rejects"], cdrs["reject_rate"]) == (7, 1, 0.125)
    assert (sessions["pushes"], sessions["rejects"], sessions["reject_rate"]) == (0, 1, 1.0)
    assert sessions["lag_p50_s"] is None and sessions["last_push"] is None
    assert 0 <= cdrs["lag_p50_s"] <= cdrs["lag_p95_s"] <= cdrs["lag_max_s"] < 120
    simulated = [r for (partner, _m), r in rows.items() if partner != PARTNER]
    assert sum(r["pushes"] for r in simulated) == demo.expected.events
    assert all(r["rejects"] == 0 for r in simulated)
    today = datetime.now(UTC).date()
    only = report(demo, "health", "--partner", PARTNER, "--from", str(today - timedelta(days=1)))
    assert [(r["module"], r["pushes"], r["rejects"]) for r in only] == [("CDRS", 7, 1), ("SESSIONS", 0, 1)]
    assert report(demo, "health", "--to", str(date(2000, 1, 1))) == []


def test_rejections_report_names_status_and_field(demo: DemoData) -> None:
    rows = report(demo, "rejections", "--partner", PARTNER)
    assert [(r["module"], r["method"], r["ocpi_status"], r["http_status"], r["field_path"], r["rejects"])
            for r in rows] == [("CDRS", "POST", 2001, 400, "", 1), ("SESSIONS", "PUT", 2001, 200,
                                                                     rows[1]["field_path"], 1)]
    assert rows[1]["field_path"].startswith("$.") and rows[1]["field_path"] in rows[1]["example_reason"]
    stored = demo.client.query("SELECT request_id FROM rejections FINAL WHERE module = 'sessions'").result_rows
    assert stored == [("refused-1",)]


def test_ingestion_lag_is_recorded_for_every_raw_event(demo: DemoData) -> None:
    lags = demo.client.query("SELECT count(), countIf(inserted_at >= received_at), "
                             "max(dateDiff('second', received_at, inserted_at)) FROM raw_events FINAL").result_rows
    total, ordered, worst = lags[0]
    assert total == demo.expected.events + len(REPORT_CDRS) == ordered
    assert worst < 120


def test_consumer_lag_reaches_zero_and_counts_every_record(demo: DemoData) -> None:
    topics = {row[0]: row for row in demo.consumer_lag}
    assert set(demo.settings.kafka.module_topics) <= set(topics)
    assert all(row[1] == 2 and row[4] == 0 for row in demo.consumer_lag), demo.consumer_lag
    assert all(row[5] is None and row[6] is None and row[7] == 0 for row in demo.consumer_lag)  # nothing unread
    assert demo.module_records == demo.expected.events + len(REPORT_CDRS)
    assert topics[demo.settings.kafka.topic_rejections][3] == 2


# --- reconciliation and anomalies ------------------------------------------------------------------------------

def test_reconciliation_report_counts_outcomes_per_party(demo: DemoData) -> None:
    rows = report(demo, "reconciliation")
    ours = [(r["subject"], r["outcome"], r["subjects"], r["sum_delta_kwh"]) for r in rows if r["party_id"] == "RPT"]
    # No sessions were pushed for DE/RPT: its CDRs wait for theirs, but RPT-A and RPT-H, which credit CDRs cancel.
    assert ours == [("CDR", "AWAITING_SESSION", 3, "0.0000"), ("CDR", "CREDIT", 2, "0.0000"),
                    ("CDR", "CREDITED", 2, "0.0000")]
    # BE/BEC is the single party of its simulated CPO: every completed session of it is matched with its CDR;
    # those whose CDR was corrected (a credit and a CDR at another price) bill another cost than the session says:
    # MISMATCH, like that CDR's own row.
    bec_sessions = len([key for key in demo.expected.sessions if key[:2] == ("BE", "BEC")])
    counts = {(r["subject"], r["outcome"]): r["subjects"] for r in report(demo, "reconciliation", "--party", "be/bec")}
    assert counts.get(("SESSION", "MATCHED"), 0) + counts.get(("SESSION", "MISMATCH"), 0) == bec_sessions > 0
    assert counts.get(("SESSION", "MISMATCH"), 0) == counts.get(("CDR", "MISMATCH"), 0)
    assert report(demo, "reconciliation", "--party", "DE/RPT", "--to", "2000-01-01") == []


def test_anomalies_report_counts_the_stale_pushes(demo: DemoData) -> None:
    rows = report(demo, "anomalies")
    assert rows, "the simulated traffic has stale and out-of-order pushes"
    by_kind: dict[str, int] = {}
    for row in rows:
        by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + row["anomalies"]
    stale = sum(n for kind, n in by_kind.items() if "STALE" in kind)
    assert stale >= demo.expected.stale > 0
    kind = rows[0]["kind"]
    assert {r["kind"] for r in report(demo, "anomalies", "--kind", kind.lower())} == {kind}


# --- dashboards -------------------------------------------------------------------------------------------------

# Panels that must return rows on the demo data (everything but the ones about things the demo never does).
# The simulated CPOs send no home charging compensation CDRs (tests/unit/test_dashboards.py fills that panel).
MAY_BE_EMPTY = {"Dead letters", "Dead letters over time", "Relaxations applied",
                "Home charging compensation (owed to drivers)"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_query_runs_on_the_demo_data(demo: DemoData, path: Path) -> None:
    now = datetime.now(UTC)
    # The dashboards' `partner` variable at its default, All: every partner of the registry.
    partners = [row[0] for row in demo.client.query("SELECT partner_id FROM partners FINAL").result_rows]
    assert PARTNER in partners
    for title, sql in panel_queries(path):
        rendered = render_panel_sql(sql, start=now - timedelta(days=7), end=now + timedelta(hours=1),
                                    partners=partners)
        try:
            rows = demo.client.query(rendered).result_rows
        except Exception as exc:
            pytest.fail(f"{path.name}: panel {title!r} failed: {exc}\n{rendered}")
        if title not in MAY_BE_EMPTY:
            assert rows, f"{path.name}: panel {title!r} returned no rows on the demo data\n{rendered}"
