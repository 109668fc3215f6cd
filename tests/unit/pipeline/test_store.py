"""Rows meet the DDL: every row builder's output inserted through the sink into a migrated chDB database and
read back exactly; the billing view nets credits; the deadline sweep; retention on the same store."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, Final

import msgspec
import pytest
from clickhouse_connect.driver.client import Client

from infra.pseudonyms import is_pseudonym
from infra.settings import Settings, load_settings
from ocpi.identity import ObjectKey
from pipeline import projection, retention, sweeps
from pipeline.cdrs import process_cdrs
from pipeline.locations import process_locations
from pipeline.projection import CDR_COLUMNS, CDR_TARIFF_COLUMNS, SESSION_COLUMNS
from pipeline.reconcile import CREDIT_LINK_COLUMNS, RECONCILIATION_COLUMNS
from pipeline.records import DeadLetter
from pipeline.sessions import process_sessions
from pipeline.sink import Batch, ClickHouseSink, insert_rows
from pipeline.stage import StageOutput, StageRules
from pipeline.state import CdrState, LocationState, SessionState

from .builders import Harness, cdr, event, evse, iso, location, session, stage_rules, ts

pytestmark = pytest.mark.clickhouse

KEPT = timedelta(days=365)  # the anomalies' retention (OCPI_RETENTION_HISTORY_DAYS)


def with_margin(rules: StageRules, margin: timedelta) -> StageRules:
    """`rules` whose deadlines are due `margin` past them (the send timeout the sweep waits)."""
    return dataclasses.replace(rules, arrival_margin=margin)


def write(client: Client, batch: Batch) -> None:
    import asyncio

    asyncio.run(ClickHouseSink(lambda: client).write(batch))


def test_every_stage_one_row_lands_in_its_table_exactly(client: Client) -> None:
    sessions = Harness(process_sessions, SessionState)
    locations = Harness(process_locations, LocationState)
    cdrs = Harness(process_cdrs, CdrState)
    batches = [
        sessions.run(event("Session", session(kwh="12.3456", cost="3.0864", status="COMPLETED", end=60, updated=60),
                           received=61)).batch,
        locations.run(event("Location", location(evses=[evse("E1"), evse("E2", status="CHARGING")]),
                            received=1)).batch,
        cdrs.run(event("CDR", cdr(kwh="12.3456", cost="3.0864"), received=62)).batch,
    ]
    for batch in batches:
        write(client, batch)
    assert client.query("SELECT session_id, status, kwh, total_cost_excl_vat, token_uid, received_at, version > 0 "
                        "FROM sessions FINAL").result_rows == [
        ("S1", "COMPLETED", Decimal("12.3456"), Decimal("3.0864"), "TOK1", ts(61), True)]
    assert client.query("SELECT evse_uid, status, present, connector_count FROM evses FINAL ORDER BY evse_uid"
                        ).result_rows == [("E1", "AVAILABLE", True, 1), ("E2", "CHARGING", True, 1)]
    assert client.query("SELECT count() FROM connectors FINAL").result_rows == [(2,)]
    assert client.query("SELECT cdr_id, total_energy, total_cost_excl_vat FROM cdrs FINAL").result_rows == [
        ("C1", Decimal("12.3456"), Decimal("3.0864"))]
    assert client.query("SELECT period_index, dimension_types, dimension_volumes FROM cdr_charging_periods FINAL"
                        ).result_rows == [(0, ["ENERGY", "TIME"], [Decimal("12.3456"), Decimal("1.0000")])]
    assert client.query("SELECT module, outcome, count() FROM raw_events FINAL GROUP BY module, outcome ORDER BY 1"
                        ).result_rows == [("CDRS", "APPLIED", 1), ("LOCATIONS", "APPLIED", 1),
                                          ("SESSIONS", "APPLIED", 1)]
    document = json.loads(client.query("SELECT payload_json FROM locations FINAL").result_rows[0][0])
    assert [e["uid"] for e in document["evses"]] == ["E1", "E2"] and document["last_updated"] == iso(ts(0))


NAME = r'Café "Zuid" \ ✓ \u0041 {[,]}'  # quotes, backslashes, an escape's text, non-ASCII, JSON punctuation


def test_json_documents_are_stored_as_their_exact_text(client: Client) -> None:
    """Documents go into rows as JSON objects (`projection.json_column`); the column holds the same bytes: what
    the receivers' GET answers and retention rewrites."""
    h = Harness(process_locations, LocationState)
    body = location(evses=[evse("E1")], name=NAME, directions=[
        {"language": "nl", "text": "Achter de {poort} [links], 50%"}])
    out = h.run(event("Location", body, received=1))
    write(client, out.batch)
    [(stored,)] = client.query("SELECT payload_json FROM locations FINAL").result_rows
    assert stored.encode() == h.state("NL/TNM/LOC1").object_json
    assert json.loads(stored)["name"] == NAME
    [(raw,)] = client.query("SELECT payload_json FROM raw_events FINAL").result_rows
    assert json.loads(raw)["directions"] == [{"language": "nl", "text": "Achter de {poort} [links], 50%"}]


def test_writing_a_batch_twice_changes_no_total(client: Client) -> None:
    cdrs = Harness(process_cdrs, CdrState)
    batch = cdrs.run(event("CDR", cdr("C1", cost="2.50")), event("CDR", cdr("C2", cost="1.25"))).batch
    write(client, batch)
    write(client, batch)
    assert client.query("SELECT count(), sum(cost_excl_vat) FROM billing_lines FINAL").result_rows == [
        (2, Decimal("3.7500"))]
    assert client.query("SELECT count() FROM raw_events FINAL").result_rows == [(2,)]


def test_billing_nets_credit_cdrs_per_partner_location_and_day(client: Client) -> None:
    cdrs = Harness(process_cdrs, CdrState)
    write(client, cdrs.run(event("CDR", cdr("C1", kwh="10", cost="2.50")),
                           event("CDR", cdr("C1-C", kwh="10", cost="-2.50", credit=True, credit_reference="C1")),
                           event("CDR", cdr("C2", kwh="8", cost="2.00", location="LOC2"))).batch)
    assert client.query("SELECT location_id, day, cdrs, credit_cdrs, energy_kwh, cost_excl_vat FROM billing_daily "
                        "ORDER BY location_id").result_rows == [
        ("LOC1", ts(0).date(), 2, 1, Decimal("0.0000"), Decimal("0.0000")),
        ("LOC2", ts(0).date(), 1, 0, Decimal("8.0000"), Decimal("2.0000"))]


def test_home_charging_compensation_cdrs_are_billed_apart_from_charging(client: Client) -> None:
    """A CDR with home_charging_compensation true (and its credit, which carries the flag as its original) is money
    owed to the driver: stored with the flag, and billed in its own billing_daily row, not as charging revenue."""
    cdrs = Harness(process_cdrs, CdrState)
    home = {**cdr("H1", kwh="4", cost="1.00", location="LOC1"), "home_charging_compensation": True}
    home_credit = {**cdr("H1-C", kwh="4", cost="-1.00", credit=True, credit_reference="H1"),
                   "home_charging_compensation": True}
    write(client, cdrs.run(event("CDR", cdr("C1", kwh="10", cost="2.50")), event("CDR", home),
                           event("CDR", {**cdr("H2", kwh="3", cost="0.90"), "home_charging_compensation": True}),
                           event("CDR", home_credit)).batch)
    assert client.query("SELECT cdr_id, home_charging_compensation FROM cdrs FINAL ORDER BY cdr_id").result_rows == [
        ("C1", False), ("H1", True), ("H1-C", True), ("H2", True)]
    assert client.query("SELECT home_charging_compensation, cdrs, credit_cdrs, energy_kwh, cost_excl_vat "
                        "FROM billing_daily ORDER BY home_charging_compensation").result_rows == [
        (False, 1, 0, Decimal("10.0000"), Decimal("2.5000")), (True, 3, 1, Decimal("3.0000"), Decimal("0.9000"))]

def test_cdrs_of_another_emsps_token_are_stored_but_billed_by_no_reader(client: Client) -> None:
    """OCPI_TOKEN_PARTIES names the eMSP parties whose tokens we bill: a CDR of another's token (and its credit, which
    carries the same token) keeps its row and billing line, flagged, and neither the views nor the revenue report nor
    the billing dashboard bill it."""
    from pipeline import reports
    from tests.unit.test_dashboards import ROOT, panel_queries, render_panel_sql

    rules = dataclasses.replace(stage_rules(), token_parties=frozenset({("NL", "EMS")}))
    cdrs = Harness(process_cdrs, CdrState, rules)

    def of_another_emsp(body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "cdr_token": {**body["cdr_token"], "party_id": "XYZ"}}

    write(client, cdrs.run(
        event("CDR", cdr("C1", kwh="10", cost="2.50")),
        event("CDR", of_another_emsp(cdr("X1", kwh="7", cost="1.75"))),
        event("CDR", of_another_emsp(cdr("X1-C", kwh="7", cost="-1.75", credit=True, credit_reference="X1"))),
        event("CDR", of_another_emsp(cdr("X2", kwh="5", cost="1.25", location="LOC2")))).batch)
    assert client.query("SELECT cdr_id, token_of_another_emsp FROM billing_lines FINAL ORDER BY cdr_id"
                        ).result_rows == [("C1", False), ("X1", True), ("X1-C", True), ("X2", True)]
    want = (1, 0, Decimal("10.0000"), Decimal("2.5000"))
    assert client.query("SELECT countIf(NOT credit), countIf(credit), sum(energy_kwh), sum(cost_excl_vat) "
                        "FROM billable_lines").result_rows == [want]
    assert client.query("SELECT location_id, cdrs, energy_kwh FROM billing_daily").result_rows == [
        ("LOC1", 1, Decimal("10.0000"))]
    _columns, rows = reports.run(client, reports.revenue(reports.Period(), by="location"))
    assert [tuple(r)[:8] for r in rows] == [("NL", "TNM", "LOC1", "EUR", *want)]
    panels = dict(panel_queries(ROOT / "dashboards" / "billing.json"))
    now = datetime.now(UTC)
    sql = render_panel_sql(panels["Energy (kWh)"], start=now - timedelta(days=7), end=now + timedelta(days=1),
                           partners=["p1"])
    assert client.query(sql).result_rows == [(Decimal(10),)]


def test_billing_counts_one_credit_per_cdr_in_the_views_the_report_and_the_dashboard(client: Client) -> None:
    """Two credits for C1: the earlier one (C1-A) counts even though it reaches stage 2 last; C1-B's line stays in
    billing_lines but no reader of billing counts it."""
    from pipeline import reports
    from pipeline.agents import party_batch
    from pipeline.reconcile import PartyOutput, PartyState, process_party
    from tests.unit.test_dashboards import ROOT, panel_queries, render_panel_sql

    from .builders import DictStore
    from .test_reconcile import RULES

    cdrs, store = Harness(process_cdrs, CdrState), DictStore()
    bodies = {"C1": cdr("C1", kwh="10", cost="2.50"), "C2": cdr("C2", kwh="8", cost="2.00"),
              "C1-A": cdr("C1-A", kwh="10", cost="-2.50", credit=True, credit_reference="C1"),
              "C1-B": cdr("C1-B", kwh="10", cost="-2.00", credit=True, credit_reference="C1")}
    received = {"C1": 0, "C1-A": 1, "C1-B": 2, "C2": 3}
    for cdr_id in ("C1", "C1-B", "C1-A", "C2"):  # stage 2 sees C1-B before the earlier C1-A
        out = cdrs.run(event("CDR", bodies[cdr_id], received=received[cdr_id]))
        write(client, out.batch)
        party = PartyOutput()
        overlay = store.overlay()
        process_party(PartyState("NL/TNM", overlay), out.facts["NL/TNM"], RULES, party)
        store.commit(overlay)
        write(client, party_batch(party, []))
    assert client.query("SELECT credit_cdr_id, status FROM credit_links FINAL ORDER BY 1").result_rows == [
        ("C1-A", "LINKED"), ("C1-B", "DUPLICATE_CREDIT")]
    assert client.query("SELECT count(), sum(cost_excl_vat) FROM billing_lines FINAL").result_rows == [
        (4, Decimal("0.0000"))]  # every CDR has its line; C1-B's would net C1 twice
    want = (2, 1, Decimal("8.0000"), Decimal("2.0000"))
    assert client.query("SELECT countIf(NOT credit), countIf(credit), sum(energy_kwh), sum(cost_excl_vat) "
                        "FROM billable_lines").result_rows == [want]
    assert client.query("SELECT sum(cdrs) - sum(credit_cdrs), sum(credit_cdrs), sum(energy_kwh), sum(cost_excl_vat) "
                        "FROM billing_daily").result_rows == [want]
    _columns, rows = reports.run(client, reports.revenue(reports.Period(), by="location"))
    assert [tuple(r) for r in rows] == [("NL", "TNM", "LOC1", "EUR", *want, Decimal("2.4200"), 0, "CHARGING")]
    panels = dict(panel_queries(ROOT / "dashboards" / "billing.json"))
    now = datetime.now(UTC)
    for title, values in (("Revenue per currency", ("EUR", Decimal("2.0000"))), ("Energy (kWh)", (Decimal(8),)),
                          ("CDRs", (2, 1)), ("Per CPO party", ("NL", "TNM", "EUR", *want, Decimal("2.4200"), 0)),
                          ("Per location", ("NL", "TNM", "LOC1", "EUR", 2, Decimal(8), Decimal(2)))):
        sql = render_panel_sql(panels[title], start=now - timedelta(days=7), end=now + timedelta(days=1),
                               partners=["p1"])
        assert client.query(sql).result_rows == [values], title


def test_a_credit_of_a_credit_is_left_out_of_billing(client: Client) -> None:
    from pipeline.agents import party_batch
    from pipeline.reconcile import PartyOutput, PartyState, process_party

    from .builders import DictStore
    from .test_reconcile import RULES

    cdrs, store = Harness(process_cdrs, CdrState), DictStore()
    bodies = [cdr("A", kwh="10", cost="2.50"), cdr("A-C", kwh="10", cost="-2.50", credit=True, credit_reference="A"),
              cdr("A-C-C", kwh="10", cost="-2.50", credit=True, credit_reference="A-C")]
    for received, body in enumerate(bodies):
        out = cdrs.run(event("CDR", body, received=received))
        write(client, out.batch)
        party, overlay = PartyOutput(), store.overlay()
        process_party(PartyState("NL/TNM", overlay), out.facts["NL/TNM"], RULES, party)
        store.commit(overlay)
        write(client, party_batch(party, []))
    assert client.query("SELECT credit_cdr_id, status FROM credit_links FINAL ORDER BY 1").result_rows == [
        ("A-C", "LINKED"), ("A-C-C", "CREDIT_OF_CREDIT")]
    assert client.query("SELECT count(), sum(cost_excl_vat) FROM billable_lines").result_rows == [
        (2, Decimal("0.0000"))]  # A and its credit; A-C-C would refund A twice
    assert client.query("SELECT sum(cost_excl_vat) FROM billing_daily").result_rows == [(Decimal("0.0000"),)]


