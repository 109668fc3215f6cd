"""The demo's summary and its check: read back from a store that holds rows written more than once
(at-least-once), and failing for every way the store differs from what the simulated CPOs were acknowledged."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from ocpi.datetime import format_datetime
from pipeline.demo import read_summary, wait_for_rows
from pipeline.projection import DEAD_LETTER_COLUMNS, dead_letter_row
from pipeline.records import DeadLetter
from pipeline.simulator import VAT, Expected, SimulatedParty
from pipeline.stack import StackError

pytestmark = pytest.mark.clickhouse


def test_a_dead_letter_written_twice_counts_once(client: Client) -> None:
    """A batch applied again after a crash writes its dead letter again (same key): the summary read the
    ReplacingMergeTree without FINAL and showed it twice."""
    row = dead_letter_row(DeadLetter("t.cdrs", 0, 7, b"NL/TNM/C1", b"\x00", "bad"), datetime.now(UTC))
    for _ in range(2):
        client.insert("dead_letters", [row], column_names=list(DEAD_LETTER_COLUMNS))
    assert read_summary(client, Expected(), 0.0).dead_letters == 1


# --- the check itself: a store that holds what was acknowledged matches, and each kind of loss is named -----------

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)
CREATED, LATE = NOW - timedelta(days=30), NOW - timedelta(days=29)  # the Location PUT; an EVSE status sent late
S1_COST = (Decimal("3.5"), Decimal("4.235"))
AT = "now64(6, 'UTC')"  # rows received now: the tables' retention TTLs keep them
TNM, BEC = SimulatedParty("NL", "TNM"), SimulatedParty("BE", "BEC")
PARTNER = {"NL": "demo-cpo-nl", "BE": "demo-cpo-be"}  # the demo's partners of NL/TNM and BE/BEC
END = f"'{NOW:%Y-%m-%d %H:%M:%S}'"  # every CDR's end_date_time
CDR_FIELDS = "(session, currency, credit, credit_reference_id, kWh, cost excl. VAT, cost incl. VAT)"
C1_LINE = "demo-cpo-nl, LOC001, 2026-01-05, EUR, False, 10, 3.5, 4.2350"  # C1's billing line as expected


def cdr_body(cdr_id: str, session_id: str, kwh: str, excl: str, credit_of: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cdr_id, "session_id": session_id, "total_energy": Decimal(kwh), "currency": "EUR",
                            "cdr_location": {"id": "LOC001"}, "end_date_time": format_datetime(NOW),
                            "total_cost": {"excl_vat": Decimal(excl), "incl_vat": (Decimal(excl) * VAT).quantize(
                                Decimal("0.0001"))}}
    if credit_of is not None:
        body.update(credit=True, credit_reference_id=credit_of)
    return body


def acknowledged() -> Expected:
    """What two simulated CPOs were told: a plain story at NL/TNM; at BE/BEC a story whose CDR was credited and
    corrected (re-priced)."""
    expected = Expected()
    s1 = ("NL", "TNM", "S1")  # PENDING, ACTIVE by PATCH, COMPLETED by PATCH with its total_cost
    expected.observe_session(s1, NOW - timedelta(hours=3), status="PENDING", kwh=Decimal(0), periods=0,
                             replace=True)
    expected.observe_session(s1, NOW - timedelta(hours=2), status="ACTIVE")
    expected.observe_session(s1, NOW, status="COMPLETED", kwh=Decimal(10), cost=S1_COST)
    expected.observe_session(s1, NOW - timedelta(hours=3), status="PENDING", kwh=Decimal(0), periods=0,
                             replace=True)  # the first PUT resent after the end: it changes nothing
    expected.observe_session(("BE", "BEC", "S2"), NOW, status="COMPLETED", kwh=Decimal(20), periods=0,
                             replace=True)  # a PUT without total_cost
    expected.observe_cdr(TNM, cdr_body("C1", "S1", "10", "3.5"))
    expected.observe_cdr(BEC, cdr_body("C2", "S2", "20", "7"))
    expected.observe_cdr(BEC, cdr_body("C2-C", "S2", "20", "-7", credit_of="C2"))
    expected.observe_cdr(BEC, cdr_body("C2-R", "S2", "20", "6"), outcome="MISMATCH")
    expected.locations.add(("NL", "TNM", "LOC001"))
    evse = ("NL", "TNM", "LOC001", "LOC001-E1")
    expected.observe_evse(evse, "AVAILABLE", CREATED)  # the Location PUT
    expected.observe_connector((*evse, "1"), ["AC1"], CREATED)
    expected.observe_evse(evse, "CHARGING", NOW - timedelta(hours=2))  # S1's story
    expected.observe_evse(evse, "AVAILABLE", NOW)
    expected.observe_connector((*evse, "1"), ["AC2"], NOW + timedelta(minutes=1))  # the late tariff PATCH
    expected.observe_evse(evse, "OUTOFORDER", LATE)  # sent late on purpose: stale
    return expected


EVSE_HISTORY = [("", "AVAILABLE", CREATED), ("AVAILABLE", "CHARGING", NOW - timedelta(hours=2)),
                ("CHARGING", "AVAILABLE", NOW)]


def store(client: Client, *, skip: tuple[str, ...] = (), reconciled: dict[str, str] | None = None,
          s1_cost: str = "3.5, 4.235", evse_history: list[tuple[str, str, datetime]] | None = None,
          tariff: str = "AC2") -> None:
    """Write what `acknowledged` says into the tables the demo reads, as the pipeline would (`skip`: leave out
    rows of that table or of that object, or the status history row of a Session's status, e.g. "S1 ACTIVE";
    `reconciled`: another outcome for a CDR; `s1_cost`, `evse_history`, `tariff`: what S1's total_cost,
    LOC001-E1's status history and its Connector's tariff are stored as)."""
    outcomes = {"C1": "MATCHED", "C2": "CREDITED", "C2-C": "CREDIT", "C2-R": "MISMATCH", **(reconciled or {})}
    client.command("INSERT INTO sessions (country_code, party_id, session_id, status, kwh, total_cost_excl_vat, "
                   "total_cost_incl_vat, payload_json, received_at, version) VALUES "
                   f"('NL', 'TNM', 'S1', 'COMPLETED', 10, {s1_cost}, '{{}}', {AT}, 1), "
                   f"('BE', 'BEC', 'S2', 'COMPLETED', 20, NULL, NULL, '{{}}', {AT}, 1)")
    changes = [("NL", "TNM", "S1", "", "PENDING", NOW - timedelta(hours=3)),
               ("NL", "TNM", "S1", "PENDING", "ACTIVE", NOW - timedelta(hours=2)),
               ("NL", "TNM", "S1", "ACTIVE", "COMPLETED", NOW), ("BE", "BEC", "S2", "", "COMPLETED", NOW)]
    client.command("INSERT INTO session_status_history (country_code, party_id, session_id, event_id, "
                   "previous_status, status, transition, last_updated, received_at, version) VALUES " + ", ".join(
                       f"('{cc}', '{pid}', '{sid}', 'e{n}', '{previous}', '{status}', 'LEGAL', "
                       f"'{at:%Y-%m-%d %H:%M:%S}', {AT}, 1)"
                       for n, (cc, pid, sid, previous, status, at) in enumerate(changes)
                       if f"{sid} {status}" not in skip))
    client.command("INSERT INTO evse_status_history (country_code, party_id, location_id, evse_uid, event_id, "
                   "previous_status, status, changed_at, received_at, version) VALUES " + ", ".join(
                       f"('NL', 'TNM', 'LOC001', 'LOC001-E1', 'e{n}', '{previous}', '{status}', "
                       f"'{at:%Y-%m-%d %H:%M:%S}', {AT}, 1)"
                       for n, (previous, status, at) in enumerate(EVSE_HISTORY if evse_history is None
                                                                   else evse_history)))
    client.command("INSERT INTO connectors (country_code, party_id, location_id, evse_uid, connector_id, tariff_ids, "
                   f"present, payload_json, version) VALUES ('NL', 'TNM', 'LOC001', 'LOC001-E1', '1', ['{tariff}'], "
                   "true, '{}', 1)")
    cdrs = [("NL", "TNM", "C1", "S1", "10", "3.5", "false", "NULL"),
            ("BE", "BEC", "C2", "S2", "20", "7", "false", "NULL"),
            ("BE", "BEC", "C2-C", "S2", "20", "-7", "true", "'C2'"),
            ("BE", "BEC", "C2-R", "S2", "20", "6", "false", "NULL")]
    values = ", ".join(
        f"('{PARTNER[cc]}', '{cc}', '{pid}', '{cid}', '{sid}', 'LOC001', 'EUR', {kwh}, {excl}, "
        f"{Decimal(excl) * VAT:.4f}, {credit}, {of}, {END}, {AT}, '{{}}', 1)"
        for cc, pid, cid, sid, kwh, excl, credit, of in cdrs if cid not in skip)
    client.command("INSERT INTO cdrs (partner_id, country_code, party_id, cdr_id, session_id, location_id, currency, "
                   "total_energy, total_cost_excl_vat, total_cost_incl_vat, credit, credit_reference_id, "
                   f"end_date_time, received_at, payload_json, version) VALUES {values}")
    if "credit_links" not in skip:
        client.command("INSERT INTO credit_links (country_code, party_id, credit_cdr_id, credited_cdr_id, status, "
                       "amount_matches, received_at, version) VALUES "
                       f"('BE', 'BEC', 'C2-C', 'C2', 'LINKED', true, {AT}, 1)")
    rows = [(cc, pid, "CDR", cid, outcomes[cid]) for cc, pid, cid, *_ in cdrs if cid not in skip]
    rows += [("NL", "TNM", "SESSION", "S1", "MATCHED"), ("BE", "BEC", "SESSION", "S2", "MISMATCH")]
    if "reconciliation" not in skip:
        client.command("INSERT INTO reconciliation (country_code, party_id, subject, subject_id, outcome, event_time, "
                       "version) VALUES " + ", ".join(f"('{cc}', '{pid}', '{s}', '{i}', '{o}', {AT}, 1)"
                                                       for cc, pid, s, i, o in rows))
    if "locations" not in skip:
        client.command("INSERT INTO locations (country_code, party_id, location_id, payload_json, version) "
                       "VALUES ('NL', 'TNM', 'LOC001', '{}', 1)")
    client.command("INSERT INTO evses (country_code, party_id, location_id, evse_uid, status, present, payload_json, "
                   "version) VALUES ('NL', 'TNM', 'LOC001', 'LOC001-E1', 'AVAILABLE', true, '{}', 1)")


def test_a_store_that_holds_what_was_acknowledged_matches(client: Client) -> None:
    store(client)
    summary = read_summary(client, acknowledged(), 0.0)
    assert summary.mismatches == []
    assert summary.reconciliation == {("CDR", "CREDIT"): 1, ("CDR", "CREDITED"): 1, ("CDR", "MATCHED"): 1,
                                      ("CDR", "MISMATCH"): 1, ("SESSION", "MATCHED"): 1, ("SESSION", "MISMATCH"): 1}


@pytest.mark.parametrize("outcome", ["AWAITING_SESSION", "MISMATCH"])
def test_a_cdr_not_reconciled_as_acknowledged_is_a_mismatch(client: Client, outcome: str) -> None:
    """The demo waited for one reconciliation row per CDR, whatever its outcome (AWAITING_SESSION counted: stage 2
    not done), ignored its wait timing out, and never compared reconciliation: a CDR never matched to its session,
    or a summary read before stage 2 had matched them, still 'matched what the simulated CPOs pushed'."""
    store(client, reconciled={"C1": outcome})
    assert read_summary(client, acknowledged(), 0.0).mismatches == [
        f"CDR NL/TNM/C1: reconciliation {outcome}, expected MATCHED"]


def test_a_cdr_without_a_reconciliation_row_is_a_mismatch(client: Client) -> None:
    store(client, skip=("reconciliation",))
    found = read_summary(client, acknowledged(), 0.0).mismatches
    assert "CDR NL/TNM/C1: reconciliation None, expected MATCHED" in found


def test_a_party_with_no_billing_lines_is_a_mismatch(client: Client) -> None:
    """The per-party totals were compared only for the parties found in billable_lines: a party whose every line
    was missing (its CDRs stored, the CDR count right) was not in the loop, and the demo matched."""
    store(client)
    client.command("DELETE FROM billing_lines WHERE party_id = 'TNM'")
    found = read_summary(client, acknowledged(), 0.0).mismatches
    assert found == ["NL/TNM: (completed sessions, CDRs, kWh, cost excl. VAT, cost incl. VAT) billed "
                     "(1, 0, 0, 0, 0), expected (1, 1, 10, 3.5, 4.2350)",
                     f"CDR NL/TNM/C1: billing lines [], expected [{C1_LINE}]"]


def test_each_printed_figure_of_a_party_is_compared(client: Client) -> None:
    """The completed sessions, the CDR count and the cost incl. VAT per party are printed but were never compared:
    a CDR stored again with its incl_vat wrong (here the excl_vat) still matched."""
    store(client)
    client.command("INSERT INTO cdrs (partner_id, country_code, party_id, cdr_id, session_id, location_id, currency, "
                   "total_energy, total_cost_excl_vat, total_cost_incl_vat, credit, end_date_time, received_at, "
                   "payload_json, version) VALUES ('demo-cpo-nl', 'NL', 'TNM', 'C1', 'S1', 'LOC001', 'EUR', 10, 3.5, "
                   f"3.5, false, {END}, {AT}, '{{}}', 2)")
    found = read_summary(client, acknowledged(), 0.0).mismatches
    assert found == ["NL/TNM: (completed sessions, CDRs, kWh, cost excl. VAT, cost incl. VAT) billed "
                     "(1, 1, 10.0000, 3.5000, 3.5000), expected (1, 1, 10, 3.5, 4.2350)",
                     f"CDR NL/TNM/C1: stored {CDR_FIELDS} (S1, EUR, False, None, 10.0000, 3.5000, 3.5000), expected "
                     "(S1, EUR, False, None, 10, 3.5, 4.2350)",
                     "CDR NL/TNM/C1: billing lines [demo-cpo-nl, LOC001, 2026-01-05, EUR, False, 10.0000, 3.5000, "
                     f"3.5000], expected [{C1_LINE}]"]


def test_home_charging_compensation_is_not_in_the_billing_totals_and_printed_apart(client: Client) -> None:
    """A CDR with home_charging_compensation true is energy compensated to the driver: the demo's billing totals
    counted it as charging. They are charging only, the compensation is read apart, and as the simulated CPOs send
    none, a compensation line in the store is a mismatch."""
    store(client)
    client.command("INSERT INTO cdrs (partner_id, country_code, party_id, cdr_id, session_id, location_id, currency, "
                   "total_energy, total_cost_excl_vat, total_cost_incl_vat, credit, end_date_time, received_at, "
                   "payload_json, version) VALUES ('demo-cpo-nl', 'NL', 'TNM', 'C1', 'S1', 'LOC001', 'EUR', 10, 3.5, "
                   f"4.235, false, {END}, {AT}, '{{\"home_charging_compensation\": true}}', 2)")
    summary = read_summary(client, acknowledged(), 0.0)
    assert [(p.party_id, p.currency, p.cdrs, p.cost_excl_vat) for p in summary.parties] == [
        ("BEC", "EUR", 3, Decimal("6.0000")), ("TNM", "", 0, Decimal("0"))]
    assert [(p.party_id, p.currency, p.cdrs, p.kwh, p.cost_excl_vat) for p in summary.compensation] == [
        ("TNM", "EUR", 1, Decimal("10.0000"), Decimal("3.5000"))]
    assert "NL/TNM: 1 home charging compensation CDRs (EUR), the simulated CPOs sent none" in summary.mismatches

def test_billing_totals_are_read_and_compared_per_currency(client: Client) -> None:
    """The totals per party were summed over every currency and the currency never compared: a CDR stored in
    another currency than the one sent (here C1 in GBP, amounts right) still matched, and a party billed in two
    currencies showed one sum of both."""
    store(client)
    client.command("INSERT INTO cdrs (partner_id, country_code, party_id, cdr_id, session_id, location_id, currency, "
                   "total_energy, total_cost_excl_vat, total_cost_incl_vat, credit, end_date_time, received_at, "
                   "payload_json, version) VALUES ('demo-cpo-nl', 'NL', 'TNM', 'C1', 'S1', 'LOC001', 'GBP', 10, 3.5, "
                   f"4.235, false, {END}, {AT}, '{{}}', 2), ('demo-cpo-be', 'BE', 'BEC', 'C2-R', 'S2', 'LOC001', "
                   f"'GBP', 20, 6, 7.26, false, {END}, {AT}, '{{}}', 2)")
    summary = read_summary(client, acknowledged(), 0.0)
    assert [(p.party_id, p.currency, p.cost_excl_vat) for p in summary.parties] == [
        ("BEC", "EUR", Decimal("0.0000")), ("BEC", "GBP", Decimal("6.0000")), ("TNM", "GBP", Decimal("3.5000"))]
    assert summary.mismatches == [
        "BE/BEC: billed in EUR, GBP, expected EUR", "NL/TNM: billed in GBP, expected EUR",
        f"CDR BE/BEC/C2-R: stored {CDR_FIELDS} (S2, GBP, False, None, 20.0000, 6.0000, 7.2600), expected "
        "(S2, EUR, False, None, 20, 6, 7.2600)",
        f"CDR NL/TNM/C1: stored {CDR_FIELDS} (S1, GBP, False, None, 10.0000, 3.5000, 4.2350), expected "
        "(S1, EUR, False, None, 10, 3.5, 4.2350)",
        "CDR BE/BEC/C2-R: billing lines [demo-cpo-be, LOC001, 2026-01-05, GBP, False, 20.0000, 6.0000, 7.2600], "
        "expected [demo-cpo-be, LOC001, 2026-01-05, EUR, False, 20, 6, 7.2600]",
        "CDR NL/TNM/C1: billing lines [demo-cpo-nl, LOC001, 2026-01-05, GBP, False, 10.0000, 3.5000, 4.2350], "
        f"expected [{C1_LINE}]"]


def test_a_location_not_stored_is_a_mismatch(client: Client) -> None:
    """The simulator collects every Location it pushed (`Expected.locations`), but the demo never compared them:
    a Location lost on the way (its EVSEs stored) still matched."""
    store(client, skip=("locations",))
    assert read_summary(client, acknowledged(), 0.0).mismatches == ["Location NL/TNM/LOC001: not stored"]


def test_a_connector_change_lost_is_a_mismatch(client: Client) -> None:
    """`Expected` did not track Connectors: the late Connector `tariff_ids` PATCH of every Location could be lost
    (the Connector keeping its Location PUT's tariff) and the demo still matched."""
    store(client, tariff="AC1")
    assert read_summary(client, acknowledged(), 0.0).mismatches == [
        "Connector NL/TNM/LOC001/LOC001-E1/1: tariff_ids ('AC1',), expected ('AC2',)"]


def test_a_session_status_change_lost_is_a_mismatch(client: Client) -> None:
    """session_status_history was never compared: a Session that went PENDING -> COMPLETED without the ACTIVE
    the CPO had pushed between (its row lost) still matched."""
    store(client, skip=("S1 ACTIVE",))
    assert read_summary(client, acknowledged(), 0.0).mismatches == [
        "session NL/TNM/S1: status history '' -> PENDING, ACTIVE -> COMPLETED, expected '' -> PENDING, "
        "PENDING -> ACTIVE, ACTIVE -> COMPLETED"]


def test_a_session_cost_not_as_sent_last_is_a_mismatch(client: Client) -> None:
    """A Session's stored total_cost was never compared with the one the CPO sent last (its final PUT or PATCH):
    a Session completed without it, or with another, still matched."""
    store(client, s1_cost="NULL, NULL")
    assert read_summary(client, acknowledged(), 0.0).mismatches == [
        "session NL/TNM/S1: total_cost None, expected (3.5, 4.235)"]


def test_an_evse_status_change_lost_is_a_mismatch(client: Client) -> None:
    """evse_status_history was never compared: an EVSE whose session's CHARGING and AVAILABLE rows were both lost
    (the chain '' -> AVAILABLE intact, the final status right) still matched."""
    store(client, evse_history=EVSE_HISTORY[:1])
    assert read_summary(client, acknowledged(), 0.0).mismatches == [
        "EVSE NL/TNM/LOC001/LOC001-E1: status history lacks AVAILABLE -> CHARGING at 2026-01-05T10:00:00Z",
        "EVSE NL/TNM/LOC001/LOC001-E1: status history lacks CHARGING -> AVAILABLE at 2026-01-05T12:00:00Z"]


def test_an_evse_status_sent_late_in_the_history_is_a_mismatch(client: Client) -> None:
    """A status PATCH sent late on purpose (older than the statuses acknowledged before it) must be stale: a
    history that applied it where its last_updated puts it still matched (chain and final status intact)."""
    store(client, evse_history=[EVSE_HISTORY[0], ("AVAILABLE", "OUTOFORDER", LATE),
                                ("OUTOFORDER", "CHARGING", EVSE_HISTORY[1][2]), EVSE_HISTORY[2]])
    assert read_summary(client, acknowledged(), 0.0).mismatches == [
        "EVSE NL/TNM/LOC001/LOC001-E1: status history lacks AVAILABLE -> CHARGING at 2026-01-05T10:00:00Z",
        "EVSE NL/TNM/LOC001/LOC001-E1: status history has AVAILABLE -> OUTOFORDER at 2025-12-07T12:00:00Z, "
        "which no push applied"]


def test_evse_history_of_overlapping_pushes_allows_either_order() -> None:
    """Two sessions' status pushes in flight at once reach the pipeline in either order: the older one applied
    (a row) or stale (none); the history of an EVSE then requires only what every order writes."""
    key = ("NL", "TNM", "LOC001", "LOC001-E1")
    expected = Expected()
    expected.observe_evse(key, "AVAILABLE", CREATED, (0, 1))
    expected.observe_evse(key, "CHARGING", NOW - timedelta(hours=2), (2, 5))  # in flight together
    expected.observe_evse(key, "OUTOFORDER", NOW - timedelta(hours=1), (3, 4))
    expected.observe_evse(key, "AVAILABLE", NOW, (6, 7))
    required, allowed = expected.evse_history_bounds(key)
    assert required == {("", "AVAILABLE", CREATED), ("OUTOFORDER", "AVAILABLE", NOW)}
    assert allowed == {("AVAILABLE", CREATED), ("CHARGING", NOW - timedelta(hours=2)),
                       ("OUTOFORDER", NOW - timedelta(hours=1)), ("AVAILABLE", NOW)}


@pytest.mark.parametrize("outcome", ["INVALID", "REJECTED", "CONFLICT", "ORPHANED"])
def test_an_acknowledged_push_not_applied_is_a_mismatch(client: Client, outcome: str) -> None:
    """Only PARKED was checked among the outcomes: an acknowledged push the pipeline did not apply (INVALID,
    REJECTED, CONFLICT, ORPHANED; the demo's pushes are all valid, in order or deliberately duplicate or stale)
    still matched whenever a later push happened to set the same state (here the raw events' count is right)."""
    store(client)
    client.command("INSERT INTO raw_events (event_id, module, country_code, party_id, object_id, received_at, "
                   f"outcome) VALUES ('e1', 'cdrs', 'NL', 'TNM', 'C1', {AT}, 'APPLIED'), "
                   f"('e2', 'cdrs', 'NL', 'TNM', 'C1', {AT}, '{outcome}')")
    expected = acknowledged()
    expected.events = 2
    assert read_summary(client, expected, 0.0).mismatches == [
        f"1 events {outcome}: an acknowledged push the pipeline did not apply (not a duplicate, not stale)"]


def test_a_dead_letter_or_a_refused_row_is_a_mismatch(client: Client) -> None:
    """The summary printed the dead letters and anomalies but the check ignored them: a record the rules failed on
    (its effects dropped, e.g. a reconciliation fact) or a row ClickHouse refused (ROW_REFUSED, the row lost)
    left the demo 'matching' whenever the rows compared happened not to depend on it."""
    store(client)
    client.insert("dead_letters", [dead_letter_row(DeadLetter("t.cdrs", 0, 7, b"NL/TNM/C1", b"\x00", "bad"),
                                                   datetime.now(UTC))], column_names=list(DEAD_LETTER_COLUMNS))
    client.command("INSERT INTO anomalies (kind, module, country_code, party_id, object_id, detail, observed_at) "
                   f"VALUES ('ROW_REFUSED', 'locations', 'NL', 'TNM', 'LOC001', 'evse_status_history', {AT}), "
                   f"('STALE_UPDATE', 'locations', 'NL', 'TNM', 'LOC001', '', {AT})")
    assert read_summary(client, acknowledged(), 0.0).mismatches == [
        "1 dead letters: records the pipeline could not process",
        "1 rows ClickHouse refused (anomalies ROW_REFUSED): rows lost"]



@pytest.mark.parametrize("kind", ["ILLEGAL_TRANSITION", "UPDATE_AFTER_FINAL", "FUTURE_LAST_UPDATED",
                                  "CREDIT_AMOUNT_MISMATCH", "EVSE_MISSING_FROM_PUT"])
def test_an_anomaly_the_traffic_cannot_cause_is_a_mismatch(client: Client, kind: str) -> None:
    """The summary printed the anomalies but the check looked at ROW_REFUSED only: a pipeline that flagged the
    simulated CPOs' legal pushes (an ILLEGAL_TRANSITION on PENDING -> ACTIVE, applied all the same; a
    FUTURE_LAST_UPDATED on a past timestamp ...) printed them and still 'matched'. The traffic's only anomalies are
    the stale pushes' STALE_UPDATE (and SESSION_IDLE, which depends on the wall clock and the configured idle time)."""
    store(client)
    client.command("INSERT INTO anomalies (kind, module, country_code, party_id, object_id, detail, observed_at) "
                   f"VALUES ('{kind}', 'sessions', 'NL', 'TNM', 'S1', '', {AT}), "
                   f"('STALE_UPDATE', 'locations', 'NL', 'TNM', 'LOC001', '', {AT}), "
                   f"('SESSION_IDLE', 'sessions', 'NL', 'TNM', 'S1', '', {AT})")
    assert read_summary(client, acknowledged(), 0.0).mismatches == [
        f"1 anomalies {kind}: none of the simulated pushes should raise one"]


def bec_line(cdr_id: str, kwh: int, excl: int, *, day: str = "2026-01-05", partner: str = "demo-cpo-be",
             location: str = "LOC001") -> str:
    """A billing line of BE/BEC, as SQL values."""
    return (f"('{day}', '{partner}', 'BE', 'BEC', '{location}', '{cdr_id}', 'EUR', false, {kwh}, {excl}, "
            f"{Decimal(excl) * VAT:.4f}, {AT}, 1)")


C2_LINE = "demo-cpo-be, LOC001, 2026-01-05, EUR, False, 20, 7, 8.4700"
C2_R_LINE = "demo-cpo-be, LOC001, 2026-01-05, EUR, False, 20, 6, 7.2600"


@pytest.mark.parametrize(("lines", "problems"), [
    pytest.param([bec_line("C2", 20, 7, day="2026-01-06"), bec_line("C2-R", 20, 6)], [
        f"CDR BE/BEC/C2: billing lines [demo-cpo-be, LOC001, 2026-01-06, EUR, False, 20.0000, 7.0000, 8.4700], "
        f"expected [{C2_LINE}]"], id="another day"),
    pytest.param([bec_line("C2", 20, 7, location="LOC002"), bec_line("C2-R", 20, 6)], [
        f"CDR BE/BEC/C2: billing lines [demo-cpo-be, LOC002, 2026-01-05, EUR, False, 20.0000, 7.0000, 8.4700], "
        f"expected [{C2_LINE}]"], id="another location"),
    pytest.param([bec_line("C2", 20, 7, partner="demo-cpo-nl"), bec_line("C2-R", 20, 6)], [
        f"CDR BE/BEC/C2: billing lines [demo-cpo-nl, LOC001, 2026-01-05, EUR, False, 20.0000, 7.0000, 8.4700], "
        f"expected [{C2_LINE}]"], id="another partner"),
    pytest.param([bec_line("C2", 25, 7), bec_line("C2-R", 15, 6)], [
        f"CDR BE/BEC/C2: billing lines [demo-cpo-be, LOC001, 2026-01-05, EUR, False, 25.0000, 7.0000, 8.4700], "
        f"expected [{C2_LINE}]",
        f"CDR BE/BEC/C2-R: billing lines [demo-cpo-be, LOC001, 2026-01-05, EUR, False, 15.0000, 6.0000, 7.2600], "
        f"expected [{C2_R_LINE}]"], id="kWh moved between lines"),
    pytest.param([bec_line("C2", 20, 7), bec_line("C2", 20, 7, day="2026-01-06"), bec_line("C2-R", 20, 6)], [
        "BE/BEC: (completed sessions, CDRs, kWh, cost excl. VAT, cost incl. VAT) billed (1, 4, 40.0000, 13.0000, "
        "15.7300), expected (1, 3, 20, 6, 7.2600)",
        "CDR BE/BEC/C2: billing lines [demo-cpo-be, LOC001, 2026-01-05, EUR, False, 20.0000, 7.0000, 8.4700; "
        f"demo-cpo-be, LOC001, 2026-01-06, EUR, False, 20.0000, 7.0000, 8.4700], expected [{C2_LINE}]"],
        id="a line twice")])
def test_a_billing_line_not_as_its_cdr_is_a_mismatch(client: Client, lines: list[str], problems: list[str]) -> None:
    """Billing was compared as totals per party only: a CDR's line moved to another day, location or partner (what
    billing_daily, the revenue report and the dashboards group and filter by), or kWh moved from one line to
    another, added up to the same totals, and the demo matched."""
    store(client)
    client.command("DELETE FROM billing_lines WHERE cdr_id IN ('C2', 'C2-R')")
    client.command("INSERT INTO billing_lines (day, partner_id, country_code, party_id, location_id, cdr_id, currency, "
                   "credit, energy_kwh, cost_excl_vat, cost_incl_vat, received_at, version) VALUES " + ", ".join(lines))
    assert read_summary(client, acknowledged(), 0.0).mismatches == problems


@pytest.mark.parametrize(("row", "problem"), [
    pytest.param("INSERT INTO sessions (country_code, party_id, session_id, status, kwh, payload_json, received_at, "
                 f"version) VALUES ('NL', 'TNM', 'S9', 'ACTIVE', 1, '{{}}', {AT}, 1)",
                 "session NL/TNM/S9: stored, no such Session acknowledged", id="session"),
    pytest.param("INSERT INTO locations (country_code, party_id, location_id, payload_json, version) "
                 "VALUES ('NL', 'TNM', 'LOC009', '{}', 1)",
                 "Location NL/TNM/LOC009: stored, no such Location acknowledged", id="location"),
    pytest.param("INSERT INTO evses (country_code, party_id, location_id, evse_uid, status, present, payload_json, "
                 "version) VALUES ('NL', 'TNM', 'LOC001', 'LOC001-E9', 'AVAILABLE', true, '{}', 1)",
                 "EVSE NL/TNM/LOC001/LOC001-E9: stored, no such EVSE acknowledged", id="EVSE"),
    pytest.param("INSERT INTO connectors (country_code, party_id, location_id, evse_uid, connector_id, tariff_ids, "
                 "present, payload_json, version) VALUES ('NL', 'TNM', 'LOC001', 'LOC001-E1', '2', ['AC1'], true, "
                 "'{}', 1)",
                 "Connector NL/TNM/LOC001/LOC001-E1/2: stored, no such Connector acknowledged", id="connector"),
    pytest.param("INSERT INTO reconciliation (country_code, party_id, subject, subject_id, outcome, event_time, "
                 f"version) VALUES ('NL', 'TNM', 'SESSION', 'S9', 'AWAITING_CDR', {AT}, 1)",
                 "SESSION NL/TNM/S9: reconciliation AWAITING_CDR, no such Session acknowledged", id="reconciliation"),
    pytest.param("INSERT INTO session_status_history (country_code, party_id, session_id, event_id, previous_status, "
                 f"status, transition, last_updated, received_at, version) VALUES ('NL', 'TNM', 'S9', 'e9', '', "
                 f"'ACTIVE', 'LEGAL', '2026-01-05 10:00:00', {AT}, 1)",
                 "session NL/TNM/S9: status history '' -> ACTIVE, no such Session acknowledged",
                 id="session status history"),
    pytest.param("INSERT INTO evse_status_history (country_code, party_id, location_id, evse_uid, event_id, "
                 "previous_status, status, changed_at, received_at, version) VALUES ('NL', 'TNM', 'LOC001', "
                 f"'LOC001-E9', 'e9', '', 'AVAILABLE', '2026-01-05 10:00:00', {AT}, 1)",
                 "EVSE NL/TNM/LOC001/LOC001-E9: status history '' -> AVAILABLE, no such EVSE acknowledged",
                 id="EVSE status history"),
])
def test_a_row_no_push_wrote_is_a_mismatch(client: Client, row: str, problem: str) -> None:
    """Only the objects the CPOs pushed were looked up: a Session, Location, EVSE, Connector, reconciliation or
    status history row that no acknowledged push made (an ACTIVE Session is not among the completed ones counted)
    still matched."""
    store(client)
    client.command(row)
    assert read_summary(client, acknowledged(), 0.0).mismatches == [problem]


@pytest.mark.parametrize(("link", "problem"), [
    pytest.param(f"('BE', 'BEC', 'C2-C', 'C2', 'AWAITING_ORIGINAL', NULL, {AT}, 2)",
                 "credit CDR BE/BEC/C2-C: credit link (C2, AWAITING_ORIGINAL, None), expected (C2, LINKED, True)",
                 id="not linked"),
    pytest.param(f"('BE', 'BEC', 'C2-C', 'C2', 'LINKED', false, {AT}, 2)",
                 "credit CDR BE/BEC/C2-C: credit link (C2, LINKED, False), expected (C2, LINKED, True)",
                 id="amounts said to differ"),
    pytest.param(f"('BE', 'BEC', 'C2-R', 'C2', 'DUPLICATE_CREDIT', true, {AT}, 1)",
                 "credit CDR BE/BEC/C2-R: credit link (C2, DUPLICATE_CREDIT, True), no such credit CDR acknowledged",
                 id="a link no credit made")])
def test_a_credit_link_not_as_acknowledged_is_a_mismatch(client: Client, link: str, problem: str) -> None:
    """The credit links were printed but never compared: a credit CDR left AWAITING_ORIGINAL (then
    UNKNOWN_REFERENCE, an anomaly to settle with the CPO) though its original was acknowledged before it, or
    linked with amounts said not to match, or a link no credit CDR made, still matched."""
    store(client)
    client.command("INSERT INTO credit_links (country_code, party_id, credit_cdr_id, credited_cdr_id, status, "
                   f"amount_matches, received_at, version) VALUES {link}")
    assert read_summary(client, acknowledged(), 0.0).mismatches == [problem]


@pytest.mark.parametrize(("change", "problem"), [
    ("total_energy = 11", "(S1, EUR, False, None, 11.0000, 3.5000, 4.2350), expected (S1, EUR, False, None, 10, 3.5, "
                          "4.2350)"),
    ("session_id = 'S2'", "(S2, EUR, False, None, 10.0000, 3.5000, 4.2350), expected (S1, EUR, False, None, 10, 3.5, "
                          "4.2350)")])
def test_a_cdr_not_stored_as_sent_is_a_mismatch(client: Client, change: str, problem: str) -> None:
    """The CDRs were counted and their billing lines added up, but the rows themselves never compared: a CDR
    stored with another kWh or Session than sent (its billing line right) still matched."""
    store(client)
    client.command(f"ALTER TABLE cdrs UPDATE {change} WHERE cdr_id = 'C1' SETTINGS mutations_sync = 2")
    assert read_summary(client, acknowledged(), 0.0).mismatches == [f"CDR NL/TNM/C1: stored {CDR_FIELDS} {problem}"]


async def test_the_wait_for_the_rows_includes_the_credit_links(client: Client) -> None:
    """The sink inserts a batch's tables side by side: a credit's link may become visible after the reconciliation
    rows the wait looked for, and the summary read then found it missing, a mismatch the next moment would not
    have had."""
    store(client, skip=("credit_links",))
    assert not await wait_for_rows(client, acknowledged(), 1.0)
    client.command("INSERT INTO credit_links (country_code, party_id, credit_cdr_id, credited_cdr_id, status, "
                   f"amount_matches, received_at, version) VALUES ('BE', 'BEC', 'C2-C', 'C2', 'LINKED', true, {AT}, 1)")
    assert await wait_for_rows(client, acknowledged(), 1.0)


async def test_the_wait_for_the_rows_stops_when_a_part_of_the_stack_has_exited(client: Client) -> None:
    """The wait polled ClickHouse only: a worker that had exited (a crash, the broker gone) left the demo waiting
    out the whole --timeout (two minutes by default) for rows nobody would write, before it said which part had
    exited. It checks the stack's children on every poll."""
    def worker_exited() -> None:
        raise StackError("the worker exited with code 1; see logs/worker.log")

    started = time.monotonic()
    with pytest.raises(StackError, match="the worker exited"):
        await wait_for_rows(client, acknowledged(), 60.0, check=worker_exited)
    assert time.monotonic() - started < 10


def test_mismatches_beyond_those_shown_are_counted(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first mismatches are listed; the rest were dropped without a word, so a run looked less broken than
    it was."""
    from pipeline import demo

    store(client, skip=("reconciliation",))
    every = read_summary(client, acknowledged(), 0.0).mismatches
    assert len(every) >= 2
    monkeypatch.setattr(demo, "_MISMATCHES_SHOWN", 1)
    assert read_summary(client, acknowledged(), 0.0).mismatches == [every[0], f"... and {len(every) - 1} more"]
