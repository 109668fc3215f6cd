"""The demo's summary and its check: read back from a store that holds rows written more than once
(at-least-once), and failing for every way the store differs from what the simulated CPOs were acknowledged."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from pipeline.demo import read_summary
from pipeline.projection import DEAD_LETTER_COLUMNS, dead_letter_row
from pipeline.records import DeadLetter
from pipeline.simulator import VAT, Expected, SimulatedParty

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
AT = "now64(6, 'UTC')"  # rows received now: the tables' retention TTLs keep them
TNM, BEC = SimulatedParty("NL", "TNM"), SimulatedParty("BE", "BEC")


def cdr_body(cdr_id: str, session_id: str, kwh: str, excl: str, credit_of: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cdr_id, "session_id": session_id, "total_energy": Decimal(kwh),
                            "total_cost": {"excl_vat": Decimal(excl), "incl_vat": (Decimal(excl) * VAT).quantize(
                                Decimal("0.0001"))}}
    if credit_of is not None:
        body.update(credit=True, credit_reference_id=credit_of)
    return body


def acknowledged() -> Expected:
    """What two simulated CPOs were told: a plain story at NL/TNM; at BE/BEC a story whose CDR was credited and
    corrected (re-priced)."""
    expected = Expected()
    for party, sid, kwh in ((TNM, "S1", "10"), (BEC, "S2", "20")):
        expected.observe_session((party.country_code, party.party_id, sid), NOW, status="COMPLETED",
                                 kwh=Decimal(kwh), periods=0, replace=True)
    expected.observe_cdr(TNM, cdr_body("C1", "S1", "10", "3.5"))
    expected.observe_cdr(BEC, cdr_body("C2", "S2", "20", "7"))
    expected.observe_cdr(BEC, cdr_body("C2-C", "S2", "20", "-7", credit_of="C2"))
    expected.observe_cdr(BEC, cdr_body("C2-R", "S2", "20", "6"), outcome="MISMATCH")
    expected.locations.add(("NL", "TNM", "LOC001"))
    expected.observe_evse(("NL", "TNM", "LOC001", "LOC001-E1"), "AVAILABLE", NOW)
    return expected


def store(client: Client, *, skip: tuple[str, ...] = (), reconciled: dict[str, str] | None = None) -> None:
    """Write what `acknowledged` says into the tables the demo reads, as the pipeline would (`skip`: leave out
    rows of that table or of that object; `reconciled`: another outcome for a CDR)."""
    outcomes = {"C1": "MATCHED", "C2": "CREDITED", "C2-C": "CREDIT", "C2-R": "MISMATCH", **(reconciled or {})}
    client.command("INSERT INTO sessions (country_code, party_id, session_id, status, kwh, payload_json, received_at, "
                   f"version) VALUES ('NL', 'TNM', 'S1', 'COMPLETED', 10, '{{}}', {AT}, 1), "
                   f"('BE', 'BEC', 'S2', 'COMPLETED', 20, '{{}}', {AT}, 1)")
    cdrs = [("NL", "TNM", "C1", "S1", "10", "3.5", "false", "NULL"),
            ("BE", "BEC", "C2", "S2", "20", "7", "false", "NULL"),
            ("BE", "BEC", "C2-C", "S2", "20", "-7", "true", "'C2'"),
            ("BE", "BEC", "C2-R", "S2", "20", "6", "false", "NULL")]
    values = ", ".join(
        f"('{cc}', '{pid}', '{cid}', '{sid}', 'LOC001', 'EUR', {kwh}, {excl}, {Decimal(excl) * VAT:.4f}, {credit}, "
        f"{of}, {AT}, {AT}, '{{}}', 1)"
        for cc, pid, cid, sid, kwh, excl, credit, of in cdrs if cid not in skip)
    client.command("INSERT INTO cdrs (country_code, party_id, cdr_id, session_id, location_id, currency, total_energy, "
                   "total_cost_excl_vat, total_cost_incl_vat, credit, credit_reference_id, end_date_time, received_at, "
                   f"payload_json, version) VALUES {values}")
    client.command("INSERT INTO credit_links (country_code, party_id, credit_cdr_id, credited_cdr_id, status, "
                   f"received_at, version) VALUES ('BE', 'BEC', 'C2-C', 'C2', 'LINKED', {AT}, 1)")
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
                     "(1, 0, 0, 0, 0), expected (1, 1, 10, 3.5, 4.2350)"]


def test_each_printed_figure_of_a_party_is_compared(client: Client) -> None:
    """The completed sessions, the CDR count and the cost incl. VAT per party are printed but were never compared:
    a CDR stored again with its incl_vat wrong (here the excl_vat) still matched."""
    store(client)
    client.command("INSERT INTO cdrs (country_code, party_id, cdr_id, session_id, location_id, currency, total_energy, "
                   "total_cost_excl_vat, total_cost_incl_vat, credit, end_date_time, received_at, payload_json, "
                   f"version) VALUES ('NL', 'TNM', 'C1', 'S1', 'LOC001', 'EUR', 10, 3.5, 3.5, false, {AT}, {AT}, "
                   "'{}', 2)")
    found = read_summary(client, acknowledged(), 0.0).mismatches
    assert found == ["NL/TNM: (completed sessions, CDRs, kWh, cost excl. VAT, cost incl. VAT) billed "
                     "(1, 1, 10.0000, 3.5000, 3.5000), expected (1, 1, 10, 3.5, 4.2350)"]


def test_a_location_not_stored_is_a_mismatch(client: Client) -> None:
    """The simulator collects every Location it pushed (`Expected.locations`), but the demo never compared them:
    a Location lost on the way (its EVSEs stored) still matched."""
    store(client, skip=("locations",))
    assert read_summary(client, acknowledged(), 0.0).mismatches == ["Location NL/TNM/LOC001: not stored"]