def test_a_duplicate_credit_leaves_out_no_credit_of_another_party(client: Client) -> None:
    """CiStrings may hold `/` (a party id too: `ocpi.identity.owner_key_part`), and billable_lines looked the lines
    of duplicate credits up by `CC/PID/ID` joined with `/`: NL/T/M's duplicate credit D and NL/T's credit M/D are
    both `NL/T/M/D`, so NL/T's credit was left out too, and NL/T billed its CDR O as if never credited."""
    from pipeline.agents import party_batch
    from pipeline.reconcile import PartyOutput, PartyState, process_party

    from .builders import DictStore
    from .test_reconcile import RULES

    cdrs, store = Harness(process_cdrs, CdrState), DictStore()
    pushes = [("T/M", cdr("O", kwh="10", cost="2.50", pid="T/M")),
              ("T/M", cdr("C", kwh="10", cost="-2.50", credit=True, credit_reference="O", pid="T/M")),
              ("T/M", cdr("D", kwh="10", cost="-2.50", credit=True, credit_reference="O", pid="T/M")),
              ("T", cdr("O", kwh="8", cost="2.00", pid="T")),
              ("T", cdr("M/D", kwh="8", cost="-2.00", credit=True, credit_reference="O", pid="T"))]
    for received, (pid, body) in enumerate(pushes):
        out = cdrs.run(event("CDR", body, received=received, pid=pid))
        write(client, out.batch)
        for party, facts in out.facts.items():
            result, overlay = PartyOutput(), store.overlay()
            process_party(PartyState(party, overlay), facts, RULES, result)
            store.commit(overlay)
            write(client, party_batch(result, []))
    assert client.query("SELECT party_id, credit_cdr_id, status FROM credit_links FINAL ORDER BY 1, 2").result_rows == [
        ("T", "M/D", "LINKED"), ("T/M", "C", "LINKED"), ("T/M", "D", "DUPLICATE_CREDIT")]
    assert client.query("SELECT party_id, cdr_id, cost_excl_vat FROM billable_lines ORDER BY 1, 2").result_rows == [
        ("T", "M/D", Decimal("-2.0000")), ("T", "O", Decimal("2.0000")),
        ("T/M", "C", Decimal("-2.5000")), ("T/M", "O", Decimal("2.5000"))]
    assert client.query("SELECT party_id, sum(cdrs), sum(cost_excl_vat) FROM billing_daily GROUP BY 1 ORDER BY 1"
                        ).result_rows == [("T", 2, Decimal("0.0000")), ("T/M", 2, Decimal("0.0000"))]


def test_reconciliation_sums_and_deltas_beyond_one_amount_are_stored_exactly(client: Client) -> None:
    """OCPI amounts go up to 10^14 with either sign: a session's total of two CDRs, or a CDR minus a negative session
    amount, does not fit Decimal(18, 4). Such a row refused by ClickHouse would stop stage 2 (the sink retries the
    batch forever)."""
    from pipeline.agents import party_batch
    from pipeline.sink import insert_rows

    from .test_reconcile import Party, c_fact, completed, s_fact

    out = Party().run(s_fact(completed("S1", kwh="-90000000000000", cost="-80000000000000"), final=61),
                      c_fact(cdr("C1", kwh="60000000000000.0001", cost="60000000000000.0001"), received=1),
                      c_fact(cdr("C2", kwh="60000000000000", cost="60000000000000"), received=2))
    batch = party_batch(out, [])
    for table, rows in batch.tables().items():
        insert_rows(client, table, batch.columns[table], rows)  # once, so that a refused row fails the test
    assert client.query("SELECT subject_id, cdr_kwh, delta_kwh, cdr_cost_excl_vat, delta_cost_excl_vat "
                        "FROM reconciliation FINAL ORDER BY subject, subject_id").result_rows == [
        ("C1", Decimal("60000000000000.0001"), Decimal("150000000000000.0001"), Decimal("60000000000000.0001"),
         Decimal("140000000000000.0001")),
        ("C2", Decimal("60000000000000"), Decimal("150000000000000"), Decimal("60000000000000"),
         Decimal("140000000000000")),
        ("S1", Decimal("120000000000000.0001"), Decimal("210000000000000.0001"), Decimal("120000000000000.0001"),
         Decimal("200000000000000.0001"))]


def test_revenue_incl_vat_sums_what_cdrs_give_and_counts_the_others_in_every_reader(client: Client) -> None:
    # incl_vat is optional (02 §9.3): a CDR without it is neither VAT-free nor guessed; every reader agrees.
    from pipeline import reports
    from tests.unit.test_dashboards import ROOT, panel_queries, render_panel_sql

    without = cdr("C2", kwh="8", cost="2.00")
    del without["total_cost"]["incl_vat"]
    cdrs = Harness(process_cdrs, CdrState)
    write(client, cdrs.run(event("CDR", cdr("C1", kwh="10", cost="2.50"), received=0),
                           event("CDR", without, received=1)).batch)
    _columns, rows = reports.run(client, reports.revenue(reports.Period()))
    assert [tuple(r[-4:-1]) for r in rows] == [(Decimal("4.5000"), Decimal("3.0250"), 1)]  # the last: kind
    assert client.query("SELECT sum(cost_excl_vat), sum(cost_incl_vat), sum(lines_without_incl_vat) "
                        "FROM billing_daily").result_rows == [(Decimal("4.5000"), Decimal("3.0250"), 1)]
    now = datetime.now(UTC)
    sql = render_panel_sql(dict(panel_queries(ROOT / "dashboards" / "billing.json"))["Per CPO party"],
                           start=now - timedelta(days=7), end=now + timedelta(days=1), partners=["p1"])
    assert [tuple(r[-3:]) for r in client.query(sql).result_rows] == [(Decimal("4.5000"), Decimal("3.0250"), 1)]


def test_ci_string_references_are_stored_upper_cased_so_billing_and_joins_see_one_value(client: Client) -> None:
    """A CPO may send one location as 'loc-1', 'LOC-1' and 'Loc-1' (CiString); payload_json keeps what it sent."""
    def located(body: dict[str, Any], evse_uid: str, connector_id: str) -> dict[str, Any]:
        body["cdr_location"] |= {"evse_uid": evse_uid, "connector_id": connector_id}
        return body

    sessions, cdrs = Harness(process_sessions, SessionState), Harness(process_cdrs, CdrState)
    s1 = session("s-1", status="COMPLETED", end=60, updated=60, kwh="10", cost="2.50", location="loc-1")
    s1 |= {"evse_uid": "e-1", "connector_id": "c1"}
    write(client, sessions.run(event("Session", s1, received=61)).batch)
    write(client, cdrs.run(
        event("CDR", located(cdr("C1", session_id="s-1", kwh="10", cost="2.50", location="loc-1"), "e-1", "c1")),
        event("CDR", cdr("C2", session_id="S-2", kwh="8", cost="2.00", location="LOC-1")),
        event("CDR", cdr("c2-c", session_id="s-2", kwh="8", cost="-2.00", location="Loc-1", credit=True,
                         credit_reference="c2"))).batch)
    assert client.query("SELECT location_id, cdrs, energy_kwh, cost_excl_vat FROM billing_daily").result_rows == [
        ("LOC-1", 3, Decimal("10.0000"), Decimal("2.5000"))]
    assert client.query("SELECT cdr_id, session_id, location_id, evse_uid, connector_id, credit_reference_id "
                        "FROM cdrs FINAL ORDER BY cdr_id").result_rows == [
        ("C1", "S-1", "LOC-1", "E-1", "C1", None), ("C2", "S-2", "LOC-1", "E1", "1", None),
        ("C2-C", "S-2", "LOC-1", "E1", "1", "C2")]
    assert client.query("SELECT location_id, evse_uid, connector_id FROM sessions FINAL").result_rows == [
        ("LOC-1", "E-1", "C1")]
    assert client.query("SELECT s.session_id FROM cdrs AS c FINAL INNER JOIN sessions AS s FINAL "
                        "ON c.session_id = s.session_id").result_rows == [("S-1",)]
    [(document,)] = client.query("SELECT payload_json FROM cdrs FINAL WHERE cdr_id = 'C2-C'").result_rows
    assert (json.loads(document)["cdr_location"]["id"], json.loads(document)["credit_reference_id"]) == (
        "Loc-1", "c2")


def readme_rewrite_statements() -> list[str]:
    """The in-place rewrite of CiString references that docs/upgrading.md gives for rows written before they were
    upper-cased ("Data written by earlier versions")."""
    from infra.clickhouse.migrations import Migration
    from tests.unit.test_docs import DOCS

    doc = DOCS["docs/upgrading.md"]
    block = doc.split("<!-- ci-references-rewrite:start -->")[1].split("<!-- ci-references-rewrite:end -->")[0]
    sql = block.strip().removeprefix("```sql").removesuffix("```")
    return Migration(0, "readme", sql).statements()


def test_the_readme_rewrite_upper_cases_old_references_and_changes_no_total(client: Client) -> None:
    cdrs, sessions = Harness(process_cdrs, CdrState), Harness(process_sessions, SessionState)
    old = cdrs.run(event("CDR", cdr("C1", session_id="s-1", kwh="10", cost="2.50", location="loc-1")),
                   event("CDR", cdr("C1-C", session_id="s-1", kwh="10", cost="-2.50", location="loc-1",
                                    credit=True, credit_reference="c1")),
                   event("CDR", cdr("C2", session_id="S-2", kwh="8", cost="2.00", location="Loc-1"))).batch
    as_sent = {"C1": {"session_id": "s-1", "location_id": "loc-1", "evse_uid": "e1"},
               "C1-C": {"session_id": "s-1", "location_id": "loc-1", "evse_uid": "e1", "credit_reference_id": "c1"},
               "C2": {"location_id": "Loc-1"}}
    for row in old.tables()["cdrs"]:  # the rows as the version before wrote them: references as sent
        for name, value in as_sent[row[CDR_COLUMNS.index("cdr_id")]].items():
            row[CDR_COLUMNS.index(name)] = value
    s1 = sessions.run(event("Session", session("S-1", status="COMPLETED", end=60, updated=60, kwh="10",
                                               location="loc-1"), received=61)).batch
    for row in s1.tables()["sessions"]:
        row[SESSION_COLUMNS.index("location_id")] = "loc-1"
    write(client, old)
    write(client, s1)
    totals = "SELECT count(), sum(energy_kwh), sum(cost_excl_vat) FROM billable_lines"
    before = client.query(totals).result_rows
    assert len(client.query("SELECT location_id FROM billing_daily").result_rows) == 2  # 'loc-1', 'Loc-1'

    for statement in readme_rewrite_statements():
        client.command(statement)
    assert client.query(totals).result_rows == before == [(3, Decimal("8.0000"), Decimal("2.0000"))]
    assert client.query("SELECT location_id, cdrs FROM billing_daily").result_rows == [("LOC-1", 3)]
    assert client.query("SELECT cdr_id, session_id, location_id, evse_uid, credit_reference_id FROM cdrs FINAL "
                        "ORDER BY cdr_id").result_rows == [("C1", "S-1", "LOC-1", "E1", None),
                                                           ("C1-C", "S-1", "LOC-1", "E1", "C1"),
                                                           ("C2", "S-2", "LOC-1", "E1", None)]
    assert client.query("SELECT location_id FROM sessions FINAL").result_rows == [("LOC-1",)]
    # What README warns about: a CDR written again under today's rules (reprocessing under a new app id, whose
    # stage-1 state is new) would have made a second line before the rewrite; now it changes nothing.
    again = Harness(process_cdrs, CdrState).run(event("CDR", cdr("C1", session_id="s-1", kwh="10", cost="2.50",
                                                                 location="loc-1")))
    assert [r[CDR_COLUMNS.index("location_id")] for r in again.batch.tables()["cdrs"]] == ["LOC-1"]
    write(client, again.batch)
    assert client.query(totals).result_rows == before


def _settings(**env: str) -> Settings:
    return load_settings({"OCPI_PSEUDONYM_KEY": "x" * 32, **env})


def test_the_readme_query_lists_the_credit_links_written_before_that_no_longer_negate(client: Client) -> None:
    """docs/upgrading.md, "Data written by earlier versions", credit amounts: links written before compared the amounts
    excl. VAT alone and kept `amount_matches` true for a credit in another currency or whose incl. VAT does not negate
    its original's (`reconcile.negates` says false for both today); the query given there must list them all."""
    [query] = [q for q in _readme_credit_link_queries() if "total_cost_incl_vat" in q]
    out = Harness(process_cdrs, CdrState).run(
        event("CDR", cdr("C1", cost="2.50")), event("CDR", _credit("C1-C", "C1", "-2.50", currency="USD")),
        event("CDR", cdr("C2", cost="2.00")),
        event("CDR", _credit("C2-C", "C2", "-2.00", total_cost={"excl_vat": Decimal("-2.00"),
                                                              "incl_vat": Decimal("-2.00")})),
        event("CDR", cdr("C3", cost="3.00")), event("CDR", _credit("C3-C", "C3", "-3.00")))
    batch = out.batch
    for credit_id, original_id, cost in (("C1-C", "C1", "2.50"), ("C2-C", "C2", "2.00"), ("C3-C", "C3", "3.00")):
        batch.add("credit_links", CREDIT_LINK_COLUMNS, [  # as the version before wrote them: excl. VAT compared
            "NL", "TNM", credit_id, original_id, "p1", "LINKED", -Decimal(cost), Decimal(cost), True, ts(1),
            ts(3601), 2])
    write(client, batch)
    assert sorted(client.query(query).result_rows) == [("C1-C",), ("C2-C",)]


def test_the_readme_query_lists_the_credit_links_written_before_whose_energy_is_not_the_originals(
        client: Client) -> None:
    """docs/upgrading.md, "Data written by earlier versions", credit energy: links written before did not compare energy
    and kept `amount_matches` true for a credit of another energy (`reconcile.negates` says false today, for either sign
    of it); the query given there must list those, and not a credit whose energy is the original's negated."""
    [query] = [q for q in _readme_credit_link_queries() if "total_energy" in q]
    out = Harness(process_cdrs, CdrState).run(
        event("CDR", cdr("C1", kwh="10")), event("CDR", _credit("C1-C", "C1", "-2.50", total_energy=Decimal("8"))),
        event("CDR", cdr("C2", kwh="10")), event("CDR", _credit("C2-C", "C2", "-2.50", total_energy=Decimal("-12"))),
        event("CDR", cdr("C3", kwh="10")), event("CDR", _credit("C3-C", "C3", "-2.50", total_energy=Decimal("-10"))),
        event("CDR", cdr("C4", kwh="10")), event("CDR", _credit("C4-C", "C4", "-2.50")))
    batch = out.batch
    for credit_id, original_id in (("C1-C", "C1"), ("C2-C", "C2"), ("C3-C", "C3"), ("C4-C", "C4")):
        batch.add("credit_links", CREDIT_LINK_COLUMNS, [  # as the version before wrote them: energy not compared
            "NL", "TNM", credit_id, original_id, "p1", "LINKED", Decimal("-2.50"), Decimal("2.50"), True, ts(1),
            ts(3601), 2])
    write(client, batch)
    assert sorted(client.query(query).result_rows) == [("C1-C",), ("C2-C",)]


def _readme_credit_link_queries() -> list[str]:
    import re

    from tests.unit.test_docs import DOCS

    return re.findall(r"`(SELECT l\.credit_cdr_id .*?)`", DOCS["docs/upgrading.md"], re.DOTALL)


def _credit(cid: str, ref: str, cost: str, **changes: Any) -> dict[str, Any]:
    return {**cdr(cid, cost=cost, credit=True, credit_reference=ref), **changes}


