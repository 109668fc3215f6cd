"""Stage 2: sessions reconciled with CDRs (three matching keys, deltas, outcomes, lateness) and credit links."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from pipeline.facts import CdrFact, SessionFact, cdr_fact, decode_facts, encode_facts, session_fact
from pipeline.reconcile import (
    CREDIT_LINK_COLUMNS,
    RECONCILIATION_COLUMNS,
    Deltas,
    PartyOutput,
    PartyState,
    Rules,
    deltas,
    process_party,
    within_tolerance,
)
from pipeline.retention import Pseudonymizer

from .builders import PSEUDONYM_KEY, DictStore, cdr, event, session, ts

RULES = Rules(cdr_grace=timedelta(minutes=30), session_grace=timedelta(minutes=10),
              energy_tolerance=Decimal("0.01"), cost_tolerance=Decimal("0.01"), time_tolerance=timedelta(minutes=5))
PSEUDONYM = Pseudonymizer(PSEUDONYM_KEY)


def s_fact(body: dict[str, Any], *, version: int = 1, received: float = 0, final: float | None = None) -> SessionFact:
    payload = event("Session", body).payload
    return session_fact(payload, partner_id="p1", version=version, received_at=ts(received),
                        final_at=None if final is None else ts(final), pseudonym=PSEUDONYM)


def c_fact(body: dict[str, Any], *, received: float = 0) -> CdrFact:
    return cdr_fact(event("CDR", body).payload, partner_id="p1", received_at=ts(received), pseudonym=PSEUDONYM)


def completed(sid: str = "S1", **kw: Any) -> dict[str, Any]:
    kw.setdefault("kwh", "10")
    kw.setdefault("cost", "2.50")
    return session(sid, status="COMPLETED", end=60, updated=60, **kw)


class Party:
    def __init__(self) -> None:
        self.store = DictStore()

    def run(self, *facts: Any) -> PartyOutput:
        out = PartyOutput()
        overlay = self.store.overlay()
        process_party(PartyState("NL/TNM", overlay), list(facts), RULES, out)
        self.store.commit(overlay)
        return out


def result(out: PartyOutput, subject: str, subject_id: str) -> dict[str, Any]:
    found = [r for r in out.results if r["subject"] == subject and r["subject_id"] == subject_id]
    assert found, f"no {subject} {subject_id} row in {out.results}"
    return found[-1]


def test_deltas_are_cdr_minus_session_and_tolerances_apply() -> None:
    d = deltas(s_fact(completed(kwh="10", cost="2.50")), c_fact(cdr(kwh="10.004", cost="2.505", end=61)))
    assert d == Deltas(kwh=Decimal("0.0040"), cost_excl_vat=Decimal("0.0050"), start_s=Decimal("0.000000"),
                       end_s=Decimal("60.000000"))
    assert within_tolerance(d, RULES)
    assert not within_tolerance(Deltas(Decimal("0.02"), None, Decimal(0), None), RULES)
    assert not within_tolerance(Deltas(Decimal(0), Decimal("0.02"), Decimal(0), None), RULES)
    assert not within_tolerance(Deltas(Decimal(0), None, Decimal(301), None), RULES)


def test_match_by_session_id_with_exact_deltas() -> None:
    party = Party()
    first = party.run(s_fact(completed(), received=61, final=61))
    assert result(first, "SESSION", "S1")["outcome"] == "AWAITING_CDR"
    assert result(first, "SESSION", "S1")["due_at"] == ts(91)
    out = party.run(c_fact(cdr(kwh="10", cost="2.50"), received=70))
    row = result(out, "CDR", "C1")
    assert (row["outcome"], row["method"], row["session_id"]) == ("MATCHED", "SESSION_ID", "S1")
    assert (row["delta_kwh"], row["delta_cost_excl_vat"], row["delta_start_s"]) == (0, 0, 0)
    session_row = result(out, "SESSION", "S1")
    assert session_row["outcome"] == "MATCHED" and session_row["cdr_ids"] == ["C1"] and not session_row["late"]
    assert session_row["version"] > result(first, "SESSION", "S1")["version"]


def test_a_cdr_before_its_session_waits_then_matches() -> None:
    party = Party()
    waiting = party.run(c_fact(cdr(), received=0))
    assert result(waiting, "CDR", "C1")["outcome"] == "AWAITING_SESSION"
    assert result(waiting, "CDR", "C1")["due_at"] == ts(10)
    out = party.run(s_fact(completed(), received=5, final=5))
    assert result(out, "CDR", "C1")["outcome"] == "MATCHED" and not result(out, "CDR", "C1")["late"]
    assert result(out, "SESSION", "S1")["outcome"] == "MATCHED"


def test_a_session_arriving_after_the_grace_makes_a_late_match() -> None:
    party = Party()
    party.run(c_fact(cdr(), received=0))
    out = party.run(s_fact(completed(), received=20, final=20))
    assert result(out, "CDR", "C1")["late"] is True


def test_a_cdr_arriving_after_the_cdr_grace_makes_a_late_session_match() -> None:
    party = Party()
    party.run(s_fact(completed(), received=0, final=0))
    out = party.run(c_fact(cdr(), received=45))
    assert result(out, "SESSION", "S1")["late"] is True


def test_match_by_authorization_reference_when_the_cdr_has_no_session_id() -> None:
    party = Party()
    party.run(s_fact(completed("S7", authref="AUTH-1"), final=61),
              s_fact(completed("S8", authref="AUTH-2"), final=61))
    out = party.run(c_fact(cdr(session_id=None, authref="auth-2")))  # CiString: case-insensitive
    row = result(out, "CDR", "C1")
    assert (row["method"], row["session_id"]) == ("AUTHORIZATION_REFERENCE", "S8")


def test_match_by_token_location_and_start_within_the_tolerance() -> None:
    party = Party()
    party.run(s_fact(completed("S1", start=0), final=61), s_fact(completed("S2", start=120), final=200))
    near = party.run(c_fact(cdr("C1", session_id=None, start=2, end=62)))
    assert (result(near, "CDR", "C1")["method"], result(near, "CDR", "C1")["session_id"]) == (
        "TOKEN_LOCATION_START", "S1")
    far = party.run(c_fact(cdr("C2", session_id=None, start=60, end=90)))
    assert result(far, "CDR", "C2")["outcome"] == "AWAITING_SESSION"
    other_token = party.run(c_fact(cdr("C3", session_id=None, start=120, end=180, uid="TOK9")))
    assert result(other_token, "CDR", "C3")["outcome"] == "AWAITING_SESSION"


def test_a_waiting_cdr_is_matched_by_the_first_session_that_satisfies_a_key() -> None:
    party = Party()
    party.run(c_fact(cdr(session_id=None, authref="AUTH-1")))
    out = party.run(s_fact(completed("S5", authref="AUTH-1"), final=61))
    assert (result(out, "CDR", "C1")["method"], result(out, "CDR", "C1")["session_id"]) == (
        "AUTHORIZATION_REFERENCE", "S5")


def test_deltas_beyond_the_tolerance_are_a_mismatch() -> None:
    party = Party()
    party.run(s_fact(completed(kwh="10", cost="2.50"), final=61))
    out = party.run(c_fact(cdr(kwh="12", cost="2.50")))
    row = result(out, "CDR", "C1")
    assert row["outcome"] == "MISMATCH" and row["delta_kwh"] == Decimal(2)


def test_a_session_update_after_the_match_recomputes_the_cdr_deltas() -> None:
    party = Party()
    party.run(s_fact(completed(kwh="10"), final=61, version=1))
    first = party.run(c_fact(cdr(kwh="12")))
    out = party.run(s_fact(completed(kwh="12"), final=61, version=2))
    assert result(out, "CDR", "C1")["outcome"] == "MATCHED"
    assert result(out, "CDR", "C1")["version"] > result(first, "CDR", "C1")["version"]


def test_an_invalid_session_is_not_billable_and_a_cdr_for_it_is_an_anomaly() -> None:
    party = Party()
    out = party.run(s_fact(session(status="INVALID", updated=5), final=5))
    assert result(out, "SESSION", "S1")["outcome"] == "NOT_BILLABLE"
    out = party.run(c_fact(cdr()))
    assert [a.kind.value for a in out.anomalies] == ["CDR_FOR_INVALID_SESSION"]


def test_an_open_session_without_a_cdr_has_no_row_yet() -> None:
    assert Party().run(s_fact(session(status="ACTIVE"))).results == []


def test_facts_seen_before_change_nothing() -> None:
    party = Party()
    facts = [s_fact(completed(), final=61), c_fact(cdr())]
    party.run(*facts)
    out = party.run(*facts)
    assert out.results == [] and out.credit_links == []


def test_a_credit_links_to_the_cdr_it_credits() -> None:
    party = Party()
    party.run(c_fact(cdr("C1", cost="2.50")))
    out = party.run(c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1")))
    [link] = out.credit_links
    row = dict(zip(CREDIT_LINK_COLUMNS, link, strict=True))
    assert (row["status"], row["credited_cdr_id"], row["amount_matches"]) == ("LINKED", "C1", True)
    assert result(out, "CDR", "C1-C")["outcome"] == "CREDIT" and out.anomalies == []


def test_a_credit_before_its_original_waits_and_links_when_it_comes() -> None:
    party = Party()
    first = party.run(c_fact(cdr("C1-C", cost="-2.00", credit=True, credit_reference="C1"), received=0))
    assert dict(zip(CREDIT_LINK_COLUMNS, first.credit_links[0], strict=True))["status"] == "AWAITING_ORIGINAL"
    out = party.run(c_fact(cdr("C1", cost="2.50")))
    row = dict(zip(CREDIT_LINK_COLUMNS, out.credit_links[0], strict=True))
    assert (row["status"], row["amount_matches"]) == ("LINKED", False)
    assert [a.kind.value for a in out.anomalies] == ["CREDIT_AMOUNT_MISMATCH"]


def test_facts_round_trip_through_their_wire_form() -> None:
    facts = [s_fact(completed(authref="A")), c_fact(cdr(credit=True, credit_reference="C0", cost="-1"))]
    assert decode_facts(encode_facts(facts)) == facts


def test_reconciliation_rows_have_every_column() -> None:
    out = Party().run(s_fact(completed(), final=61))
    assert all(len(row) == len(RECONCILIATION_COLUMNS) for row in out.reconciliation)


def test_rows_of_two_parties_with_the_same_ids_in_one_batch_are_all_kept() -> None:
    from pipeline.agents import party_batch

    out = PartyOutput()
    for party in ("NL/TNM", "BE/BEC"):
        store = DictStore()
        process_party(PartyState(party, store.overlay()), [c_fact(cdr("C1"))], RULES, out)
    rows = party_batch(out, []).tables()["reconciliation"]
    assert sorted((r[0], r[1], r[3]) for r in rows) == [("BE", "BEC", "C1"), ("NL", "TNM", "C1")]


def test_a_cdr_is_matched_only_by_the_strongest_key_it_carries_whatever_the_order() -> None:
    # C2 names AUTH-2; S1 (same token, location and start) arrives first: C2 must wait for S2, not take S1.
    for order in ("cdr first", "session first"):
        party = Party()
        s1, s2 = s_fact(completed("S1"), final=61), s_fact(completed("S2", authref="AUTH-2"), final=61)
        c2 = c_fact(cdr("C2", session_id=None, authref="AUTH-2"))
        if order == "cdr first":
            party.run(c2)
            party.run(s1)
            assert party.run(s2) is not None
        else:
            party.run(s1)
            assert result(party.run(c2), "CDR", "C2")["outcome"] == "AWAITING_SESSION"
            party.run(s2)
        stored = PartyState("NL/TNM", party.store.overlay()).cdr("C2")
        assert stored is not None and (stored.session_id, stored.method) == ("S2", "AUTHORIZATION_REFERENCE"), order


def test_a_cdr_naming_an_unknown_session_is_not_given_to_another_one() -> None:
    party = Party()
    party.run(s_fact(completed("S1", authref="AUTH-1"), final=61))
    out = party.run(c_fact(cdr("C9", session_id="S9", authref="AUTH-1")))
    assert result(out, "CDR", "C9")["outcome"] == "AWAITING_SESSION"