def bare_sweeper(sink: Any, rules: StageRules, publish: Any) -> tuple[sweeps.Sweeper, SimpleNamespace]:
    """A Sweeper over `sink` (`run_sync`, `write`) and `publish`, its whole group caught up, without the retention
    pass; and its context, to change the sink under it."""

    class CaughtUp:  # the whole group has read everything
        async def caught_up(self, assigned: Any, done: Any) -> bool:
            return True

    context = SimpleNamespace(
        progress=SimpleNamespace(done={}), app=SimpleNamespace(consumer=SimpleNamespace(assignment=lambda: [])),
        sink=sink, stage_rules=rules, publish=publish,
        settings=SimpleNamespace(kafka=SimpleNamespace(send_timeout_s=10), retention=SimpleNamespace(history_days=365),
                                 pipeline=SimpleNamespace(topic_reconciliation="reconciliation")))
    sweeper = sweeps.Sweeper(context, CaughtUp())  # type: ignore[arg-type]

    async def no_retention(now: datetime) -> None:
        return None

    sweeper.retention = no_retention  # type: ignore[method-assign]
    return sweeper, context


def test_the_sweep_promotes_what_is_overdue_and_only_that(client: Client) -> None:
    rules = stage_rules(park_ttl_min=5, idle_min=60)
    sessions = Harness(process_sessions, SessionState, rules)
    parked = event("SessionPatch", {"kwh": Decimal(1), "last_updated": iso(ts(30))}, object_id="S9",
                   received=0)
    write(client, sessions.run(parked, event("Session", session("S2", status="ACTIVE"), received=0),
                               event("Session", session("S3", status="ACTIVE"), received=50)).batch)
    recon = Batch()
    base = dict.fromkeys(RECONCILIATION_COLUMNS)
    for subject, sid, outcome, due in (("SESSION", "S5", "AWAITING_CDR", ts(30)), ("CDR", "C5", "AWAITING_SESSION",
                                        ts(100)), ("CDR", "C6", "MATCHED", None)):
        row = {**base, "country_code": "NL", "party_id": "TNM", "subject": subject, "subject_id": sid,
               "partner_id": "p1", "currency": "EUR", "outcome": outcome, "method": "", "cdr_ids": [], "late": False,
               "due_at": due,
               "event_time": ts(0), "version": 4}
        recon.add("reconciliation", RECONCILIATION_COLUMNS, [row[c] for c in RECONCILIATION_COLUMNS])
    link = dict(zip(CREDIT_LINK_COLUMNS, ["NL", "TNM", "C7-C", "C7", "p1", "AWAITING_ORIGINAL", Decimal("-1"), None,
                                          None, ts(0), ts(10), 2], strict=True))
    recon.add("credit_links", CREDIT_LINK_COLUMNS, list(link.values()))
    write(client, recon)

    batch, promoted = sweeps.collect(client, ts(70), with_margin(rules, timedelta(seconds=10)), anomalies_kept=KEPT)
    write(client, batch)
    assert client.query("SELECT event_id, outcome FROM raw_events FINAL WHERE outcome IN ('PARKED', 'ORPHANED')"
                        ).result_rows == [(parked.event_id, "ORPHANED")]
    assert sorted(client.query("SELECT kind, object_id FROM anomalies FINAL").result_rows) == [
        ("CREDIT_UNKNOWN_REFERENCE", "C7-C"), ("ORPHAN_EVENT", "S9"), ("SESSION_IDLE", "S2")]
    # The same words as when a later event of the session ends the wait (test_sessions).
    assert client.query("SELECT outcome_detail FROM raw_events FINAL WHERE outcome = 'ORPHANED'").result_rows == [
        ("its Session PUT did not arrive within 0:05:00",)]
    assert client.query("SELECT detail FROM anomalies FINAL WHERE kind = 'ORPHAN_EVENT'").result_rows == [
        ("waited 0:05:00 for its Session PUT",)]
    outcome = RECONCILIATION_COLUMNS.index("outcome")
    assert [(r[3], r[outcome]) for r in promoted] == [("S5", "MISSING_CDR")]
    assert client.query("SELECT subject_id, outcome, version FROM reconciliation FINAL ORDER BY subject_id"
                        ).result_rows == [("C5", "AWAITING_SESSION", 4), ("C6", "MATCHED", 4),
                                          ("S5", "MISSING_CDR", 5)]
    # version + 1: the promoted row replaces the AWAITING one, and the next real change replaces it
    assert client.query("SELECT status, version FROM credit_links FINAL").result_rows == [("UNKNOWN_REFERENCE", 3)]
    again, promoted_again = sweeps.collect(client, ts(70), with_margin(rules, timedelta(seconds=10)),
                                           anomalies_kept=KEPT)
    assert promoted_again == [] and again.tables().get("anomalies", []) == []  # nothing new is due


def test_an_open_session_idle_beyond_the_anomalies_retention_does_not_hold_the_idle_sweep_back(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # A session left ACTIVE for more than a year (CPOs leave some open for good): its flag is past the anomalies'
    # TTL, which ClickHouse applies as the row is inserted. Selected again at every sweep, such sessions filled its
    # limit, and a session that had just gone idle was never flagged.
    rules = stage_rules(idle_min=60)
    sessions = Harness(process_sessions, SessionState, rules)
    write(client, sessions.run(event("Session", session("A1", status="ACTIVE"), received=-400 * 24 * 60),
                               event("Session", session("B2", status="ACTIVE"), received=0)).batch)
    monkeypatch.setattr(sweeps, "_LIMIT", 1)
    flagged = []
    for _ in range(3):
        batch, _ = sweeps.collect(client, ts(24 * 60), with_margin(rules, timedelta(seconds=10)), anomalies_kept=KEPT)
        flagged += [row[4] for row in batch.tables().get("anomalies", [])]
        write(client, batch)
    assert flagged == ["B2"]
    assert client.query("SELECT object_id FROM anomalies FINAL WHERE kind = 'SESSION_IDLE'").result_rows == [("B2",)]


def test_the_idle_sweep_counts_from_the_last_applied_push_not_a_duplicate(client: Client) -> None:
    # README, "session lifecycle": a DUPLICATE (the same content re-sent with a newer last_updated, a sign of life)
    # does not restart the idle clock; the sweep flags the gap from the applied push, as the next update would.
    rules = stage_rules(idle_min=60)
    sessions = Harness(process_sessions, SessionState, rules)
    first = event("Session", session("S4", status="ACTIVE", kwh="5"), received=0)
    again = event("Session", session("S4", status="ACTIVE", kwh="5", updated=50), received=50)
    out = sessions.run(first, again)
    write(client, out.batch)
    batch, _ = sweeps.collect(client, ts(70), with_margin(rules, timedelta(seconds=10)), anomalies_kept=KEPT)
    assert [(row[0], row[4], row[6], row[9]) for row in batch.tables()["anomalies"]] == [
        ("SESSION_IDLE", "S4", first.event_id, ts(60))]


def test_the_sweep_writes_the_anomaly_rows_the_event_time_rules_write_for_the_same_deadline(client: Client) -> None:
    # The sweep and a later event of the object end the same wait: both must write one and the same row (the
    # module docstring of `pipeline.sweeps`), ids as sent in any case, a PENDING session as well as an ACTIVE one.
    rules = stage_rules(park_ttl_min=5, idle_min=60)
    pending = event("Session", session("s-low", status="PENDING"), received=0, cc="nl", pid="tnm")
    parked_session = event("SessionPatch", {"kwh": Decimal(1), "last_updated": iso(ts(1))}, object_id="s9x",
                           received=0, cc="nl", pid="tnm")
    parked_evse = event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(1))}, object_id="loc9",
                        evse_uid="e1", received=0, cc="nl", pid="tnm")
    sessions, locations = Harness(process_sessions, SessionState, rules), Harness(process_locations, LocationState,
                                                                                  rules)
    write(client, sessions.run(pending, parked_session).batch)
    write(client, locations.run(parked_evse).batch)
    assert sorted(client.query("SELECT outcome FROM raw_events FINAL").result_rows) == [
        ("APPLIED",), ("PARKED",), ("PARKED",)]

    swept, _ = sweeps.collect(client, ts(24 * 60), with_margin(rules, timedelta(seconds=10)), anomalies_kept=KEPT)
    # The event-time rules, on later events of the same objects.
    later = sessions.run(event("Session", session("s-low", status="ACTIVE", updated=120), received=120, cc="nl",
                               pid="tnm"),
                         event("Session", session("s9x", updated=10), received=10, cc="nl", pid="tnm")).batch
    later_location = locations.run(event("Location", location("loc9", updated=10), received=10, cc="nl",
                                         pid="tnm")).batch
    in_time = [row for batch in (later, later_location) for row in batch.tables().get("anomalies", [])
               if row[0] in ("SESSION_IDLE", "ORPHAN_EVENT")]
    assert len(in_time) == 3
    assert sorted(map(tuple, swept.tables()["anomalies"])) == sorted(map(tuple, in_time))


def write_awaiting_row(client: Client) -> None:
    """Session NL/TNM/S5's reconciliation row AWAITING_CDR, due at ts(30): a sweep past that publishes it."""
    row = {**dict.fromkeys(RECONCILIATION_COLUMNS), "country_code": "NL", "party_id": "TNM", "subject": "SESSION",
           "subject_id": "S5", "partner_id": "p1", "outcome": "AWAITING_CDR", "method": "", "cdr_ids": [],
           "late": False, "due_at": ts(30), "event_time": ts(0), "version": 4}
    awaiting = Batch()
    awaiting.add("reconciliation", RECONCILIATION_COLUMNS, [row[c] for c in RECONCILIATION_COLUMNS])
    write(client, awaiting)


def test_the_sweep_leaves_a_deadline_until_the_margin_past_it_is_over(client: Client) -> None:
    # An event stamped before a deadline reaches Kafka within the send timeout (the margin): until the margin is
    # over, the awaited event may still come, so nothing is promoted.
    rules = stage_rules(park_ttl_min=60, idle_min=60)
    sessions = Harness(process_sessions, SessionState, rules)
    write(client, sessions.run(
        event("SessionPatch", {"kwh": Decimal(1), "last_updated": iso(ts(1))}, object_id="S9", received=0),
        event("Session", session("S2", status="ACTIVE"), received=0)).batch)
    due = Batch()
    base = dict.fromkeys(RECONCILIATION_COLUMNS)
    row = {**base, "country_code": "NL", "party_id": "TNM", "subject": "SESSION", "subject_id": "S5",
           "partner_id": "p1", "currency": "EUR", "outcome": "AWAITING_CDR", "method": "", "cdr_ids": [],
           "late": False, "due_at": ts(60), "event_time": ts(0), "version": 4}
    due.add("reconciliation", RECONCILIATION_COLUMNS, [row[c] for c in RECONCILIATION_COLUMNS])
    due.add("credit_links", CREDIT_LINK_COLUMNS, ["NL", "TNM", "C7-C", "C7", "p1", "AWAITING_ORIGINAL",
                                                  Decimal("-1"), None, None, ts(0), ts(60), 2])
    write(client, due)
    margin = timedelta(seconds=10)
    early, promoted = sweeps.collect(client, ts(60) + timedelta(seconds=5), with_margin(rules, margin),
                                     anomalies_kept=KEPT)
    assert len(early) == 0 and promoted == []
    late, promoted = sweeps.collect(client, ts(60) + timedelta(seconds=11), with_margin(rules, margin),
                                    anomalies_kept=KEPT)
    tables = late.tables()
    assert sorted(row[0] for row in tables["anomalies"]) == ["CREDIT_UNKNOWN_REFERENCE", "ORPHAN_EVENT",
                                                             "SESSION_IDLE"]
    assert [r[3] for r in promoted] == ["S5"] and len(tables["raw_events"]) == len(tables["credit_links"]) == 1


def test_a_sweep_killed_between_publish_and_insert_promotes_and_publishes_again(client: Client) -> None:
    # A sweep has no Kafka offset to resume from: it publishes first, so a kill leaves the rows unwritten and the
    # next sweep does it all again, instead of rows written and their records never published.
    import asyncio

    class Killed(BaseException):
        pass

    write_awaiting_row(client)
    sink = ClickHouseSink(lambda: client)
    published: list[Any] = []
    kill = [True]

    async def publish(topic: str, records: list[Any]) -> None:
        if kill[0] and records:
            raise Killed
        published.extend(records)

    async def killed_write(batch: Batch) -> None:
        raise Killed

    sweeper, context = bare_sweeper(sink, stage_rules(), publish)
    with pytest.raises(Killed):  # killed while publishing: nothing written
        asyncio.run(sweeper.run(ts(70)))
    assert client.query("SELECT outcome FROM reconciliation FINAL").result_rows == [("AWAITING_CDR",)]
    kill[0] = False
    context.sink = SimpleNamespace(run_sync=sink.run_sync, write=killed_write)
    with pytest.raises(Killed):  # published, then killed before the insert
        asyncio.run(sweeper.run(ts(71)))
    context.sink = sink
    asyncio.run(sweeper.run(ts(72)))  # the restarted worker's sweep: the same row again, and written this time
    assert [record[0] for record in published] == [b"NL/TNM/SESSION/S5"] * 2
    assert client.query("SELECT outcome, version FROM reconciliation FINAL").result_rows == [("MISSING_CDR", 5)]


def test_a_sweep_killed_after_some_of_its_inserts_writes_the_anomalies_at_the_next(client: Client) -> None:
    # A sweep's tables are inserted side by side (`ClickHouseSink`): a kill can leave the ORPHANED raw event or the
    # UNKNOWN_REFERENCE credit link written and not their anomalies. The next sweep selects only what is still
    # PARKED or AWAITING_ORIGINAL, so it would never write those anomalies.
    import asyncio

    class Killed(BaseException):
        pass

    rules = stage_rules(park_ttl_min=5)
    sessions = Harness(process_sessions, SessionState, rules)
    parked = event("SessionPatch", {"kwh": Decimal(1), "last_updated": iso(ts(30))}, object_id="S9", received=0)
    write(client, sessions.run(parked).batch)
    links = Batch()
    links.add("credit_links", CREDIT_LINK_COLUMNS, ["NL", "TNM", "C7-C", "C7", "p1", "AWAITING_ORIGINAL",
                                                    Decimal("-1"), None, None, ts(0), ts(10), 2])
    write(client, links)
    sink = ClickHouseSink(lambda: client)

    async def publish(topic: str, records: list[Any]) -> None:
        pass

    async def all_but_anomalies(batch: Batch) -> None:  # every other insert went in, then the kill
        for table, rows in batch.tables().items():
            if table != "anomalies" and rows:
                insert_rows(client, table, batch.columns[table], rows)
        raise Killed

    sweeper, context = bare_sweeper(SimpleNamespace(run_sync=sink.run_sync, write=all_but_anomalies), rules, publish)
    with pytest.raises(Killed):
        asyncio.run(sweeper.run(ts(70)))
    context.sink = sink
    asyncio.run(sweeper.run(ts(71)))  # the restarted worker's sweep
    assert client.query("SELECT outcome FROM raw_events FINAL").result_rows == [("ORPHANED",)]
    assert client.query("SELECT status FROM credit_links FINAL").result_rows == [("UNKNOWN_REFERENCE",)]
    assert sorted(client.query("SELECT kind, object_id FROM anomalies FINAL").result_rows) == [
        ("CREDIT_UNKNOWN_REFERENCE", "C7-C"), ("ORPHAN_EVENT", "S9")]


def test_a_newer_row_published_while_the_sweep_promotes_stays_the_last_record_of_its_key(client: Client) -> None:
    # The sweep selects an AWAITING row, then publishes its promotion. Should stage 2 (this worker's or another's)
    # write and publish a newer row of the subject in between (a CDR that came after the deadline), the sweep's
    # older, lower-version record would be the last of the key, which the topic's readers take for the current
    # outcome, while the table holds the newer row. The sweep publishes the current row again after its own.
    import asyncio

    from pipeline.agents import reconciliation_records

    base = dict.fromkeys(RECONCILIATION_COLUMNS)
    row = {**base, "country_code": "NL", "party_id": "TNM", "subject": "SESSION", "subject_id": "S5",
           "partner_id": "p1", "currency": "EUR", "outcome": "AWAITING_CDR", "method": "", "cdr_ids": [],
           "late": False, "due_at": ts(30), "event_time": ts(0), "version": 4}
    awaiting = Batch()
    awaiting.add("reconciliation", RECONCILIATION_COLUMNS, [row[c] for c in RECONCILIATION_COLUMNS])
    write(client, awaiting)
    matched = {**row, "outcome": "MATCHED", "method": "SESSION_ID", "cdr_ids": ["C5"], "late": True,
               "due_at": None, "event_time": ts(65), "version": 10}
    sink = ClickHouseSink(lambda: client)
    published: list[tuple[bytes, bytes]] = []

    async def publish(topic: str, records: list[tuple[bytes, bytes]]) -> None:
        published.extend(records)

    def run_sync(work: Any) -> Any:
        result = sink.run_sync(work)
        if not published:  # stage 2, right after the sweep's select: its row written, then published
            newer = Batch()
            newer.add("reconciliation", RECONCILIATION_COLUMNS, [matched[c] for c in RECONCILIATION_COLUMNS])
            write(client, newer)
            published.extend(reconciliation_records([[matched[c] for c in RECONCILIATION_COLUMNS]]))
        return result

    sweeper, _context = bare_sweeper(SimpleNamespace(run_sync=run_sync, write=sink.write), stage_rules(), publish)
    asyncio.run(sweeper.run(ts(70)))
    assert client.query("SELECT outcome, version FROM reconciliation FINAL").result_rows == [("MATCHED", 10)]
    records = [json.loads(value) for key, value in published if key == b"NL/TNM/SESSION/S5"]
    # stage 2's record, the sweep's (older: it loses in the table), then the current row again
    assert [(r["outcome"], r["version"]) for r in records] == [("MATCHED", 10), ("MISSING_CDR", 5), ("MATCHED", 10)]


def test_ttls_follow_the_settings(client: Client) -> None:
    database = client.database
    defaults = [ttl for data_class in retention.policy(_settings()) for ttl in data_class.ttls]
    # The migrations set the defaults, in the 32-bit form (harmless at those ages); the first apply rewrites it.
    current = retention.current_ttls(client, database)
    assert [current[t.table].replace(f"toDateTime({t.column})", t.column) for t in defaults] == [
        t.expression for t in defaults]
    assert retention.apply_ttls(client, database, _settings()) == [t.table for t in defaults]
    assert retention.apply_ttls(client, database, _settings()) == []
    changed = retention.apply_ttls(client, database, _settings(OCPI_RETENTION_RAW_DAYS="7"))
    assert changed == ["raw_events", "dead_letters"]
    assert retention.current_ttls(client, database)["raw_events"] == "received_at + toIntervalDay(7)"


def test_rejections_are_kept_like_the_other_histories(client: Client) -> None:
    from infra.rejections import COLUMNS, Rejection
    from pipeline.rejections import rejection_row

    refused = Rejection("r1", "p1", "sessions", "PUT", "/ocpi/sessions/NL/TNM/S1", 2001, 400, "bad", "$.kwh",
                        "q1", "c1", ts(0))
    client.insert("rejections", [rejection_row(refused)], column_names=list(COLUMNS))
    retention.apply_ttls(client, client.database, _settings())  # the migrations' form, rewritten
    settings = _settings(OCPI_RETENTION_HISTORY_DAYS="30")
    assert retention.apply_ttls(client, client.database, settings) == [
        "session_status_history", "evse_status_history", "anomalies", "rejections"]
    assert retention.current_ttls(client, client.database)["rejections"] == "rejected_at + toIntervalDay(30)"
    due = {r.table: r for r in retention.report_rows(client, client.database, settings, ts(0) + timedelta(days=31))}
    assert (due["rejections"].data_class, due["rejections"].rows_due) == ("history", 1)


# Tables kept without a TTL by design: current state, kept while the CPO publishes it (README, Retention), and the
# store's own records (partners, the pseudonymisation key's fingerprint, the handshakes' claims, the migrations).
KEPT_WITHOUT_TTL: Final = {"locations", "evses", "connectors",
                           "partners", "pseudonym_key", "credential_claims", "schema_migrations"}
# Tables whose OCPI JSON (payload_json) is of objects without a personal field: an EVSE, a Connector.
NO_PERSONAL_FIELD: Final = {"evses", "connectors"}


def test_every_table_has_a_retention_rule_and_every_personal_column_a_pass(client: Client) -> None:
    """A table a later migration adds, without a TTL in the policy, would keep its rows for ever; a column or
    document of personal data outside `retention.PERSONAL_TABLES` would stay in clear past the pseudonymisation
    age. Every table the migrations create is ruled by the policy or named here as kept by design."""
    tables = {name for (name,) in client.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase() AND engine LIKE '%MergeTree'"
    ).result_rows}
    ruled = {ttl.table for data_class in retention.policy(_settings()) for ttl in data_class.ttls}
    assert sorted(tables - ruled) == sorted(KEPT_WITHOUT_TTL) and ruled <= tables
    in_effect = retention.current_ttls(client, client.database)
    assert not [table for table in ruled if not in_effect[table]]  # each has a TTL from its migration on
    personal = {spec.table: set(spec.columns) for spec in retention.PERSONAL_TABLES}
    for table, column in client.query(
            "SELECT table, name FROM system.columns WHERE database = currentDatabase() AND name IN "
            "('token_uid', 'contract_id', 'authorization_reference', 'visual_number', 'payload_json')"
            ).result_rows:
        if column == "payload_json":  # raw events are kept in clear for their (shorter) retention
            assert table in personal or table in NO_PERSONAL_FIELD or table == "raw_events", table
        else:
            assert column in personal.get(table, ()), (table, column)


def test_a_longer_retention_set_in_the_32_bit_form_keeps_its_rows_when_rewritten(client: Client) -> None:
    """A database of an earlier release, with 10 years of billing configured: the new form keeps 10 years."""
    client.command("ALTER TABLE cdrs MODIFY TTL toDateTime(received_at) + INTERVAL 10 YEAR")
    write(client, Harness(process_cdrs, CdrState).run(event("CDR", cdr(), received=-8 * 365 * 24 * 60)).batch)
    assert "cdrs" in retention.apply_ttls(client, client.database, _settings(OCPI_RETENTION_BILLING_YEARS="10"))
    assert retention.current_ttls(client, client.database)["cdrs"] == "received_at + toIntervalYear(10)"
    client.command("OPTIMIZE TABLE cdrs FINAL")
    assert client.query("SELECT count() FROM cdrs").result_rows == [(1,)]


def test_a_retention_past_2106_keeps_what_was_just_received(client: Client) -> None:
    """A 32-bit expiry (`toDateTime(...)`) past 2106-02-07 wraps to the 1970s, and the TTL deletes every row."""
    write(client, Harness(process_sessions, SessionState).run(
        event("Session", session(status="COMPLETED", end=60, updated=60), received=1)).batch)
    write(client, Harness(process_cdrs, CdrState).run(event("CDR", cdr(), received=2)).batch)
    tables = ("raw_events", "sessions", "cdrs", "cdr_charging_periods", "billing_lines")
    before = {t: client.query(f"SELECT count() FROM {t}").result_rows[0][0] for t in tables}
    assert all(before.values())
    settings = _settings(OCPI_RETENTION_BILLING_YEARS="90", OCPI_RETENTION_RAW_DAYS="29000",
                         OCPI_RETENTION_HISTORY_DAYS="29000")
    assert "cdrs" in retention.apply_ttls(client, client.database, settings)
    assert retention.current_ttls(client, client.database)["cdrs"] == "received_at + toIntervalYear(90)"
    assert not [r for r in retention.report_rows(client, client.database, settings, ts(0) + timedelta(days=1))
                if r.data_class != "personal" and r.rows_due]
    for table in tables:
        client.command(f"OPTIMIZE TABLE {table} FINAL")  # a merge applies the TTL
    assert {t: client.query(f"SELECT count() FROM {t}").result_rows[0][0] for t in tables} == before


def test_personal_data_is_pseudonymised_after_the_configured_age_and_joins_still_work(client: Client) -> None:
    settings = _settings(OCPI_RETENTION_PSEUDONYMISE_DAYS="30")
    pseudonym = retention.Pseudonymizer(b"x" * 32)
    write(client, Harness(process_sessions, SessionState).run(
        event("Session", session(authref="AUTH-1", status="COMPLETED", end=60, updated=60), received=1)).batch)
    write(client, Harness(process_cdrs, CdrState).run(event("CDR", cdr(authref="AUTH-1"), received=2)).batch)
    now = ts(0) + timedelta(days=10)
    assert retention.pseudonymise_due(client, settings, pseudonym, now) == {"sessions": 0, "cdrs": 0, "locations": 0}
    later = ts(0) + timedelta(days=31)
    assert retention.pseudonymise_due(client, settings, pseudonym, later) == {"sessions": 1, "cdrs": 1,
                                                                               "locations": 0}
    [(uid, contract, ref, pseudonymised, document)] = client.query(
        "SELECT token_uid, contract_id, authorization_reference, pseudonymised, payload_json FROM sessions FINAL"
    ).result_rows
    assert uid == pseudonym("TOK1") and contract == pseudonym("NL-EMS-TOK1") and pseudonymised
    assert len(uid) == 36 and ref == pseudonym("auth-1")  # CiString: case does not matter
    assert json.loads(document)["cdr_token"]["uid"] == uid and "TOK1" not in document
    assert client.query("SELECT count() FROM sessions s FINAL JOIN cdrs c FINAL ON s.token_uid = c.token_uid "
                        "AND s.authorization_reference = c.authorization_reference").result_rows == [(1,)]
    assert client.query("SELECT sum(cost_excl_vat) FROM billing_lines FINAL").result_rows == [(Decimal("2.5000"),)]
    assert retention.pseudonymise_due(client, settings, pseudonym, later) == {"sessions": 0, "cdrs": 0,
                                                                               "locations": 0}


CLEAR = ("TOK1", "NL-EMS-TOK1", "AUTH-1", "TOK3", "NL-EMS-TOK3", "Card-0042")  # of the objects that are due


def _personal_rows(client: Client) -> dict[str, list[tuple[Any, ...]]]:
    """Every row (no FINAL) of the tables with personal data, as (identity, pseudonymised, personal values)."""
    found = {}
    for table, key, columns in (("sessions", "session_id", "token_uid, contract_id, authorization_reference, "),
                                ("cdrs", "cdr_id", "token_uid, contract_id, authorization_reference, "),
                                ("locations", "location_id", "")):
        found[table] = sorted(client.query(
            f"SELECT {key}, pseudonymised, version, {columns}payload_json FROM {table}").result_rows)
    return found


def test_after_the_pass_no_row_holds_due_personal_data_in_clear_even_without_final(client: Client) -> None:
    day = 24 * 60
    sessions, cdrs, locations = (Harness(process_sessions, SessionState), Harness(process_cdrs, CdrState),
                                 Harness(process_locations, LocationState))
    # S1 in two batches (two versions, both in clear), S2 recent.
    write(client, sessions.run(event("Session", session(authref="AUTH-1", updated=-40 * day), received=-40 * day),
                               event("Session", session("S2", uid="TOK2", authref="AUTH-2"), received=0)).batch)
    write(client, sessions.run(event("Session", session(authref="AUTH-1", status="COMPLETED", end=-39 * day,
                                                        updated=-39 * day), received=-39 * day)).batch)
    write(client, cdrs.run(event("CDR", cdr(authref="AUTH-1", start=-40 * day, end=-39 * day),
                                 received=-39 * day)).batch)
    old, new = ([{"uid": uid, "type": "RFID"}, {"visual_number": card, "issuer": "MoveMove"}]
                for uid, card in (("TOK3", "Card-0042"), ("TOK4", "Card-0043")))
    write(client, locations.run(
        event("Location", location("LOC-OLD", publish=False, publish_allowed_to=old), received=-40 * day),
        event("Location", location("LOC-NEW", publish=False, publish_allowed_to=new), received=0)).batch)
    write(client, locations.run(event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(0))},
                                      object_id="LOC-OLD", evse_uid="E1", received=0)).batch)
    before = _personal_rows(client)
    assert [(sid, done) for sid, done, *_ in before["sessions"]] == [("S1", False), ("S1", False), ("S2", False)]

    settings = _settings(OCPI_RETENTION_PSEUDONYMISE_DAYS="30")
    done = retention.pseudonymise_due(client, settings, retention.Pseudonymizer(b"x" * 32), ts(day))
    assert done == {"sessions": 1, "cdrs": 1, "locations": 1}
    after = _personal_rows(client)
    for table, rows in after.items():
        due = [row for row in rows if row[0] in ("S1", "C1", "LOC-OLD")]
        assert [row[1] for row in due] == [True], table  # one row left: the pseudonymised one
        text = " ".join(str(value) for value in due[0]).upper()
        assert not [value for value in CLEAR if value.upper() in text], table
        # What was not due is untouched: the same rows, still in clear.
        assert [r for r in rows if r not in due] == [r for r in before[table] if r[0] in ("S2", "LOC-NEW")], table
    assert client.query("SELECT session_id, token_uid FROM sessions FINAL ORDER BY 1").result_rows == [
        ("S1", retention.Pseudonymizer(b"x" * 32)("TOK1")), ("S2", "TOK2")]


def test_clear_rows_a_newer_clear_version_replaced_are_deleted_once_their_personal_data_is_due(
        client: Client) -> None:
    """A Location PUT 40 days ago listed TOK-OLD; a PUT 10 days ago replaced the list. The current row is not due,
    but the replaced one (read by every query without FINAL) holds TOK-OLD, received 40 days ago, in clear."""
    day = 24 * 60
    locations = Harness(process_locations, LocationState)
    write(client, locations.run(event("Location", location(
        "LOC1", publish=False, publish_allowed_to=[{"uid": "TOK-OLD", "type": "RFID"}], updated=-40 * day),
        received=-40 * day)).batch)
    write(client, locations.run(event("Location", location(
        "LOC1", publish=False, publish_allowed_to=[{"uid": "TOK-NEW", "type": "RFID"}], updated=-10 * day),
        received=-10 * day)).batch)
    # LOC2's PUT 10 days ago published it (no list): its current row is never rewritten, the old one stayed for good.
    write(client, locations.run(event("Location", location(
        "LOC2", publish=False, publish_allowed_to=[{"uid": "TOK-GONE", "type": "RFID"}], updated=-40 * day),
        received=-40 * day)).batch)
    write(client, locations.run(event("Location", location("LOC2", updated=-10 * day), received=-10 * day)).batch)
    settings = _settings(OCPI_RETENTION_PSEUDONYMISE_DAYS="30")
    done = retention.pseudonymise_due(client, settings, retention.Pseudonymizer(b"x" * 32), ts(0))
    assert done["locations"] == 0  # LOC1's current list came 10 days ago, LOC2 has none
    documents = [document for (document,) in client.query(
        "SELECT payload_json FROM locations ORDER BY location_id").result_rows]
    assert not [d for d in documents if "TOK-OLD" in d or "TOK-GONE" in d]
    assert [json.loads(d).get("publish_allowed_to") for d in documents] == [[{"uid": "TOK-NEW", "type": "RFID"}],
                                                                           None]


def test_clear_rows_an_interrupted_pass_left_are_deleted_by_the_next(client: Client,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    write(client, Harness(process_sessions, SessionState).run(
        event("Session", session(authref="AUTH-1", status="COMPLETED", end=60, updated=60), received=1)).batch)
    settings = _settings(OCPI_RETENTION_PSEUDONYMISE_DAYS="30")
    pseudonym = retention.Pseudonymizer(b"x" * 32)
    later = ts(0) + timedelta(days=31)
    with monkeypatch.context() as patched:  # the pass stops after its insert (an error, a restart)
        patched.setattr(retention, "delete_superseded_clear_rows", lambda *_: 0)
        assert retention.pseudonymise_due(client, settings, pseudonym, later)["sessions"] == 1
    assert sorted(client.query("SELECT pseudonymised FROM sessions").result_rows) == [(False,), (True,)]
    assert retention.pseudonymise_due(client, settings, pseudonym, later)["sessions"] == 0  # nothing due in FINAL
    assert client.query("SELECT pseudonymised, token_uid FROM sessions").result_rows == [(True, pseudonym("TOK1"))]


@pytest.mark.parametrize("sweep", ["behind", "failing"])
def test_the_worker_pseudonymises_due_rows_whatever_stops_its_deadline_sweep(client: Client, sweep: str) -> None:
    """The worker's hourly row pass ran at the end of the deadline sweep, so whatever made the sweep skip or fail
    skipped it too: the whole group's backlog (a catch-up after an outage, a member that stopped reading, a broker
    whose offsets cannot be read) or an error of the sweep's own (a refused publish, a failed query) left every due
    row in clear for as long as that lasted. The pass needs neither: it rewrites rows whatever writes them meanwhile
    (`projection.next_version`), and the rows' own ages say what is due."""
    import asyncio

    day = 24 * 60
    write(client, Harness(process_sessions, SessionState).run(
        event("Session", session(authref="AUTH-1"), received=-40 * day)).batch)

    class Behind:  # the group has a backlog: the deadline sweep must wait
        async def caught_up(self, assigned: Any, done: Any) -> bool:
            return sweep != "behind"

    async def publish(topic: str, records: list[Any]) -> None:
        raise RuntimeError("the broker refused the records")

    sink = ClickHouseSink(lambda: client)
    if sweep == "failing":  # an AWAITING row past its due time: the sweep publishes it, and that fails
        write_awaiting_row(client)
    settings = _settings(OCPI_RETENTION_PSEUDONYMISE_DAYS="30", OCPI_CLICKHOUSE_DATABASE=client.database)
    pseudonym = retention.Pseudonymizer(b"x" * 32)
    context = SimpleNamespace(
        progress=SimpleNamespace(done={}), app=SimpleNamespace(consumer=SimpleNamespace(assignment=lambda: [])),
        sink=sink, stage_rules=stage_rules(), publish=publish, settings=settings, pseudonym=pseudonym)
    asyncio.run(sweeps.Sweeper(context, Behind()).tick())  # type: ignore[arg-type]
    assert client.query("SELECT token_uid, authorization_reference, pseudonymised FROM sessions FINAL"
                        ).result_rows == [(pseudonym("TOK1"), pseudonym("AUTH-1"), True)]
    if sweep == "failing":
        assert client.query("SELECT outcome FROM reconciliation FINAL").result_rows == [("AWAITING_CDR",)]


def test_one_pass_pseudonymises_every_due_row_whatever_its_batch_size(client: Client) -> None:
    write(client, Harness(process_sessions, SessionState).run(
        event("Session", session("S1", uid="TOK1"), received=1), event("Session", session("S2", uid="TOK2"),
                                                                       received=2)).batch)
    settings = _settings(OCPI_RETENTION_PSEUDONYMISE_DAYS="30")
    done = retention.pseudonymise_due(client, settings, retention.Pseudonymizer(b"x" * 32),
                                      ts(0) + timedelta(days=31), batch=1)
    assert done["sessions"] == 2
    assert client.query("SELECT count() FROM sessions FINAL WHERE NOT pseudonymised").result_rows == [(0,)]


def test_a_due_clear_row_that_no_newer_row_replaces_is_not_deleted(client: Client) -> None:
    # The clear row without a successor is the session's current row (for the next pass to rewrite): deleting it
    # would lose the session.
    write(client, Harness(process_sessions, SessionState).run(
        event("Session", session(authref="AUTH-1", status="COMPLETED", end=60, updated=60), received=1)).batch)
    spec = next(spec for spec in retention.PERSONAL_TABLES if spec.table == "sessions")
    assert retention.delete_superseded_clear_rows(client, spec, ts(0) + timedelta(days=1)) == 0
    assert client.query("SELECT session_id, pseudonymised FROM sessions").result_rows == [("S1", False)]


def test_the_report_counts_what_is_due(client: Client) -> None:
    write(client, Harness(process_cdrs, CdrState).run(event("CDR", cdr(), received=1)).batch)
    settings = _settings()
    at = {(r.data_class, r.table): r
          for r in retention.report_rows(client, client.database, settings, ts(0) + timedelta(days=40))}
    assert at["raw", "raw_events"].rows_due == 1 and at["billing", "cdrs"].rows_due == 0
    assert at["billing", "cdrs"].ttl_in_effect == "toDateTime(received_at) + toIntervalYear(7)"  # 0013's
    personal = [r for r in retention.report_rows(client, client.database, settings,
                                                 ts(0) + timedelta(days=100)) if r.data_class == "personal"]
    assert {r.table: r.rows_due for r in personal} == {"sessions": 0, "cdrs": 1, "locations": 0}


def test_the_report_counts_the_replaced_versions_in_clear_the_pass_deletes(client: Client, chdb_dsn: str,
                                                                         tmp_path: Any) -> None:
    """S1's PUT 40 days ago wrote a row in clear; its last update 10 days ago wrote the current one. The old version
    is due (every query without FINAL reads its token) and the pass deletes it, but the report counted only the
    current rows it pseudonymises: nothing was due, it said."""
    day = 24 * 60
    sessions = Harness(process_sessions, SessionState)
    write(client, sessions.run(event("Session", session(authref="AUTH-1", updated=-40 * day),
                                     received=-40 * day)).batch)
    write(client, sessions.run(event("Session", session(authref="AUTH-1", status="COMPLETED", end=-10 * day,
                                                        updated=-10 * day), received=-10 * day)).batch)
    settings = _settings(OCPI_RETENTION_PSEUDONYMISE_DAYS="30")

    def due() -> dict[str, tuple[int, int]]:
        return {r.table: (r.rows_due, r.replaced_in_clear)
                for r in retention.report_rows(client, client.database, settings, ts(0)) if r.data_class == "personal"}

    assert due() == {"sessions": (0, 1), "cdrs": (0, 0), "locations": (0, 0)}
    from click.testing import CliRunner

    from pipeline.cli import cli

    env = {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": client.database,
           "OCPI_DATA_DIR": str(tmp_path), "OCPI_KAFKA_BOOTSTRAP": "", "COLUMNS": "250",
           "OCPI_RETENTION_PSEUDONYMISE_DAYS": "30"}  # ts(0) is yesterday: the same ages now
    result = CliRunner().invoke(cli, ["retention", "report"], env=env)
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.output.splitlines() if " sessions " in line and "personal" in line]
    assert "(+ 1 replaced versions in clear, deleted)" in line
    assert retention.pseudonymise_due(client, settings, retention.Pseudonymizer(b"x" * 32), ts(0))["sessions"] == 0
    assert due()["sessions"] == (0, 0)
    assert client.query("SELECT count() FROM sessions").result_rows == [(1,)]


def test_the_report_counts_what_the_ttl_in_effect_deletes_and_flags_one_the_policy_does_not_set(
        client: Client, chdb_dsn: str, tmp_path: Any) -> None:
    """The count was made with the configured TTL, whatever the table's: with 1 year of billing in effect (a
    `retention apply` run with another OCPI_RETENTION_BILLING_YEARS, a worker not restarted since) the report said
    no CDR was due while ClickHouse deleted every CDR older than a year at its next merge."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    write(client, Harness(process_cdrs, CdrState).run(event("CDR", cdr(), received=1)).batch)
    retention.apply_ttls(client, client.database, _settings())
    client.command("ALTER TABLE cdrs MODIFY TTL received_at + toIntervalYear(1)")
    at = {(r.data_class, r.table): r for r in retention.report_rows(client, client.database, _settings(),
                                                                    ts(0) + timedelta(days=400))}
    assert at["billing", "cdrs"].ttl_in_effect == "received_at + toIntervalYear(1)"
    assert at["billing", "cdrs"].rows_due == 1  # what ClickHouse deletes now
    assert at["billing", "billing_lines"].rows_due == 0  # its TTL is the configured one: 7 years
    env = {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": client.database,
           "OCPI_DATA_DIR": str(tmp_path), "OCPI_KAFKA_BOOTSTRAP": "", "COLUMNS": "250"}
    result = CliRunner().invoke(cli, ["retention", "report"], env=env)
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.output.splitlines() if " cdrs " in line and "billing" in line]
    assert "(policy: received_at + toIntervalYear(7))" in line
    [line] = [line for line in result.output.splitlines() if " billing_lines " in line]
    assert "policy" not in line


def test_a_location_row_is_due_when_its_publish_allowed_to_is_whatever_updates_came_since(
        client: Client, chdb_dsn: str, tmp_path: Any) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    day = 24 * 60  # minutes; ts(0) is yesterday, so `retention apply` (now) sees the same ages
    allowed = [{"uid": "TOK1", "type": "RFID"}, {"visual_number": "Card-0042", "issuer": "MoveMove"}]
    locations = Harness(process_locations, LocationState)
    write(client, locations.run(
        event("Location", location("LOC-OLD", publish=False, publish_allowed_to=allowed), received=-40 * day),
        event("Location", location("LOC-PUBLIC"), received=-40 * day),  # no personal data: never rewritten
        event("Location", location("LOC-NEW", publish=False, publish_allowed_to=allowed), received=0)).batch)
    # A recent EVSE update writes LOC-OLD's current row, with the same publish_allowed_to in its payload.
    write(client, locations.run(event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(0))},
                                      object_id="LOC-OLD", evse_uid="E1", received=0)).batch)
    settings = _settings(OCPI_RETENTION_PSEUDONYMISE_DAYS="30")
    [due] = [r for r in retention.report_rows(client, client.database, settings, ts(day))
             if r.table == "locations"]
    assert due.rows_due == 1 and due.rule == "pseudonymise 30 days after personal_at"

    env = {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": client.database,
           "OCPI_DATA_DIR": str(tmp_path), "OCPI_PSEUDONYM_KEY": "x" * 32, "OCPI_KAFKA_BOOTSTRAP": "",
           "OCPI_RETENTION_PSEUDONYMISE_DAYS": "30"}
    result = CliRunner().invoke(cli, ["retention", "apply"], env=env)
    assert result.exit_code == 0, result.output
    assert "pseudonymised: sessions 0, cdrs 0, locations 1" in result.output
    current = {lid: (pseudonymised, received, personal, json.loads(document)) for
               lid, pseudonymised, received, personal, document in client.query(
                   "SELECT location_id, pseudonymised, received_at, personal_at, payload_json FROM locations FINAL"
               ).result_rows}
    pseudonymised, received, personal, document = current["LOC-OLD"]
    assert pseudonymised and (received, personal) == (ts(0), ts(-40 * day))
    pseudonym = retention.Pseudonymizer(b"x" * 32)
    assert document["publish_allowed_to"] == [
        {"uid": pseudonym("TOK1"), "type": "RFID"},
        {"visual_number": pseudonym("Card-0042", case_insensitive=False), "issuer": "MoveMove"}]
    assert document["evses"][0]["status"] == "CHARGING"
    assert not current["LOC-NEW"][0] and current["LOC-NEW"][3]["publish_allowed_to"] == allowed
    assert not current["LOC-PUBLIC"][0]
    assert [r.rows_due for r in retention.report_rows(client, client.database, settings, ts(day))
            if r.table == "locations"] == [0]


def test_an_update_written_while_the_pass_rewrites_its_row_stays_the_current_row(client: Client) -> None:
    """The pass reads a due current row (version V) and writes it back pseudonymised at V + 1. An EVSE update the
    worker writes in between, whose last_updated does not move the Location's on (older than it, newer than the
    EVSE's), got V + 1 too: the tie went to the pass's later insert, so FINAL (the receivers' GET) answered the
    EVSE's old status while the `evses` table and the worker's state held the new one."""
    import asyncio

    from receivers.state import StateReader, evse_of

    locations = Harness(process_locations, LocationState)
    write(client, locations.run(event("Location", location(evses=[evse("E1", updated=0)], updated=60, publish=False,
                                                           publish_allowed_to=[{"uid": "TOK3", "type": "RFID"}]),
                                      received=0)).batch)
    update = locations.run(event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(30))},
                                 object_id="LOC1", evse_uid="E1", received=40 * 24 * 60)).batch

    def insert(table: str, columns: list[str], rows: list[list[Any]]) -> None:
        write(client, update)  # the worker's batch lands between the pass's read and its write
        insert_rows(client, table, columns, rows)

    retention.pseudonymise_due(client, _settings(OCPI_RETENTION_PSEUDONYMISE_DAYS="30"),
                               retention.Pseudonymizer(b"x" * 32), ts(40 * 24 * 60), insert=insert)
    stored = asyncio.run(StateReader(lambda: client).location(ObjectKey("NL", "TNM", "LOC1")))
    assert stored is not None
    assert json.loads(bytes(evse_of(stored, "E1") or b"{}"))["status"] == "CHARGING"
    assert client.query("SELECT status FROM evses FINAL").result_rows == [("CHARGING",)]


def test_pseudonyms_are_keyed_stable_and_idempotent() -> None:
    a = retention.Pseudonymizer(b"a" * 32)
    b = retention.Pseudonymizer(b"b" * 32)
    assert a("TOK1") == a("tok1") != b("TOK1")
    assert a(a("TOK1")) == a("TOK1")
    assert a("Visual 1", case_insensitive=False) != a("visual 1", case_insensitive=False)
    with pytest.raises(ValueError, match="16 bytes"):
        retention.Pseudonymizer(b"short")


def test_a_clear_value_starting_with_the_pseudonym_prefix_is_pseudonymised_too() -> None:
    """A token uid, contract id or authorization reference is a CiString a CPO may start with `psn:`; taken for a
    pseudonym, it stayed in clear for ever (and a CDR's `psn:x` never joined its session's `PSN:X`)."""
    pseudonym = retention.Pseudonymizer(b"a" * 32)
    for clear in ("psn:x", "PSN:X", "psn:" + "0" * 31, "psn:" + "A" * 32, "psn:" + "0" * 33):
        assert pseudonym(clear) != clear and is_pseudonym(pseudonym(clear))
    assert pseudonym("psn:x") == pseudonym("PSN:X")  # CiStrings: one pseudonym whatever the case
    assert pseudonym(pseudonym("psn:x")) == pseudonym("psn:x")  # still idempotent


def test_pseudonyms_are_the_keyed_hash_whether_remembered_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import hmac

    monkeypatch.setattr(retention.Pseudonymizer, "CACHE_SIZE", 3)
    pseudonym = retention.Pseudonymizer(b"k" * 32)
    values = [f"TOK{i % 5}" for i in range(20)] + ["Visual 1", "visual 1"]
    for value in values:  # in and out of the (tiny) memory, both cases
        for case_insensitive in (True, False):
            text = value.upper() if case_insensitive else value
            expected = "psn:" + hmac.new(b"k" * 32, text.encode(), hashlib.sha256).hexdigest()[:32]
            assert pseudonym(value, case_insensitive=case_insensitive) == expected
    assert len(pseudonym._cache) <= 3


def test_a_generated_key_is_kept(tmp_path: Any) -> None:
    settings = load_settings({"OCPI_DATA_DIR": str(tmp_path)})
    key = retention.load_key(settings)
    assert len(key) == 64 and retention.load_key(settings) == key
    assert oct(retention.key_file(settings).stat().st_mode & 0o777) == "0o600"


def test_a_key_file_without_a_whole_key_is_refused_and_never_recorded(client: Client, chdb_dsn: str,
                                                                     tmp_path: Any) -> None:
    """Another process has created the key file and not written it yet (or crashed in between): its empty key
    must not become the store's key, or every process with the real one is refused from then on."""
    from pipeline.worker import check_pseudonym_key

    settings = load_settings({"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": client.database,
                              "OCPI_DATA_DIR": str(tmp_path)})
    path = retention.key_file(settings)
    path.parent.mkdir(parents=True)
    path.write_text("")
    with pytest.raises(retention.PseudonymKeyError, match=str(path)):
        check_pseudonym_key(settings, wait_s=0)
    assert client.query("SELECT count() FROM pseudonym_key").result_rows == [(0,)]


def test_a_generated_key_is_complete_before_another_process_can_read_it(tmp_path: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    settings = load_settings({"OCPI_DATA_DIR": str(tmp_path)})
    path = retention.key_file(settings)
    seen = []
    real_link = os.link

    def link(source: Any, target: Any) -> None:  # the moment the key file appears: it is whole already
        real_link(source, target)
        seen.append(path.read_text())

    monkeypatch.setattr(os, "link", link)
    key = retention.load_key(settings)
    assert seen == [key.decode()] and len(key) == 64
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_rebuild_with_another_key_stops_before_it_builds_anything(client: Client, chdb_dsn: str,
                                                                   tmp_path: Any) -> None:
    """The rebuild worker checks its key against the fresh database, which has none recorded: a rebuild run with
    another key would pseudonymise with it, and its `pseudonym_key` table, swapped in, would stop the live worker."""
    import asyncio

    from pipeline.jobs.common import JobError
    from pipeline.jobs.rebuild import rebuild

    retention.check_key(client, b"a" * 32, recorded_by="worker")  # the live worker's key
    settings = load_settings({"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": client.database,
                              "OCPI_DATA_DIR": str(tmp_path), "OCPI_PSEUDONYM_KEY": "b" * 32})
    with pytest.raises(JobError, match="OCPI_PSEUDONYM_KEY"):
        asyncio.run(rebuild(settings, "127.0.0.1:1", timeout=1))  # no Kafka needed: it stops before
    assert retention.leftover_rebuilds(client, client.database) == []


def test_topic_configs_cover_every_topic_we_feed_and_the_personal_state_changelogs() -> None:
    configs = retention.topic_configs(load_settings({"OCPI_RETENTION_RAW_DAYS": "2", "OCPI_PIPELINE_APP_ID": "w"}))
    changelogs = [configs.pop(f"w-{table}-state-changelog") for table in ("session", "location")]
    assert set(configs) == {"ocpi.locations.v1", "ocpi.sessions.v1", "ocpi.cdrs.v1", "ocpi.pipeline.party-facts.v1",
                            "ocpi.reconciliation.v1", "ocpi.rejections.v1"}
    assert {c["retention.ms"] for c in configs.values()} == {str(2 * 86_400_000)}
    # Segments roll daily: Kafka deletes whole segments, by default of up to 7 days, so raw personal data would
    # have outlived its retention by up to a week.
    assert {c["segment.ms"] for c in configs.values()} == {str(86_400_000)}
    # Records as large as our producers may send (a 4 MB push, a whole Location's state), not Kafka's default 1 MB.
    assert {c["max.message.bytes"] for c in configs.values()} == {str(16 * 1024 * 1024)}
    assert changelogs == [{"cleanup.policy": "compact", "max.message.bytes": str(16 * 1024 * 1024),
                           "max.compaction.lag.ms": str(86_400_000)}] * 2


def test_every_state_changelog_is_created_compacted_with_room_for_a_whole_object() -> None:
    from pipeline.app import TABLES

    configs = retention.changelog_configs(load_settings({"OCPI_PIPELINE_APP_ID": "w"}), TABLES)
    assert set(configs) == {f"w-{table}-changelog" for table in TABLES}
    assert all(c["cleanup.policy"] == "compact" and c["max.message.bytes"] == str(16 * 1024 * 1024)
               for c in configs.values())
    # The compaction lag bounds how long a clear value outlives its pseudonymised one: personal tables only.
    assert {t for t, c in configs.items() if "max.compaction.lag.ms" in c} == {
        "w-session-state-changelog", "w-location-state-changelog"}


def test_datetime_literal() -> None:
    from pipeline.sink import datetime64, string

    moment = datetime(2026, 1, 5, 9, 0, 0, 123456, tzinfo=UTC)
    assert datetime64(moment) == "toDateTime64('2026-01-05 09:00:00.123456', 6, 'UTC')"
    assert string("it's") == "'it\\'s'"
    # Another offset is the same instant in UTC; a backslash is escaped, not read as the escape of the quote.
    assert datetime64(datetime(2026, 1, 5, 11, 0, tzinfo=timezone(timedelta(hours=2)))) == \
        "toDateTime64('2026-01-05 09:00:00.000000', 6, 'UTC')"
    assert string("a\\'") == "'a\\\\\\''"


def test_every_process_must_pseudonymise_with_the_key_in_force(client: Client) -> None:
    # A worker elsewhere, or `retention apply` with another OCPI_DATA_DIR, would generate its own key: its pseudonyms
    # would not join with the others'. The first key is recorded; another one stops the process.
    retention.check_key(client, b"a" * 32, recorded_by="worker one")
    retention.check_key(client, b"a" * 32, recorded_by="worker two")
    with pytest.raises(retention.PseudonymKeyMismatch, match="OCPI_PSEUDONYM_KEY") as refused:
        retention.check_key(client, b"b" * 32, recorded_by="retention apply")
    assert "a" * 32 not in str(refused.value) and "b" * 32 not in str(refused.value)  # fingerprints, never the key
    rows = client.query("SELECT fingerprint, recorded_by FROM pseudonym_key").result_rows
    assert rows == [(retention.key_fingerprint(b"a" * 32), "worker one")]


def test_of_two_first_keys_recorded_at_once_the_earlier_is_in_force(client: Client) -> None:
    early, late = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
    client.insert("pseudonym_key", [[retention.key_fingerprint(b"b" * 32), late, "racer"],
                                    [retention.key_fingerprint(b"a" * 32), early, "winner"]],
                  column_names=["fingerprint", "recorded_at", "recorded_by"])
    retention.check_key(client, b"a" * 32, recorded_by="worker")
    with pytest.raises(retention.PseudonymKeyMismatch):
        retention.check_key(client, b"b" * 32, recorded_by="racer")


def test_of_two_first_processes_with_different_keys_racing_only_one_starts(client: Client, chdb_dsn: str) -> None:
    """Two fresh workers with different keys, started at once, both found the table empty. The first stamped its
    row earlier but its insert landed after the second had recorded its own, read it back alone and started; the
    first then read its own row as the earliest and started too: two keys in force, pseudonyms that never join.
    The first key recorded is now the only one a table can take (ClickHouse deduplicates every first insert by one
    token), so the process whose insert came second reads the other's key, and stops."""
    from infra.clickhouse.client import connect

    other = connect(chdb_dsn, database=client.database)

    class Slow:  # the first worker's insert lands only after the second worker's whole check
        def __init__(self, inner: Client) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            attribute = getattr(self.inner, name)
            if name not in ("insert", "command"):
                return attribute

            def write(*args: Any, **kwargs: Any) -> Any:
                if "pseudonym_key" in str(args[0]):
                    retention.check_key(other, b"b" * 32, recorded_by="second worker")  # starts
                return attribute(*args, **kwargs)
            return write

    with pytest.raises(retention.PseudonymKeyMismatch, match="OCPI_PSEUDONYM_KEY"):
        retention.check_key(Slow(client), b"a" * 32, recorded_by="first worker")  # type: ignore[arg-type]
    retention.check_key(other, b"b" * 32, recorded_by="the second worker, restarted")
    assert client.query("SELECT fingerprint, recorded_by FROM pseudonym_key").result_rows == [
        (retention.key_fingerprint(b"b" * 32), "second worker")]


def test_a_new_key_is_taken_once_the_table_is_truncated(client: Client) -> None:
    """README: the key cannot be changed in place; an operator accepting the break empties `pseudonym_key` by hand.
    A DELETE leaves ClickHouse taking the next first insert for a repeat of the deleted one: said, not ignored."""
    retention.check_key(client, b"a" * 32, recorded_by="worker")
    client.command("DELETE FROM pseudonym_key WHERE 1")
    with pytest.raises(retention.PseudonymKeyError, match="TRUNCATE TABLE pseudonym_key"):
        retention.check_key(client, b"b" * 32, recorded_by="worker with a new key")
    client.command("TRUNCATE TABLE pseudonym_key")
    retention.check_key(client, b"b" * 32, recorded_by="worker with a new key")
    with pytest.raises(retention.PseudonymKeyMismatch):
        retention.check_key(client, b"a" * 32, recorded_by="worker with the old key")


def test_a_worker_with_another_key_stops_before_it_processes_anything(client: Client, chdb_dsn: str,
                                                                      tmp_path: Any) -> None:
    from pipeline.worker import check_pseudonym_key

    def settings(key: str) -> Settings:
        return load_settings({"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": client.database,
                              "OCPI_DATA_DIR": str(tmp_path), "OCPI_PSEUDONYM_KEY": key})

    check_pseudonym_key(settings("a" * 32), wait_s=0)
    check_pseudonym_key(settings("a" * 32), wait_s=0)
    with pytest.raises(retention.PseudonymKeyMismatch):
        check_pseudonym_key(settings("b" * 32), wait_s=0)


def test_the_report_names_databases_a_rebuild_left_with_personal_data(client: Client, chdb_dsn: str,
                                                                      tmp_path: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    leftover = f"{client.database}_rebuild_20261125T000000"
    client.command(f"CREATE DATABASE {leftover}")
    try:
        assert retention.leftover_rebuilds(client, client.database) == [leftover]
        for name, value in {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": client.database,
                            "OCPI_DATA_DIR": str(tmp_path), "COLUMNS": "200"}.items():
            monkeypatch.setenv(name, value)
        result = CliRunner().invoke(cli, ["retention", "report"])
        assert result.exit_code == 0, result.output
        assert f"DROP DATABASE `{leftover}`" in " ".join(result.output.split()), result.output
    finally:
        client.command(f"DROP DATABASE {leftover}")
    assert retention.leftover_rebuilds(client, client.database) == []


def test_apply_with_kafka_down_does_the_clickhouse_part_and_fails_clearly(client: Client, chdb_dsn: str,
                                                                         tmp_path: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from click.testing import CliRunner

    from pipeline.cli import cli

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": client.database,
                        "OCPI_DATA_DIR": str(tmp_path), "OCPI_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"}.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli, ["retention", "apply"])
    assert result.exit_code == 1 and "does not answer" in result.output and "Traceback" not in result.output
    assert "pseudonymised:" in result.output  # the ClickHouse part ran first


def test_apply_before_the_topics_exist_says_so(client: Client, chdb_dsn: str, tmp_path: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Topics not created yet get no config (`set_topic_configs` sets existing ones): `apply` said "nothing
    (already as configured)" of them."""
    from click.testing import CliRunner

    from infra.kafka import admin
    from pipeline.cli import cli
    from pipeline.cli import retention as retention_cli

    for name, value in {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": client.database,
                        "OCPI_DATA_DIR": str(tmp_path), "OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)
    existing: dict[str, dict[str, str]] = {}
    monkeypatch.setattr(retention_cli, "reachable", lambda _bootstrap: True)
    monkeypatch.setattr(admin, "set_topic_configs",
                        lambda _bootstrap, configs: admin.ConfigsSet([], sorted(set(configs) - set(existing))))
    result = CliRunner().invoke(cli, ["retention", "apply"])
    assert result.exit_code == 0, result.output
    assert "already as configured" not in result.output
    assert "not created yet" in result.output and "ocpi.cdrs.v1" in result.output
    existing.update({topic: {} for topic in retention.topic_configs(load_settings())})
    result = CliRunner().invoke(cli, ["retention", "apply"])
    assert "already as configured" in result.output and "not created yet" not in result.output


def test_a_dead_letter_at_offsets_a_new_broker_reuses_keeps_the_old_one(client: Client) -> None:
    """The embedded broker keeps its records in memory: restarted, it numbers every partition from 0 again, while
    ClickHouse keeps its tables. A dead letter was keyed by its Kafka coordinates only, so the next one at the same
    topic/partition/offset replaced it; a record read again (at-least-once) must still count once."""
    def letters(*dead: DeadLetter) -> Batch:
        out = StageOutput(str)  # dead letters need no pseudonymiser
        out.dead_letters(list(dead))
        return out.batch

    before = DeadLetter("ocpi.cdrs.v1", 0, 5, b"NL/TNM/C1", b"\x01first broker", "undecodable record: x")
    after = DeadLetter("ocpi.cdrs.v1", 0, 5, b"NL/TNM/C9", b"\x01restarted broker", "undecodable record: y")
    write(client, letters(before))
    write(client, letters(after))
    write(client, letters(after))  # the same record read again
    rows = client.query("SELECT error FROM dead_letters FINAL ORDER BY error").result_rows
    assert rows == [("undecodable record: x",), ("undecodable record: y",)]


def test_what_the_receivers_get_answers_is_the_state_the_worker_wrote(client: Client) -> None:
    """README, "GET": no read-your-writes, only what the worker applied; an EVSE a Location PUT left out is unknown
    though its row is kept; a CDR POSTed again with other content leaves the original; personal identifiers past
    the pseudonymisation age are answered as their pseudonyms."""
    import asyncio

    from receivers.state import StateReader, evse_of

    reader = StateReader(lambda: client)

    def stored(kind: str, object_id: str) -> Any:
        found = asyncio.run(getattr(reader, kind)(ObjectKey("nl", "tnm", object_id)))
        return None if found is None else json.loads(bytes(found))

    locations, cdrs = Harness(process_locations, LocationState), Harness(process_cdrs, CdrState)
    put = locations.run(event("Location", location(evses=[evse("E1"), evse("E2")]), received=1)).batch
    assert stored("location", "loc1") is None  # acknowledged, not written yet: unknown
    write(client, put)
    write(client, locations.run(event("Location", location(evses=[evse("E1", updated=5)], updated=5),
                                      received=6)).batch)
    found = asyncio.run(reader.location(ObjectKey("NL", "TNM", "LOC1")))
    assert found is not None and evse_of(found, "E1") is not None and evse_of(found, "e2") is None
    assert client.query("SELECT present FROM evses FINAL WHERE evse_uid = 'E2'").result_rows == [(False,)]

    write(client, cdrs.run(event("CDR", cdr(kwh="10"), received=1)).batch)
    write(client, cdrs.run(event("CDR", cdr(cid="c1", kwh="99"), received=2)).batch)  # CONFLICT
    assert Decimal(str(stored("cdr", "C1")["total_energy"])) == 10
    retention.pseudonymise_due(client, _settings(OCPI_RETENTION_PSEUDONYMISE_DAYS="30"),
                               retention.Pseudonymizer(b"x" * 32), ts(40 * 24 * 60))
    token = stored("cdr", "c1")["cdr_token"]
    assert token["uid"].startswith("psn:") and token["contract_id"].startswith("psn:")


def test_a_credit_whose_original_comes_after_the_grace_is_flagged_whether_or_not_a_sweep_ran_between(
        client: Client) -> None:
    """A credit CDR waits OCPI_RECONCILE_SESSION_GRACE for the CDR it credits, then the sweep flags it
    (UNKNOWN_REFERENCE, anomaly CREDIT_UNKNOWN_REFERENCE). When the original comes after the grace, the event-time
    rule wrote LINKED and no anomaly: so the anomaly was there only if a sweep had run in between, not when the
    worker was down or behind across the deadline, nor after a `replay --rebuild` (or a new app id) reprocessed the
    same facts. Like the other deadlines, the late event writes the row the sweep writes for it."""
    from pipeline.agents import party_batch
    from pipeline.facts import cdr_fact
    from pipeline.reconcile import PartyOutput, PartyState, Rules, process_party

    from .builders import PSEUDONYM_KEY, DictStore

    rules = Rules(cdr_grace=timedelta(minutes=30), session_grace=timedelta(minutes=10),
                  energy_tolerance=Decimal("0.01"), cost_tolerance=Decimal("0.01"),
                  time_tolerance=timedelta(minutes=5))
    pseudonym = retention.Pseudonymizer(PSEUDONYM_KEY)

    def fact(body: dict[str, Any], received: float) -> Any:
        return cdr_fact(event("CDR", body).payload, partner_id="p1", received_at=ts(received), pseudonym=pseudonym)

    store = DictStore()

    def run(*facts: Any) -> Batch:
        out = PartyOutput()
        overlay = store.overlay()
        process_party(PartyState("NL/TNM", overlay), list(facts), rules, out)
        store.commit(overlay)
        return party_batch(out, [])

    write(client, run(fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), 0)))
    swept, _ = sweeps.collect(client, ts(20), with_margin(stage_rules(), timedelta(seconds=10)), anomalies_kept=KEPT)
    late = run(fact(cdr("C1", cost="2.50"), 15))  # 15 min: past the 10 min grace
    assert [row[0] for row in swept.tables()["anomalies"]] == ["CREDIT_UNKNOWN_REFERENCE"]
    assert late.tables().get("anomalies", []) == swept.tables()["anomalies"]


def test_a_session_the_sweep_made_missing_cdr_stays_so_when_it_changes_after_its_deadline(client: Client) -> None:
    """A completed session without a CDR, promoted MISSING_CDR by the sweep (version + 1), then updated after its
    CDR grace (a total_cost PATCH): stage 2 wrote and published AWAITING_CDR again, which replaced the sweep's row
    until the next sweep. The update's row is MISSING_CDR with the same due_at; a CDR then still matches it."""
    from pipeline.agents import party_batch, reconciliation_records
    from pipeline.facts import cdr_fact, session_fact
    from pipeline.reconcile import PartyOutput, PartyState, Rules, process_party

    from .builders import PSEUDONYM_KEY, DictStore

    rules = Rules(cdr_grace=timedelta(minutes=30), session_grace=timedelta(minutes=10),
                  energy_tolerance=Decimal("0.01"), cost_tolerance=Decimal("0.01"),
                  time_tolerance=timedelta(minutes=5))
    pseudonym = retention.Pseudonymizer(PSEUDONYM_KEY)

    def completed(cost: str, version: int, received: float) -> Any:
        body = session("S1", status="COMPLETED", kwh="10", cost=cost, end=60, updated=received)
        return session_fact(event("Session", body).payload, partner_id="p1", version=version,
                            received_at=ts(received), final_at=ts(61), pseudonym=pseudonym)

    store = DictStore()
    published: list[dict[str, Any]] = []

    def run(*facts: Any) -> None:
        out = PartyOutput()
        overlay = store.overlay()
        process_party(PartyState("NL/TNM", overlay), list(facts), rules, out)
        store.commit(overlay)
        published.extend(json.loads(value) for _key, value in reconciliation_records(out.reconciliation))
        write(client, party_batch(out, []))

    def current() -> list[tuple[Any, ...]]:
        return client.query("SELECT outcome, due_at, session_cost_excl_vat FROM reconciliation FINAL").result_rows

    run(completed("2.50", 1, 61))
    swept, promoted = sweeps.collect(client, ts(100), with_margin(stage_rules(), timedelta(seconds=10)),
                                      anomalies_kept=KEPT)
    write(client, swept)
    assert [row[6] for row in promoted] == ["MISSING_CDR"]
    assert current() == [("MISSING_CDR", ts(91), Decimal("2.5000"))]
    run(completed("3.00", 2, 120))  # its cost PATCHed, after the deadline (91)
    assert current() == [("MISSING_CDR", ts(91), Decimal("3.0000"))]
    assert published[-1]["outcome"] == "MISSING_CDR"
    run(cdr_fact(event("CDR", cdr("C1", cost="3.00")).payload, partner_id="p1", received_at=ts(130),
                 pseudonym=pseudonym))
    assert client.query("SELECT subject, outcome, late FROM reconciliation FINAL ORDER BY subject").result_rows == [
        ("CDR", "MATCHED", False), ("SESSION", "MATCHED", True)]


def test_every_evse_a_location_put_leaves_out_is_an_anomaly_of_its_own(client: Client) -> None:
    # One PUT leaving out two EVSEs is two facts: the anomalies' key (kind, object, sub_id, event) told them apart
    # by the event alone, and the second EVSE's row replaced the first's (in the batch, and under FINAL).
    locations = Harness(process_locations, LocationState)
    write(client, locations.run(event("Location", location(evses=[evse("E1"), evse("E2"), evse("E3")]),
                                      received=1)).batch)
    write(client, locations.run(event("Location", location(evses=[evse("E1", updated=5)], updated=5),
                                      received=2)).batch)
    assert client.query("SELECT sub_id, detail FROM anomalies FINAL WHERE kind = 'EVSE_MISSING_FROM_PUT' "
                        "ORDER BY sub_id").result_rows == [
        ("E2", "EVSE E2 is not in the Location PUT"), ("E3", "EVSE E3 is not in the Location PUT")]
    assert client.query("SELECT evse_uid, present FROM evses FINAL ORDER BY evse_uid").result_rows == [
        ("E1", True), ("E2", False), ("E3", False)]


def test_a_replayed_patch_whose_put_named_its_session_in_another_case_is_not_orphaned_while_awaited(
        client: Client) -> None:
    # CiStrings compare without case (the worker's state is keyed by the upper-cased id, so the PUT to .../S1
    # released the PATCH to .../s1), but raw_events keeps the ids as the URL had them: the sweep's check for a
    # replayed PATCH still awaiting its PUT compared them as they were, found no PUT, and orphaned it (an
    # ORPHAN_EVENT anomaly that stays after the replayed PUT releases the PATCH again).
    rules = stage_rules(park_ttl_min=5)
    patch = event("SessionPatch", {"kwh": Decimal(1), "last_updated": iso(ts(1))}, object_id="s1", received=0,
                  cc="nl", pid="tnm")
    write(client, Harness(process_sessions, SessionState, rules).run(
        patch, event("Session", session("S1"), received=1)).batch)
    assert sorted(client.query("SELECT object_id, outcome FROM raw_events FINAL").result_rows) == [
        ("S1", "APPLIED"), ("s1", "APPLIED")]
    # A restore: the state starts empty and the replayed PATCH is parked again, its PUT still to be replayed.
    replayed = event("SessionPatch", {"kwh": Decimal(1), "last_updated": iso(ts(1))}, object_id="s1", received=0,
                     cc="nl", pid="tnm", event_id=patch.event_id, source="REPLAY")
    write(client, Harness(process_sessions, SessionState, rules).run(replayed).batch)
    assert client.query(f"SELECT outcome, source FROM raw_events FINAL WHERE event_id = '{patch.event_id}'"
                        ).result_rows == [("PARKED", "REPLAY")]

    swept, _ = sweeps.collect(client, ts(24 * 60), with_margin(rules, timedelta(seconds=10)), anomalies_kept=KEPT)
    assert swept.tables().get("raw_events", []) == []
    assert [row for row in swept.tables().get("anomalies", []) if row[0] == "ORPHAN_EVENT"] == []


def test_a_replayed_parked_event_is_orphaned_once_only_unapplied_events_of_its_object_are_left_to_replay(
        client: Client) -> None:
    # Only an APPLIED event releases a parked one, and only its replay writes its raw_events row again (source
    # REPLAY): a DUPLICATE, STALE, REJECTED, INVALID or CONFLICT copy is not recorded, its row keeps its source
    # (PUSH) for good. The sweep counted such a row as an event still to be replayed that may release the parked
    # one, so a replayed EVSE PATCH, parked again, whose Location was pushed again unchanged within the park TTL,
    # was never orphaned (and rows like it, 10,000 at the head of the sweep's LIMIT, kept every other from it).
    rules = stage_rules(park_ttl_min=5)
    put = event("Location", location("L1"), received=0)
    patch = event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(1))}, object_id="L1", evse_uid="E9",
                  received=1)
    again = event("Location", location("L1"), received=2)
    write(client, Harness(process_locations, LocationState, rules).run(put, patch, again).batch)
    assert sorted(client.query("SELECT event_id, outcome FROM raw_events FINAL").result_rows) == sorted([
        (put.event_id, "APPLIED"), (patch.event_id, "PARKED"), (again.event_id, "DUPLICATE")])
    swept, _ = sweeps.collect(client, ts(60), with_margin(rules, timedelta(seconds=10)), anomalies_kept=KEPT)
    write(client, swept)
    assert client.query(f"SELECT outcome FROM raw_events FINAL WHERE event_id = '{patch.event_id}'"
                        ).result_rows == [("ORPHANED",)]
    # A restore replays all three: the state starts empty, the PATCH is parked again, the PUT's copy is a
    # duplicate (its row still says PUSH); nothing is left to replay.
    restored = Harness(process_locations, LocationState, rules)
    write(client, restored.run(*(msgspec.structs.replace(e, source="REPLAY") for e in (put, patch, again))).batch)
    assert sorted(client.query("SELECT event_id, outcome, source FROM raw_events FINAL").result_rows) == sorted([
        (put.event_id, "APPLIED", "REPLAY"), (patch.event_id, "PARKED", "REPLAY"),
        (again.event_id, "DUPLICATE", "PUSH")])

    swept, _ = sweeps.collect(client, ts(120), with_margin(rules, timedelta(seconds=10)), anomalies_kept=KEPT)
    assert [(row[0], row[20]) for row in swept.tables().get("raw_events", [])] == [(patch.event_id, "ORPHANED")]


def test_the_orphan_sweep_runs_with_thousands_of_replayed_parked_events(client: Client) -> None:
    # After a restore, thousands of PATCHes may be parked again by the replay (source REPLAY). The sweep asked
    # ClickHouse which of them a later event still awaits with one statement listing every one's object as a
    # literal tuple: 5,000 of them are beyond ClickHouse's max_query_size (256 KiB), the statement was refused,
    # and every sweep failed (no orphan, idle session, missing CDR or retention) as long as they stayed parked.
    from pipeline.projection import RAW_EVENT_COLUMNS

    rules = stage_rules(park_ttl_min=5)
    template = Harness(process_sessions, SessionState, rules).run(event(
        "SessionPatch", {"kwh": Decimal(1), "last_updated": iso(ts(1))}, object_id="S", received=0,
        source="REPLAY")).batch.tables()["raw_events"][0]
    index = {c: i for i, c in enumerate(RAW_EVENT_COLUMNS)}
    rows = []
    for n in range(5000):
        row = list(template)
        row[index["event_id"]] = f"00000000-0000-0000-0000-{n:012d}"
        row[index["object_id"]] = f"SESSION-{n:028d}"  # a CiString(36) id
        rows.append(row)
    insert_rows(client, "raw_events", RAW_EVENT_COLUMNS, rows)

    swept, _ = sweeps.collect(client, ts(60), with_margin(rules, timedelta(seconds=10)), anomalies_kept=KEPT)
    assert len(swept.tables()["raw_events"]) == 5000


def test_the_location_trees_rows_after_pushes_at_every_level_are_what_get_answers(client: Client) -> None:
    """08 §3.3/§3.4 at each level, ids in another case, a Connector and an EVSE leaving the tree: the evses,
    connectors and status history rows under FINAL are the stored tree (what GET answers), the ones it no longer
    holds kept with `present = false`, and the history one row per status change (leaving the tree a change to
    '', REMOVED or not)."""
    import asyncio

    from receivers.state import StateReader, connector_of, evse_of

    from .builders import connector

    h = Harness(process_locations, LocationState)

    def push(payload_type: str, body: dict[str, Any], received: float, **ids: str) -> None:
        write(client, h.run(event(payload_type, body, received=received, object_id=ids.pop("lid", "LOC1"),
                                  **ids)).batch)

    push("Location", location(evses=[evse("E1"), evse("E2", connectors=[connector("1"), connector("2")])]), 1)
    push("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(5))}, 5, lid="loc1", evse_uid="e1")
    push("Connector", connector("3", updated=6), 6, evse_uid="E2", connector_id="3")
    push("ConnectorPatch", {"tariff_ids": ["T1"], "last_updated": iso(ts(7))}, 7, evse_uid="e2", connector_id="2")
    push("EVSE", evse("E2", updated=8, connectors=[connector("1", updated=8), connector("3", updated=6)]), 8,
         evse_uid="E2")  # Connector 2 left out
    push("EVSEPatch", {"status": "REMOVED", "last_updated": iso(ts(10))}, 10, evse_uid="E1")
    push("Location", location(evses=[evse("e2", status="BLOCKED", updated=12)], updated=12, name="Renamed"), 12)

    assert client.query("SELECT evse_uid, status, present, connector_count, last_updated FROM evses FINAL "
                        "ORDER BY evse_uid").result_rows == [
        ("E1", "REMOVED", False, 1, ts(10)), ("E2", "BLOCKED", True, 1, ts(12))]
    assert client.query("SELECT evse_uid, connector_id, present, tariff_ids FROM connectors FINAL "
                        "ORDER BY evse_uid, connector_id").result_rows == [
        ("E1", "1", False, []), ("E2", "1", True, []), ("E2", "2", False, ["T1"]), ("E2", "3", False, [])]
    assert client.query("SELECT evse_uid, previous_status, status, changed_at FROM evse_status_history FINAL "
                        "ORDER BY evse_uid, changed_at").result_rows == [
        ("E1", "", "AVAILABLE", ts(0)), ("E1", "AVAILABLE", "CHARGING", ts(5)), ("E1", "CHARGING", "REMOVED", ts(10)),
        ("E1", "REMOVED", "", ts(12)), ("E2", "", "AVAILABLE", ts(0)), ("E2", "AVAILABLE", "BLOCKED", ts(12))]
    assert client.query("SELECT location_id, name, evse_count, last_updated FROM locations FINAL").result_rows == [
        ("LOC1", "Renamed", 1, ts(12))]
    assert client.query("SELECT count() FROM anomalies FINAL").result_rows == [(0,)]  # E1 went REMOVED first

    found = asyncio.run(StateReader(lambda: client).location(ObjectKey("NL", "TNM", "loc1")))
    assert found is not None and evse_of(found, "E1") is None
    e2 = evse_of(found, "E2")
    assert e2 is not None and connector_of(e2, "2") is None and connector_of(e2, "3") is None
    [(payload,)] = client.query("SELECT payload_json FROM evses FINAL WHERE present").result_rows
    assert json.loads(payload) == json.loads(bytes(e2))  # the row holds what GET answers


def test_a_hubs_evse_status_patches_write_one_history_row_per_change_however_often_they_come(client: Client) -> None:
    """The common hub traffic (08 §3.4: EVSE status PATCHes): a batch written twice (a crash before the offsets),
    a producer's resend of an event, a partner's retry with a new event id, a late older PATCH and a replayed copy
    leave one history row per status change, in the order of `last_updated`."""
    h = Harness(process_locations, LocationState)
    write(client, h.run(event("Location", location(evses=[evse("E1"), evse("E2")]), received=1)).batch)

    def status(uid: str, value: str, minute: float, received: float, **extra: Any) -> Any:
        return event("EVSEPatch", {"status": value, "last_updated": iso(ts(minute))}, object_id="LOC1",
                     evse_uid=uid, received=received, **extra)

    charging = status("E1", "CHARGING", 5, 5)
    batch = h.run(charging, status("E2", "BLOCKED", 6, 6)).batch
    write(client, batch)
    write(client, batch)
    resent = status("E1", "CHARGING", 5, 5, event_id=charging.event_id)
    retried = status("E2", "BLOCKED", 6, 7)
    write(client, h.run(resent, retried, status("E1", "AVAILABLE", 9, 9), status("E1", "OUTOFORDER", 8, 10)).batch)
    replayed = status("E1", "CHARGING", 5, 5, event_id=charging.event_id, source="REPLAY")
    write(client, h.run(replayed).batch)

    assert client.query("SELECT evse_uid, previous_status, status, changed_at FROM evse_status_history FINAL "
                        "ORDER BY evse_uid, changed_at").result_rows == [
        ("E1", "", "AVAILABLE", ts(0)), ("E1", "AVAILABLE", "CHARGING", ts(5)), ("E1", "CHARGING", "AVAILABLE", ts(9)),
        ("E2", "", "AVAILABLE", ts(0)), ("E2", "AVAILABLE", "BLOCKED", ts(6))]
    assert client.query("SELECT evse_uid, status FROM evses FINAL ORDER BY evse_uid").result_rows == [
        ("E1", "AVAILABLE"), ("E2", "BLOCKED")]
    assert client.query("SELECT outcome, count() FROM raw_events FINAL GROUP BY outcome ORDER BY outcome"
                        ).result_rows == [("APPLIED", 4), ("DUPLICATE", 1), ("STALE", 1)]


def _tariff(tariff_id: str) -> dict[str, Any]:
    return {"country_code": "NL", "party_id": "TNM", "id": tariff_id, "currency": "EUR", "type": "REGULAR",
            "min_price": {"excl_vat": Decimal("0.5"), "incl_vat": Decimal("0.605")},
            "elements": [
                {"price_components": [{"type": "FLAT", "price": Decimal("0.5"), "vat": Decimal("21"), "step_size": 1}]},
                {"price_components": [{"type": "ENERGY", "price": Decimal("0.2512"), "step_size": 500},
                                      {"type": "PARKING_TIME", "price": Decimal("0"), "vat": Decimal("0"),
                                       "step_size": 300}],
                 "restrictions": {"start_time": "22:00", "end_time": "06:00", "min_kwh": Decimal("0.0001"),
                                  "max_power": Decimal("22.5"), "max_duration": 7200,
                                  "day_of_week": ["SATURDAY", "SUNDAY"]}}],
            "last_updated": "2026-01-01T00:00:00Z"}


def test_a_cdr_lands_in_its_three_tables_exactly(client: Client) -> None:
    """Every billing-relevant value of a CDR as sent, exact (no float, no rounding): totals, each Price, each
    dimension volume (negative and zero ones too) in the order sent, tariffs with elements and restrictions; the
    same id of another party is another CDR, and the id in another case the same one."""
    body = cdr("Cdr-1", kwh="-3.5", cost="0.0001", tariffs=[_tariff("T1"), _tariff("T2")])
    body.update(total_parking_time=Decimal("0"), total_time=Decimal("99999999999999.9999"),
                total_fixed_cost={"excl_vat": Decimal("0.5"), "incl_vat": Decimal("0.605")},
                total_energy_cost={"excl_vat": Decimal("-1.0001")}, total_time_cost={"excl_vat": Decimal("0")},
                total_parking_cost={"excl_vat": Decimal("1.5"), "incl_vat": Decimal("1.815")},
                total_reservation_cost={"excl_vat": Decimal("2"), "incl_vat": Decimal("2.42")},
                signed_data={"encoding_method": "OCMF", "encoding_method_version": 1,
                             "signed_values": [{"nature": "Start", "plain_data": "p", "signed_data": "s"}]})
    volumes = [("ENERGY", "-1.2345"), ("MAX_CURRENT", "0"), ("MIN_CURRENT", "-16"), ("MAX_POWER", "22.0001"),
               ("MIN_POWER", "-11"), ("PARKING_TIME", "0.0000"), ("RESERVATION_TIME", "0.5"), ("TIME", "1")]
    body["charging_periods"] = [
        {"start_date_time": iso(ts(0)), "tariff_id": "t1",
         "dimensions": [{"type": kind, "volume": Decimal(volume)} for kind, volume in volumes]},
        {"start_date_time": iso(ts(30)), "dimensions": [{"type": "ENERGY", "volume": Decimal("-2.2655")}]}]
    other_party = cdr("Cdr-1", cc="DE", pid="ABC", cost="9")
    cdrs = Harness(process_cdrs, CdrState)
    out = cdrs.run(event("CDR", body, received=1), event("CDR", {**body, "id": "CDR-1"}, received=2),
                   event("CDR", other_party, received=3))
    write(client, out.batch)
    names = ("country_code", "party_id", "cdr_id", "session_id", "location_id", "evse_uid", "connector_id",
             "currency", "total_energy", "total_time", "total_parking_time", "total_cost_excl_vat",
             "total_cost_incl_vat", "credit", "credit_reference_id", "start_date_time", "end_date_time", "version")
    assert client.query(f"SELECT {', '.join(names)} FROM cdrs FINAL ORDER BY country_code").result_rows == [
        ("DE", "ABC", "CDR-1", "S1", "LOC1", "E1", "1", "EUR", Decimal("10.0000"), Decimal("1.0000"), None,
         Decimal("9.0000"), Decimal("10.8900"), False, None, ts(0), ts(60), 1),
        ("NL", "TNM", "CDR-1", "S1", "LOC1", "E1", "1", "EUR", Decimal("-3.5000"), Decimal("99999999999999.9999"),
         Decimal("0.0000"), Decimal("0.0001"), Decimal("0.0001"), False, None, ts(0), ts(60), 1)]
    [(document,)] = client.query("SELECT payload_json FROM cdrs FINAL WHERE country_code = 'NL'").result_rows
    stored = json.loads(document, parse_float=Decimal)
    assert stored["id"] == "Cdr-1"  # as first sent; the second (another case) was a DUPLICATE
    for name in ("total_fixed_cost", "total_energy_cost", "total_time_cost", "total_parking_cost",
                 "total_reservation_cost", "signed_data", "charging_periods"):
        assert stored[name] == json.loads(json.dumps(body[name], default=str), parse_float=Decimal,
                                          object_hook=_numbers), name
    assert client.query("SELECT cdr_id, period_index, start_date_time, tariff_id, dimension_types, "
                        "dimension_volumes, version FROM cdr_charging_periods FINAL WHERE country_code = 'NL' "
                        "ORDER BY period_index").result_rows == [
        ("CDR-1", 0, ts(0), "T1", [kind for kind, _ in volumes], [Decimal(v) for _, v in volumes], 1),
        ("CDR-1", 1, ts(30), None, ["ENERGY"], [Decimal("-2.2655")], 1)]
    assert client.query("SELECT count() FROM cdr_charging_periods FINAL WHERE country_code = 'DE'").result_rows == [
        (1,)]
    tariffs = client.query("SELECT tariff_country_code, tariff_party_id, tariff_id, currency, tariff_type, "
                           "tariff_json FROM cdr_tariffs FINAL ORDER BY tariff_id").result_rows
    assert [row[:5] for row in tariffs] == [("NL", "TNM", "T1", "EUR", "REGULAR"), ("NL", "TNM", "T2", "EUR",
                                                                                    "REGULAR")]
    for row, sent in zip(tariffs, (_tariff("T1"), _tariff("T2")), strict=True):
        assert json.loads(row[5], parse_float=Decimal) == json.loads(
            json.dumps(sent, default=str), parse_float=Decimal, object_hook=_numbers)
    assert client.query("SELECT day, country_code, energy_kwh, cost_excl_vat, cost_incl_vat FROM billing_lines "
                        "FINAL ORDER BY country_code").result_rows == [
        (ts(60).date(), "DE", Decimal("10.0000"), Decimal("9.0000"), Decimal("10.8900")),
        (ts(60).date(), "NL", Decimal("-3.5000"), Decimal("0.0001"), Decimal("0.0001"))]


_DECIMAL_FIELDS = frozenset({"price", "vat", "volume", "excl_vat", "incl_vat", "min_kwh", "max_power"})


def _numbers(node: dict[str, Any]) -> dict[str, Any]:
    """A body's Decimals, written as strings by `json.dumps(default=str)`, as the numbers the store holds."""
    return {key: Decimal(value) if key in _DECIMAL_FIELDS and isinstance(value, str) else value
            for key, value in node.items()}


def test_a_cdr_period_names_its_tariff_as_cdr_tariffs_keys_it(client: Client) -> None:
    """A period's `tariff_id` refers to one of the CDR's Tariffs (a CiString): cdr_tariffs keys the Tariff
    upper-cased, the period kept the case sent, so joining a period to its tariff found nothing for a CPO writing
    ids in lower case (the projection's rule: a CiString column referring to another object is upper-cased)."""
    body = cdr(tariffs=[_tariff("ac-day")])
    body["charging_periods"][0]["tariff_id"] = "ac-day"
    write(client, Harness(process_cdrs, CdrState).run(event("CDR", body, received=1)).batch)
    assert client.query("SELECT p.period_index, t.tariff_id, t.tariff_type FROM cdr_charging_periods AS p FINAL "
                        "JOIN cdr_tariffs AS t FINAL ON (t.country_code, t.party_id, t.cdr_id, t.tariff_id) = "
                        "(p.country_code, p.party_id, p.cdr_id, p.tariff_id)").result_rows == [
        (0, "AC-DAY", "REGULAR")]
    [(document,)] = client.query("SELECT payload_json FROM cdrs FINAL").result_rows
    assert json.loads(document)["charging_periods"][0]["tariff_id"] == "ac-day"  # the CDR as sent


def test_a_cdrs_tariffs_of_one_key_each_keep_their_row(client: Client) -> None:
    """A CDR may list two Tariffs under one key (a CiString id sent in two cases, or one id for two types):
    cdr_tariffs keyed them by (CDR, tariff country, party, id) alone, so the second replaced the first and its
    JSON was lost to billing. Each keeps its row now (`tariff_occurrence`: how many of the same key come before it
    in the list), written again the same (a replay), and over the rows a version before wrote, whose one row per
    key had occurrence 0."""
    regular, ad_hoc, other = _tariff("t1"), {**_tariff("T1"), "type": "AD_HOC_PAYMENT"}, _tariff("T2")
    body = cdr(tariffs=[regular, ad_hoc, other])
    before = [c for c in CDR_TARIFF_COLUMNS if c != "tariff_occurrence"]
    rows = [dict(zip(CDR_TARIFF_COLUMNS, row, strict=True)) for row in projection.cdr_tariff_rows(body, ts(1))]
    # One row per key, as a version before wrote them: the last of a key replaced the ones before it.
    insert_rows(client, "cdr_tariffs", before, [[row[c] for c in before] for row in rows[1:]])
    batch = Harness(process_cdrs, CdrState).run(event("CDR", body, received=1)).batch
    write(client, batch)
    write(client, batch)
    rows = client.query("SELECT tariff_id, tariff_occurrence, tariff_type, tariff_json FROM cdr_tariffs FINAL "
                        "ORDER BY tariff_id, tariff_occurrence").result_rows
    assert [row[:3] for row in rows] == [("T1", 0, "REGULAR"), ("T1", 1, "AD_HOC_PAYMENT"), ("T2", 0, "REGULAR")]
    assert [json.loads(row[3])["id"] for row in rows] == ["t1", "T1", "T2"]


def test_a_hubs_sessions_and_cdrs_are_billed_under_their_own_cpo_parties_once(client: Client) -> None:
    """03 topologies 7 and 8: a Hub relays the Sessions and CDRs of many CPO parties, and one of them also pushes
    directly. Each object is keyed and billed under its own CPO party (never the Hub's), from the connection that
    brought it first (`partner_id`); the same object from the other connection is a DUPLICATE, no second row, no
    second billing line (billing_lines is keyed by partner_id too)."""
    sessions = Harness(process_sessions, SessionState)
    cdrs = Harness(process_cdrs, CdrState)

    def done(cc: str, pid: str, kwh: str, cost: str) -> dict[str, Any]:
        return session("S1", status="COMPLETED", kwh=kwh, cost=cost, end=60, updated=60, cc=cc, pid=pid)

    write(client, sessions.run(event("Session", done("NL", "AAA", "10", "2.50"), partner="hub", received=61),
                               event("Session", done("BE", "BBB", "8", "2.00"), partner="hub", received=61),
                               event("Session", done("NL", "AAA", "10", "2.50"), partner="cpo-aaa", received=62)
                               ).batch)
    write(client, cdrs.run(event("CDR", cdr("C1", kwh="10", cost="2.50", cc="NL", pid="AAA"), partner="hub",
                                 received=63),
                           event("CDR", cdr("C1", kwh="8", cost="2.00", cc="BE", pid="BBB"), partner="hub",
                                 received=63),
                           event("CDR", cdr("C1", kwh="10", cost="2.50", cc="NL", pid="AAA"), partner="cpo-aaa",
                                 received=64)).batch)
    assert client.query("SELECT country_code, party_id, session_id, partner_id, kwh FROM sessions FINAL "
                        "ORDER BY country_code").result_rows == [
        ("BE", "BBB", "S1", "hub", Decimal("8.0000")), ("NL", "AAA", "S1", "hub", Decimal("10.0000"))]
    assert client.query("SELECT country_code, party_id, cdr_id, partner_id FROM cdrs FINAL ORDER BY country_code"
                        ).result_rows == [("BE", "BBB", "C1", "hub"), ("NL", "AAA", "C1", "hub")]
    assert client.query("SELECT partner_id, country_code, party_id, cdrs, energy_kwh, cost_excl_vat FROM billing_daily "
                        "ORDER BY country_code").result_rows == [
        ("hub", "BE", "BBB", 1, Decimal("8.0000"), Decimal("2.0000")),
        ("hub", "NL", "AAA", 1, Decimal("10.0000"), Decimal("2.5000"))]
    assert client.query("SELECT partner_id, module, outcome, count() FROM raw_events FINAL GROUP BY ALL ORDER BY ALL"
                        ).result_rows == [("cpo-aaa", "CDRS", "DUPLICATE", 1), ("cpo-aaa", "SESSIONS", "DUPLICATE", 1),
                                          ("hub", "CDRS", "APPLIED", 2), ("hub", "SESSIONS", "APPLIED", 2)]
