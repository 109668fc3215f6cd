"""Stage 2: sessions reconciled with CDRs (three matching keys, deltas, outcomes, lateness) and credit links."""

from __future__ import annotations

import itertools
from datetime import timedelta
from decimal import Decimal
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.facts import CdrFact, Fact, SessionFact, cdr_fact, decode_facts, encode_facts, session_fact
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
    assert not within_tolerance(Deltas(Decimal(0), None, Decimal(0), Decimal(-301)), RULES)  # the end counts too
    # A tolerance is what a CDR "may differ and still match": a delta of exactly the tolerance matches.
    assert within_tolerance(Deltas(Decimal("-0.01"), Decimal("0.01"), Decimal(300), Decimal(-300)), RULES)


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


def test_a_fractional_time_tolerance_is_exact() -> None:
    """OCPI_RECONCILE_TIME_TOLERANCE=0.3: a start 0.3 s off is within it, as matching (timedeltas) holds it. The
    limit was the float 0.3 made a Decimal, 0.29999999999999998889..., so such a CDR was a MISMATCH."""
    rules = Rules(cdr_grace=RULES.cdr_grace, session_grace=RULES.session_grace,
                  energy_tolerance=RULES.energy_tolerance, cost_tolerance=RULES.cost_tolerance,
                  time_tolerance=timedelta(seconds=0.3))
    assert within_tolerance(Deltas(Decimal(0), None, Decimal("0.300000"), Decimal("-0.300000")), rules)
    assert not within_tolerance(Deltas(Decimal(0), None, Decimal("0.300001"), None), rules)


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


def link(out: PartyOutput, credit_id: str) -> dict[str, Any]:
    found = [dict(zip(CREDIT_LINK_COLUMNS, r, strict=True)) for r in out.credit_links]
    found = [r for r in found if r["credit_cdr_id"] == credit_id]
    assert found, f"no credit link of {credit_id} in {out.credit_links}"
    return found[-1]


def test_a_credit_takes_its_original_out_of_the_session_and_the_corrected_cdr_counts() -> None:
    party = Party()
    party.run(s_fact(completed("S1", kwh="10", cost="2.50"), received=61, final=61))
    party.run(c_fact(cdr("C1", kwh="12", cost="3.00"), received=62))
    credited = party.run(c_fact(cdr("C1-C", kwh="12", cost="-3.00", credit=True, credit_reference="C1"), received=63))
    original = result(credited, "CDR", "C1")
    assert (original["outcome"], original["session_id"], original["method"]) == ("CREDITED", None, "")
    assert result(credited, "SESSION", "S1")["outcome"] == "AWAITING_CDR"
    out = party.run(c_fact(cdr("C2", kwh="10", cost="2.50"), received=64))
    row = result(out, "SESSION", "S1")
    assert (row["outcome"], row["cdr_ids"], row["cdr_kwh"], row["delta_kwh"], row["cdr_cost_excl_vat"],
            row["delta_cost_excl_vat"]) == ("MATCHED", ["C2"], Decimal(10), Decimal(0), Decimal("2.50"), Decimal(0))
    assert result(out, "CDR", "C2")["outcome"] == "MATCHED"


def test_a_session_whose_only_cdr_is_credited_awaits_a_cdr_again_whichever_came_first() -> None:
    session_fact_, original = s_fact(completed("S1"), received=61, final=61), c_fact(cdr("C1"), received=62)
    credit = c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=63)
    party = Party()
    matched = party.run(session_fact_, original)
    out = party.run(credit)
    row = result(out, "SESSION", "S1")
    assert (row["outcome"], row["cdr_ids"], row["cdr_kwh"], row["due_at"]) == ("AWAITING_CDR", [], None, ts(91))
    assert row["version"] > result(matched, "SESSION", "S1")["version"]  # the sweep makes it MISSING_CDR at ts(91)
    assert link(out, "C1-C")["status"] == "LINKED"
    for order in itertools.permutations([session_fact_, original, credit]):
        rows = final_rows(order)
        assert (rows["SESSION", "S1"]["outcome"], rows["CDR", "C1"]["outcome"]) == ("AWAITING_CDR", "CREDITED")


def test_a_credited_cdr_frees_its_session_for_another_cdr_of_its_key() -> None:
    # No session ids: C1 and the corrected C2 both want S1 (nearest start); S2 goes to C3.
    facts = [s_fact(completed("S1", start=0), final=61), s_fact(completed("S2", start=2), received=1, final=61),
             c_fact(cdr("C1", session_id=None, start=0), received=2),
             c_fact(cdr("C1-C", session_id=None, cost="-2.50", credit=True, credit_reference="C1"), received=3),
             c_fact(cdr("C2", session_id=None, start=0), received=4),
             c_fact(cdr("C3", session_id=None, start=2), received=5)]
    party = Party()
    party.run(*facts[:3], facts[4], facts[5])
    assert (stored(party, "C1"), stored(party, "C2"), stored(party, "C3")) == (
        ("S1", "TOKEN_LOCATION_START"), ("S2", "TOKEN_LOCATION_START"), ("S2", "TOKEN_LOCATION_START"))
    out = party.run(facts[3])
    assert (stored(party, "C1"), stored(party, "C2"), stored(party, "C3")) == (
        (None, ""), ("S1", "TOKEN_LOCATION_START"), ("S2", "TOKEN_LOCATION_START"))
    assert result(out, "SESSION", "S1")["cdr_ids"] == ["C2"] and result(out, "SESSION", "S2")["cdr_ids"] == ["C3"]
    assert index_entries(party, "C1") == []


def test_a_second_credit_for_a_credited_cdr_is_a_duplicate_with_an_anomaly() -> None:
    party = Party()
    party.run(c_fact(cdr("C1", cost="2.50"), received=0))
    first = party.run(c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=1))
    assert link(first, "C1-C")["status"] == "LINKED" and first.anomalies == []
    second = party.run(c_fact(cdr("C1-C2", cost="-2.50", credit=True, credit_reference="C1"), received=2))
    row = link(second, "C1-C2")
    assert (row["status"], row["credited_cdr_id"], row["amount_matches"]) == ("DUPLICATE_CREDIT", "C1", True)
    assert [(a.kind.value, a.object_id) for a in second.anomalies] == [("DUPLICATE_CREDIT", "C1-C2")]
    assert second.reconciliation and all(r["subject_id"] == "C1-C2" for r in second.results)  # C1 is unchanged


def test_a_credit_whose_original_a_restored_state_lacks_does_not_replace_its_resolved_link() -> None:
    """A state restore replays the raw window only: a credit inside it whose original is older is found with no
    original and written AWAITING_ORIGINAL, at the version its LINKED or DUPLICATE_CREDIT row has (both come from the
    credit's event time). On that tie the later insert won: a DUPLICATE_CREDIT became billable again (the original
    refunded twice), and the deadline sweep then turned both credits UNKNOWN_REFERENCE with false anomalies."""
    party = Party()
    party.run(c_fact(cdr("C1", cost="2.50"), received=0))
    first = c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=1)
    second = c_fact(cdr("C1-C2", cost="-2.50", credit=True, credit_reference="C1"), received=2)
    resolved = {c: link(party.run(f), c) for c, f in (("C1-C", first), ("C1-C2", second))}
    restored = Party()  # the original is older than the raw window: not replayed
    for credit_id, fact in (("C1-C", first), ("C1-C2", second)):
        waiting = link(restored.run(fact), credit_id)
        assert waiting["status"] == "AWAITING_ORIGINAL"
        assert waiting["version"] < resolved[credit_id]["version"], credit_id  # ReplacingMergeTree keeps the resolved
    late = link(restored.run(c_fact(cdr("C1", cost="2.50"), received=3)), "C1-C")
    assert late["status"] == "LINKED" and late["version"] > resolved["C1-C"]["version"]  # a new fact still wins


def test_a_credit_of_a_credit_links_nothing_and_is_flagged_in_every_order() -> None:
    # OCPI credits a CDR; linked to the credit, it would refund the first CDR twice.
    original = c_fact(cdr("A", cost="2.50"), received=0)
    credit = c_fact(cdr("A-C", cost="-2.50", credit=True, credit_reference="A"), received=1)
    of_credit = c_fact(cdr("A-C-C", cost="2.50", credit=True, credit_reference="A-C"), received=2)
    for order in itertools.permutations([original, credit, of_credit]):
        party = Party()
        links: dict[str, str] = {}
        anomalies: set[tuple[str, str]] = set()
        for fact in order:
            out = party.run(fact)
            links |= {r[2]: r[5] for r in out.credit_links}
            anomalies |= {(a.kind.value, a.object_id) for a in out.anomalies}
        assert links == {"A-C": "LINKED", "A-C-C": "CREDIT_OF_CREDIT"}, order
        assert anomalies == {("CREDIT_OF_CREDIT", "A-C-C")}, order
        held = PartyState("NL/TNM", party.store.overlay()).cdr("A-C")
        assert held is not None and held.credited_by is None, order  # the credit itself stays as it is


def test_a_credit_that_names_itself_is_a_credit_of_a_credit() -> None:
    # It names a credit CDR (itself, in any case): neither a refund of a CDR that "never arrived" nor billed.
    party = Party()
    out = party.run(c_fact(cdr("x-c", cost="-2.50", credit=True, credit_reference="X-C"), received=0))
    row = link(out, "X-C")
    assert (row["status"], row["credited_cdr_id"]) == ("CREDIT_OF_CREDIT", "X-C")
    assert [(a.kind.value, a.object_id) for a in out.anomalies] == [("CREDIT_OF_CREDIT", "X-C")]
    assert index_entries(party, "X-C") == []  # nothing waits for it: no UNKNOWN_REFERENCE later


def test_of_two_credits_the_earliest_counts_whichever_arrives_first() -> None:
    original = c_fact(cdr("C1", cost="2.50"), received=0)
    early = c_fact(cdr("C1-A", cost="-2.50", credit=True, credit_reference="C1"), received=1)
    late = c_fact(cdr("C1-B", cost="-2.00", credit=True, credit_reference="C1"), received=2)
    for order in itertools.permutations([original, early, late]):
        party = Party()
        links: dict[str, dict[str, Any]] = {}
        anomalies = set()
        for fact in order:
            out = party.run(fact)
            for row in (dict(zip(CREDIT_LINK_COLUMNS, r, strict=True)) for r in out.credit_links):
                assert row["credit_cdr_id"] not in links or row["version"] > links[row["credit_cdr_id"]]["version"]
                links[row["credit_cdr_id"]] = row
            anomalies |= {(a.kind.value, a.object_id, a.observed_at) for a in out.anomalies}
        assert {k: r["status"] for k, r in links.items()} == {"C1-A": "LINKED", "C1-B": "DUPLICATE_CREDIT"}, order
        assert anomalies == {("DUPLICATE_CREDIT", "C1-B", ts(2)), ("CREDIT_AMOUNT_MISMATCH", "C1-B", ts(2))}, order


def test_a_cdr_held_by_a_session_that_becomes_invalid_is_an_anomaly_in_either_order() -> None:
    active = s_fact(session("S1", status="ACTIVE", kwh="10"), version=1, received=30)
    invalid = s_fact(session("S1", status="INVALID", kwh="10", end=60, updated=60), version=2, received=61, final=61)
    the_cdr = c_fact(cdr("C1", kwh="10", cost="2.50"), received=50)
    found = []
    for order in ([active, invalid, the_cdr], [active, the_cdr, invalid]):
        party = Party()
        found.append([(a.kind.value, a.object_id, a.event_id, a.detail, a.observed_at)
                      for fact in order for a in party.run(fact).anomalies])
    assert found[0] == found[1] == [("CDR_FOR_INVALID_SESSION", "C1", "C1", "session S1 is INVALID (not billable)",
                                     ts(61))]


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


# --- the key cascade -------------------------------------------------------------------------------------------


def stored(party: Party, cdr_id: str) -> tuple[str | None, str]:
    rec = PartyState("NL/TNM", party.store.overlay()).cdr(cdr_id)
    assert rec is not None
    return rec.session_id, rec.method


def index_entries(party: Party, cdr_id: str) -> list[str]:
    """The waiting-index keys (`W?/NL/TNM/<key>`) that hold a CDR."""
    return sorted(k for k, v in party.store.data.items() if k.startswith("W") and cdr_id.encode() in v)


def tick(party: Party, minutes: float) -> PartyOutput:
    """A fact of another token and location received at `minutes`: the party's event time moves on."""
    return party.run(s_fact(session(f"TICK{minutes}", uid="TICK", location="ELSEWHERE"), received=minutes))


def test_a_cdr_whose_session_id_is_unknown_falls_back_to_its_authorization_reference_after_its_grace() -> None:
    party = Party()
    party.run(s_fact(completed("S1", authref="AUTH-1"), final=61))
    waiting = result(party.run(c_fact(cdr("C9", session_id="S9", authref="AUTH-1"))), "CDR", "C9")
    assert (waiting["outcome"], waiting["session_id"]) == ("AWAITING_SESSION", None)  # S9 may still come
    tick(party, 30)  # its grace (10 minutes) is over, but not the hour in which it ended
    assert stored(party, "C9") == (None, "")
    row = result(tick(party, 70), "CDR", "C9")  # the hour in which its grace ended is over: it falls back
    assert (row["outcome"], row["method"], row["session_id"], row["late"]) == (
        "MATCHED", "AUTHORIZATION_REFERENCE", "S1", True)


def test_a_cdr_falls_back_to_token_location_and_start_when_no_session_has_its_reference() -> None:
    party = Party()
    party.run(s_fact(completed("S1", start=0), final=61))
    party.run(c_fact(cdr("C9", session_id="S9", authref="AUTH-9", start=1, end=61)))
    row = result(tick(party, 70), "CDR", "C9")
    assert (row["outcome"], row["method"], row["session_id"], row["delta_start_s"]) == (
        "MATCHED", "TOKEN_LOCATION_START", "S1", Decimal(60))


def test_the_session_a_provisionally_matched_cdr_names_takes_it_and_the_one_it_left_lacks_a_cdr_again() -> None:
    party = Party()
    first = party.run(s_fact(completed("S1", authref="AUTH-1"), received=61, final=61))
    party.run(c_fact(cdr("C9", session_id="S9", authref="AUTH-1", kwh="12"), received=62))
    assert index_entries(party, "C9") == ["WS/NL/TNM/S9"]  # waits for S9 alone during its grace
    matched = tick(party, 130)  # its grace ended at 72, in the hour after T0's: over at 120
    # Taken by S1 (MISMATCH: C9 bills 12 kWh against S1's 10).
    assert (result(matched, "SESSION", "S1")["outcome"], result(matched, "SESSION", "S1")["cdr_ids"]) == (
        "MISMATCH", ["C9"])
    assert index_entries(party, "C9") == ["WS/NL/TNM/S9"]  # the one stronger key left to it
    out = party.run(s_fact(completed("S9", kwh="12"), received=133, final=133))
    row = result(out, "CDR", "C9")
    assert (row["outcome"], row["method"], row["session_id"], row["delta_kwh"]) == (
        "MATCHED", "SESSION_ID", "S9", Decimal(0))
    assert row["version"] > result(matched, "CDR", "C9")["version"]
    left = result(out, "SESSION", "S1")  # left at 133, past its deadline (91): missing its CDR, not waiting
    assert (left["outcome"], left["method"], left["cdr_ids"], left["cdr_kwh"], left["due_at"]) == (
        "MISSING_CDR", "", [], None, ts(91))
    assert left["version"] > result(matched, "SESSION", "S1")["version"] > result(first, "SESSION", "S1")["version"]
    assert result(out, "SESSION", "S9")["cdr_ids"] == ["C9"]
    assert index_entries(party, "C9") == []  # a session id match is final


def test_a_session_left_by_one_cdr_keeps_the_totals_of_the_others() -> None:
    party = Party()
    party.run(s_fact(completed("S1", authref="AUTH-1"), final=61), c_fact(cdr("C1", kwh="10")),
              c_fact(cdr("C9", session_id="S9", authref="AUTH-1", kwh="3")))
    tick(party, 70)
    out = party.run(s_fact(completed("S9"), final=61, received=71))
    row = result(out, "SESSION", "S1")
    assert (row["outcome"], row["method"], row["cdr_ids"], row["cdr_kwh"]) == (
        "MATCHED", "SESSION_ID", ["C1"], Decimal(10))


def test_a_token_match_moves_to_a_session_that_arrives_with_the_cdrs_reference() -> None:
    party = Party()
    party.run(s_fact(completed("S1"), final=61), c_fact(cdr("C1", session_id=None, authref="AUTH-2")))
    assert stored(party, "C1") == ("S1", "TOKEN_LOCATION_START")
    out = party.run(s_fact(completed("S2", authref="AUTH-2", start=30), final=61))
    assert stored(party, "C1") == ("S2", "AUTHORIZATION_REFERENCE")
    assert result(out, "SESSION", "S1")["outcome"] == "AWAITING_CDR"


def test_a_waiting_cdr_is_taken_by_a_weaker_key_then_upgraded() -> None:
    party = Party()
    party.run(c_fact(cdr("C9", session_id="S9", authref="AUTH-1")))
    tick(party, 70)
    party.run(s_fact(completed("S1"), final=61, received=71))
    assert stored(party, "C9") == ("S1", "TOKEN_LOCATION_START")
    party.run(s_fact(completed("S2", authref="AUTH-1", start=30), final=61, received=72))
    assert stored(party, "C9") == ("S2", "AUTHORIZATION_REFERENCE")
    party.run(s_fact(completed("S9", start=60), final=61, received=73))
    assert stored(party, "C9") == ("S9", "SESSION_ID")


def test_a_nearer_session_of_the_same_key_takes_a_provisional_match() -> None:
    party = Party()
    party.run(s_fact(completed("S1", start=0), final=61), c_fact(cdr("C1", session_id=None, start=3, end=63)))
    assert stored(party, "C1") == ("S1", "TOKEN_LOCATION_START")
    party.run(s_fact(completed("S2", start=3), final=61))
    assert stored(party, "C1") == ("S2", "TOKEN_LOCATION_START")


def test_a_session_that_changes_its_reference_lets_its_cdr_fall_back() -> None:
    party = Party()
    party.run(s_fact(completed("S1", authref="AUTH-1", uid="TOK7"), final=61, version=1),
              s_fact(completed("S2", start=2), final=61), c_fact(cdr("C1", session_id=None, authref="AUTH-1")))
    assert stored(party, "C1") == ("S1", "AUTHORIZATION_REFERENCE")
    out = party.run(s_fact(completed("S1", authref="AUTH-X", uid="TOK7"), final=61, version=2))
    assert stored(party, "C1") == ("S2", "TOKEN_LOCATION_START")
    assert result(out, "SESSION", "S1")["outcome"] == "AWAITING_CDR"


def test_cdrs_of_one_key_prefer_sessions_no_other_cdr_holds() -> None:
    party = Party()
    party.run(s_fact(completed("S1", authref="AUTH-1", start=0), final=61),
              s_fact(completed("S2", authref="AUTH-1", start=1), final=61),
              c_fact(cdr("C2", session_id=None, authref="AUTH-1", start=0)),
              c_fact(cdr("C1", session_id="S1", authref="AUTH-1", start=0)))
    assert (stored(party, "C1"), stored(party, "C2")) == (("S1", "SESSION_ID"), ("S2", "AUTHORIZATION_REFERENCE"))


def test_after_its_grace_a_cdr_is_settled_but_the_session_it_names_still_takes_it() -> None:
    party = Party()
    party.run(s_fact(completed("S1", start=0), final=61), c_fact(cdr("C9", session_id="S9", start=3, end=63)))
    tick(party, 70)  # falls back after its grace: a token match, settled at once
    party.run(s_fact(completed("S2", start=3), received=80, final=61))  # nearer, but C9 is settled
    assert stored(party, "C9") == ("S1", "TOKEN_LOCATION_START")
    assert index_entries(party, "C9") == ["WS/NL/TNM/S9"]  # its own key's entry is gone
    out = party.run(s_fact(completed("S9", start=3), received=90, final=61))
    assert stored(party, "C9") == ("S9", "SESSION_ID") and result(out, "CDR", "C9")["late"] is True
    assert index_entries(party, "C9") == []


def test_a_settled_match_is_undone_when_its_session_loses_the_key() -> None:
    party = Party()
    party.run(s_fact(completed("S1", start=0), final=61, version=1), c_fact(cdr("C1", session_id=None, start=0)))
    out = party.run(s_fact(completed("S1", start=0, location="LOC2"), received=30, final=61, version=2))
    # Past the CDR's grace (10): it has no session now, and waits no more.
    assert stored(party, "C1") == (None, "") and result(out, "CDR", "C1")["outcome"] == "NO_SESSION"
    assert result(out, "SESSION", "S1")["outcome"] == "AWAITING_CDR"


def test_a_waiting_cdr_past_its_grace_waits_under_its_strongest_key_only() -> None:
    party = Party()
    party.run(c_fact(cdr("C9", session_id="S9", authref="AUTH-1")))
    party.run(s_fact(completed("S1", authref="AUTH-1"), received=30, final=30))
    assert stored(party, "C9") == (None, "") and index_entries(party, "C9") == ["WS/NL/TNM/S9"]


# Small scenarios whose facts arrive within one grace: every order must end with the same rows.
SCENARIOS = {
    "named session beats reference": [
        s_fact(completed("S1", authref="AUTH-1", start=0), final=61),
        s_fact(completed("S2", authref="AUTH-1", start=2), received=1, final=61),
        c_fact(cdr("C1", session_id="S2", authref="AUTH-1", start=2), received=2),
        c_fact(cdr("C2", session_id=None, authref="AUTH-1", start=1), received=3)],
    "reference added by an update beats token": [
        s_fact(session("S1", start=0), version=1),
        s_fact(completed("S1", authref="AUTH-1", start=0), version=2, received=1, final=1),
        s_fact(completed("S3", start=3), received=2, final=61),
        c_fact(cdr("C1", session_id=None, authref="AUTH-1", start=3), received=3)],
    "two cdrs, two sessions, one token": [
        s_fact(completed("S1", start=0), final=61), s_fact(completed("S2", start=1), received=1, final=61),
        c_fact(cdr("C1", session_id=None, start=0), received=2), c_fact(cdr("C2", session_id=None, start=0),
                                                                        received=3)],
    "a session freed by an upgrade goes to the cdr nearest to it": [
        s_fact(completed("S1", authref="AUTH-1", start=0), final=61),
        s_fact(completed("S2", authref="AUTH-1", start=1), received=1, final=61),
        s_fact(completed("S9", uid="TOK9", start=0), received=2, final=61),
        c_fact(cdr("C1", session_id="S9", authref="AUTH-1", start=0), received=3),
        c_fact(cdr("C2", session_id=None, authref="AUTH-1", start=0), received=4)],
    "unknown session id, reference, then token": [
        s_fact(completed("S1", start=0), final=61),
        s_fact(completed("S2", authref="AUTH-1", start=4), received=1, final=61),
        c_fact(cdr("C9", session_id="S9", authref="AUTH-1", start=0), received=2)],
    "a credit cancels its original, the corrected cdr counts": [
        s_fact(completed("S1", kwh="10", cost="2.50"), final=61),
        c_fact(cdr("C1", kwh="12", cost="3.00"), received=1),
        c_fact(cdr("C1-C", kwh="12", cost="-3.00", credit=True, credit_reference="C1"), received=2),
        c_fact(cdr("C2", kwh="10", cost="2.50"), received=3)],
    "two credits for one cdr": [
        s_fact(completed("S1"), final=61), c_fact(cdr("C1"), received=1),
        c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=2),
        c_fact(cdr("C1-C2", cost="-2.50", credit=True, credit_reference="C1"), received=3)],
    "a credited cdr frees its session for another of its key": [
        s_fact(completed("S1", start=0), final=61), s_fact(completed("S2", start=2), received=1, final=61),
        c_fact(cdr("C1", session_id=None, start=0), received=2),
        c_fact(cdr("C1-C", session_id=None, cost="-2.50", credit=True, credit_reference="C1"), received=3),
        c_fact(cdr("C2", session_id=None, start=0), received=4)],
}


Outputs = tuple[dict[tuple[str, str], dict[str, Any]], dict[str, dict[str, Any]], dict[tuple[str, str], Any]]


def final_outputs(facts: tuple[Fact, ...]) -> Outputs:
    """When `facts` arrive one by one: the last row of every subject, the last link of every credit (versions must
    only grow) and every anomaly ((kind, object) → (detail, observed_at)); reprocessing must change nothing."""
    party = Party()
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    links: dict[str, dict[str, Any]] = {}
    anomalies: dict[tuple[str, str], Any] = {}
    for fact in facts:
        out = party.run(fact)
        for row in out.results:
            subject = row["subject"], row["subject_id"]
            assert subject not in latest or row["version"] > latest[subject]["version"], row
            latest[subject] = row
        for row in (dict(zip(CREDIT_LINK_COLUMNS, r, strict=True)) for r in out.credit_links):
            assert row["credit_cdr_id"] not in links or row["version"] > links[row["credit_cdr_id"]]["version"], row
            links[row["credit_cdr_id"]] = row
        anomalies |= {(a.kind.value, a.object_id): (a.detail, a.observed_at) for a in out.anomalies}
    again = party.run(*facts)  # reprocessing changes nothing
    assert (again.results, again.credit_links, again.anomalies) == ([], [], [])
    return ({k: {c: v for c, v in row.items() if c not in ("late", "version")} for k, row in latest.items()},
            {k: {c: v for c, v in row.items() if c != "version"} for k, row in links.items()}, anomalies)


def final_rows(facts: tuple[Fact, ...]) -> dict[tuple[str, str], dict[str, Any]]:
    """The last row of every subject when `facts` arrive one by one (versions must only grow)."""
    return final_outputs(facts)[0]


def test_every_arrival_order_ends_with_the_same_rows() -> None:
    for name, facts in SCENARIOS.items():
        orders = [final_rows(order) for order in itertools.permutations(facts)]
        assert all(rows == orders[0] for rows in orders), name
    rows = final_rows(tuple(SCENARIOS["named session beats reference"]))
    assert [(r["subject_id"], r["method"], r["session_id"]) for k, r in sorted(rows.items()) if k[0] == "CDR"] == [
        ("C1", "SESSION_ID", "S2"), ("C2", "AUTHORIZATION_REFERENCE", "S1")]
    rows = final_rows(tuple(SCENARIOS["two cdrs, two sessions, one token"]))
    assert [(r["subject_id"], r["session_id"]) for k, r in sorted(rows.items()) if k[0] == "CDR"] == [
        ("C1", "S1"), ("C2", "S2")]
    rows = final_rows(tuple(SCENARIOS["a credited cdr frees its session for another of its key"]))
    assert [(r["subject_id"], r["outcome"], r["session_id"]) for k, r in sorted(rows.items()) if k[0] == "CDR"] == [
        ("C1", "CREDITED", None), ("C1-C", "CREDIT", None), ("C2", "MATCHED", "S1")]


@st.composite
def credit_scenarios(draw: st.DrawFn) -> list[Fact]:
    """Sessions (some opened first, completed or invalidated by an update), CDRs and credits (one or two per
    credited CDR), all within one grace: keys drawn from few values, so they collide."""
    facts: list[Fact] = []
    keys = {"authref": st.sampled_from([None, "A1", "A2"]), "start": st.sampled_from([0, 1, 3, 7]),
            "uid": st.sampled_from(["T1", "T1", "T2"])}
    for i in range(draw(st.integers(1, 2))):
        key = {name: draw(values) for name, values in keys.items()}
        if draw(st.booleans()):
            facts.append(s_fact(session(f"S{i}", **key), version=1, received=i))
        status = draw(st.sampled_from(["COMPLETED", "COMPLETED", "INVALID"]))
        facts.append(s_fact(session(f"S{i}", status=status, end=60, updated=60, kwh="10", cost="2.50", **key),
                            version=2, received=i + 0.5, final=61))
    cdrs = draw(st.integers(1, 3))
    for j in range(cdrs):
        facts.append(c_fact(cdr(f"C{j}", session_id=draw(st.sampled_from([None, None, "S0", "S1", "S9"])),
                                kwh=draw(st.sampled_from(["10", "12"])),
                                **{name: draw(values) for name, values in keys.items()}), received=3 + j))
    for j in sorted(draw(st.sets(st.integers(0, cdrs - 1), max_size=2))):
        for k in range(draw(st.integers(1, 2))):
            facts.append(c_fact(cdr(f"C{j}-C{k}", session_id=None, credit=True, credit_reference=f"C{j}",
                                    cost=draw(st.sampled_from(["-2.50", "-2.00"]))),
                                received=draw(st.sampled_from([6, 7]))))
    if draw(st.booleans()):  # a credit of a credit (CREDIT_OF_CREDIT), whether that credit comes or not
        facts.append(c_fact(cdr("C0-C0-C", session_id=None, credit=True, credit_reference="C0-C0", cost="-2.50"),
                            received=8))
    return facts


def _settled_anomalies(facts: list[Fact], outputs: Outputs) -> dict[tuple[str, str], Any]:
    """The anomalies every order must agree on: all but CDR_FOR_INVALID_SESSION of a CDR that no INVALID session
    holds in the end (a provisional match that moved on, or a CDR credited afterwards, keeps the anomaly it got:
    anomaly rows are not withdrawn)."""
    rows, _links, anomalies = outputs
    last: dict[str, SessionFact] = {}
    for fact in facts:
        if isinstance(fact, SessionFact) and (fact.session_id not in last
                                              or fact.version > last[fact.session_id].version):
            last[fact.session_id] = fact
    held = {r["subject_id"] for (subject, _id), r in rows.items() if subject == "CDR" and r["session_id"]
            and last[r["session_id"]].status == "INVALID"}
    assert held <= {cdr_id for kind, cdr_id in anomalies if kind == "CDR_FOR_INVALID_SESSION"}
    return {k: v for k, v in anomalies.items() if k[0] != "CDR_FOR_INVALID_SESSION" or k[1] in held}


@given(data=st.data())
@settings(max_examples=300, deadline=None, database=None)
def test_every_arrival_order_of_sessions_cdrs_and_credits_ends_alike(data: st.DataObject) -> None:
    facts = data.draw(credit_scenarios())
    first, second = (final_outputs(tuple(data.draw(st.permutations(facts)))) for _ in range(2))
    assert first[:2] == second[:2]
    assert _settled_anomalies(facts, first) == _settled_anomalies(facts, second)


def test_reprocessing_a_batch_after_moves_changes_nothing() -> None:
    party = Party()
    facts = SCENARIOS["unknown session id, reference, then token"]
    for fact in reversed(facts):
        party.run(fact)
    before = dict(party.store.data)
    assert party.run(*facts).results == [] and party.store.data == before


def test_token_matches_cross_the_hour_a_group_is_kept_by() -> None:
    # T0 is on the hour: the session starts in the hour before, its CDR (4 minutes later) in the next one.
    for facts in itertools.permutations([s_fact(completed("S1", start=-2), final=61),
                                         c_fact(cdr("C1", session_id=None, start=2, end=62))]):
        party = Party()
        out = party.run(*facts)
        assert (result(out, "CDR", "C1")["method"], result(out, "CDR", "C1")["session_id"]) == (
            "TOKEN_LOCATION_START", "S1")


def test_a_backlog_of_cdrs_sharing_one_token_keeps_every_token_group_small() -> None:
    # An ad-hoc token shared by every session of a location, and CDRs arriving ahead of their sessions (a
    # backlog after an outage). CDRs naming their session wait for it alone; the others are in token groups
    # of an hour each, not in one group of all (each group is matched again as a whole when it changes).
    party = Party()
    party.run(*(c_fact(cdr(f"C{i}", session_id=f"S{i}", start=20 * i, end=20 * i + 15)) for i in range(300)))
    assert not [key for key in party.store.data if key.startswith(("WT/", "WA/"))]
    party.run(*(c_fact(cdr(f"N{i}", session_id=None, start=20 * i, end=20 * i + 15)) for i in range(300)))
    assert len([key for key in party.store.data if key.startswith("WT/")]) == 100  # three per hour
    out = party.run(*(s_fact(completed(f"S{i}", start=20 * i), final=20 * i + 16) for i in range(300)))
    named = {(r["subject_id"], r["session_id"], r["method"]) for r in out.results
             if r["subject"] == "CDR" and r["subject_id"].startswith("C")}
    assert named == {(f"C{i}", f"S{i}", "SESSION_ID") for i in range(300)}
    assert {stored(party, f"N{i}") for i in range(300)} == {(f"S{i}", "TOKEN_LOCATION_START") for i in range(300)}


def test_a_cdr_naming_a_session_that_comes_within_its_grace_never_goes_to_another() -> None:
    party = Party()
    party.run(s_fact(completed("S1", authref="AUTH-1"), final=61))
    early = party.run(c_fact(cdr("C9", session_id="S9", authref="AUTH-1")))
    assert result(early, "CDR", "C9")["outcome"] == "AWAITING_SESSION"
    out = party.run(s_fact(completed("S9"), received=5, final=61))
    assert stored(party, "C9") == ("S9", "SESSION_ID")
    assert all(r["subject_id"] != "S1" for r in [*early.results, *out.results])  # S1 was never given C9
    tick(party, 200)
    assert stored(party, "C9") == ("S9", "SESSION_ID")


def test_a_later_fact_supersedes_the_row_of_a_worker_that_saw_the_facts_in_another_order() -> None:
    # A rebuild's worker reads the party's facts in another order than the live worker did, so it counts other
    # rows; after the swap the live worker's next row, caused by a later fact, must still win (versions by event
    # time, not by row count).
    s1 = s_fact(completed("S1", kwh="20", cost="5.00"), received=61, final=61)
    c1 = c_fact(cdr("C1", kwh="10", cost="2.50"), received=62)
    c2 = c_fact(cdr("C2", kwh="10", cost="2.50"), received=63)
    credit = c_fact(cdr("C1-C", kwh="10", cost="-2.50", credit=True, credit_reference="C1"), received=70)
    live, rebuild = Party(), Party()
    for fact in (c1, c2, s1):
        live.run(fact)
    rebuilt = [rebuild.run(fact) for fact in (s1, c1, c2)][-1]
    after = live.run(credit)
    swapped_in, newer = result(rebuilt, "SESSION", "S1"), result(after, "SESSION", "S1")
    assert newer["cdr_ids"] == ["C2"] and newer["version"] > swapped_in["version"]


def test_a_cdr_in_another_currency_than_its_session_is_a_mismatch_without_a_cost_delta() -> None:
    party = Party()
    party.run(s_fact(completed(), received=61, final=61))
    chf = {**cdr(kwh="10", cost="2.50"), "currency": "CHF"}
    out = party.run(c_fact(chf, received=70))
    row = result(out, "CDR", "C1")
    assert (row["outcome"], row["currency"], row["delta_cost_excl_vat"], row["delta_kwh"]) == (
        "MISMATCH", "CHF", None, Decimal("0.0000"))
    session_row = result(out, "SESSION", "S1")
    # Its CDR's cost is not summed into the session's currency: what the session is billed cannot be compared.
    assert (session_row["outcome"], session_row["currency"], session_row["cdr_cost_excl_vat"],
            session_row["delta_cost_excl_vat"]) == ("MISMATCH", "EUR", None, None)
    same = Party()
    same.run(s_fact(completed(), received=61, final=61))
    assert result(same.run(c_fact(cdr(kwh="10", cost="2.50"), received=70)), "CDR", "C1")["currency"] == "EUR"


def test_a_session_billed_twice_is_a_mismatch_though_each_cdr_matches_it() -> None:
    # Two CDRs of one charge, both naming the session: each matches it alone, but together they bill it twice.
    party = Party()
    party.run(s_fact(completed("S1"), received=61, final=61))
    one = party.run(c_fact(cdr("C1", kwh="10", cost="2.50"), received=62))
    assert result(one, "SESSION", "S1")["outcome"] == "MATCHED"
    two = party.run(c_fact(cdr("C2", kwh="10", cost="2.50"), received=63))
    assert result(two, "CDR", "C2")["outcome"] == "MATCHED"
    row = result(two, "SESSION", "S1")
    assert (row["outcome"], row["cdr_ids"], row["delta_kwh"], row["delta_cost_excl_vat"]) == (
        "MISMATCH", ["C1", "C2"], Decimal(10), Decimal("2.50"))
    # One charge split over two CDRs bills the session once: its row is MATCHED (each CDR row compares the part).
    split = Party()
    split.run(s_fact(completed("S1"), received=61, final=61))
    split.run(c_fact(cdr("C1", kwh="5", cost="1.25"), received=62))
    assert result(split.run(c_fact(cdr("C2", kwh="5", cost="1.25"), received=63)), "SESSION", "S1")["outcome"] == (
        "MATCHED")


def test_a_cdr_seen_again_after_a_partial_state_restore_is_listed_once_by_its_session() -> None:
    # A crash in the middle of a multi-batch changelog write can restore the session's record (listing C1) without
    # C1's own record: C1's fact, delivered again, is then new to stage 2 and matched to S1 once more. The session
    # listed C1 twice, counted its kWh and cost twice, and its row said MISMATCH while C1's said MATCHED.
    party = Party()
    party.run(s_fact(completed("S1"), received=61, final=61))
    party.run(c_fact(cdr("C1", kwh="10", cost="2.50"), received=62))
    del party.store.data["C/NL/TNM/C1"]  # C1's record lost, the session's kept
    row = result(party.run(c_fact(cdr("C1", kwh="10", cost="2.50"), received=62)), "SESSION", "S1")
    assert (row["outcome"], row["cdr_ids"], row["cdr_kwh"]) == ("MATCHED", ["C1"], Decimal(10))


def test_a_session_restored_listing_a_cdr_that_left_it_counts_only_the_cdrs_that_hold_it() -> None:
    # The other partial restore (a stage-2 state split over several changelog batches, README): the credit's batch
    # wrote C1's record (credited, matched to nothing) before the session's (C1 left), and the crash came between.
    # The batch read again changes nothing (the credit is known), so the session still lists C1: its next change
    # raised KeyError on C1's empty method, and the whole party-facts record (every fact of the party in it) went
    # to dead letters, again at every later change of the session.
    party = Party()
    party.run(s_fact(session("S1", status="ACTIVE"), received=0), c_fact(cdr("C1"), received=1))
    before = dict(party.store.data)
    credit = c_fact(cdr("C1-C", session_id=None, credit=True, credit_reference="C1", cost="-2.50"), received=2)
    party.run(credit)
    party.store.data["S/NL/TNM/S1"] = before["S/NL/TNM/S1"]  # the session's record as before the batch
    assert party.run(credit).results == []
    out = party.run(s_fact(completed("S1"), version=2, received=3, final=3))
    row = result(out, "SESSION", "S1")
    assert (row["outcome"], row["cdr_ids"], row["cdr_kwh"]) == ("AWAITING_CDR", [], None)
    # So does a CDR that moved to another session: the session it left does not count it with its new one's.
    party = Party()
    party.run(s_fact(completed("S1", uid="T1", authref="A1"), received=0, final=0),
              c_fact(cdr("C1", session_id=None, uid="T1", authref="A1"), received=1))
    before = dict(party.store.data)
    party.run(s_fact(completed("S2", uid="T1", authref="A1"), received=2, final=2),
              s_fact(completed("S1", uid="T1", authref="A9"), version=2, received=2, final=2))
    assert stored(party, "C1") == ("S2", "AUTHORIZATION_REFERENCE")
    party.store.data["S/NL/TNM/S1"] = before["S/NL/TNM/S1"]  # S1's record still lists C1
    out = party.run(s_fact(completed("S1", uid="T1", authref="A9", kwh="11"), version=3, received=3, final=3))
    row = result(out, "SESSION", "S1")
    assert (row["cdr_ids"], row["cdr_kwh"]) == ([], None)


def test_a_session_whose_cdrs_bill_another_cost_is_a_mismatch() -> None:
    # The energy agrees, the cost does not: the session's row compares both (README: within the energy AND cost
    # tolerances).
    party = Party()
    party.run(s_fact(completed("S1", kwh="10", cost="2.50"), received=61, final=61))
    out = party.run(c_fact(cdr("C1", kwh="10", cost="3.00"), received=62))
    row = result(out, "SESSION", "S1")
    assert (row["outcome"], row["delta_kwh"], row["delta_cost_excl_vat"]) == ("MISMATCH", Decimal(0), Decimal("0.50"))


def test_a_completed_session_awaits_its_cdr_until_the_grace_after_it_completed() -> None:
    # A late update of a completed session (a total_cost PATCH) does not move the deadline: it runs from final_at.
    out = Party().run(s_fact(completed(), version=2, received=80, final=61))
    assert (result(out, "SESSION", "S1")["outcome"], result(out, "SESSION", "S1")["due_at"]) == (
        "AWAITING_CDR", ts(91))
    out = Party().run(s_fact(completed(), version=2, received=100, final=61))  # past it: missing its CDR
    assert (result(out, "SESSION", "S1")["outcome"], result(out, "SESSION", "S1")["due_at"]) == (
        "MISSING_CDR", ts(91))


def test_of_two_credits_the_earliest_received_counts_before_the_lower_id() -> None:
    original = c_fact(cdr("C1", cost="2.50"), received=0)
    early = c_fact(cdr("C1-Z", cost="-2.50", credit=True, credit_reference="C1"), received=1)
    late = c_fact(cdr("C1-A", cost="-2.50", credit=True, credit_reference="C1"), received=2)
    for order in itertools.permutations([original, early, late]):
        party = Party()
        links: dict[str, str] = {}
        for fact in order:
            links |= {r[2]: r[5] for r in party.run(fact).credit_links}
        assert links == {"C1-Z": "LINKED", "C1-A": "DUPLICATE_CREDIT"}, order


def test_an_open_session_that_loses_its_cdr_awaits_a_cdr_again_without_a_deadline() -> None:
    party = Party()
    party.run(s_fact(session("S1", status="ACTIVE", kwh="10", cost="2.50"), received=30))
    matched = party.run(c_fact(cdr("C1", kwh="10", cost="2.50"), received=40))
    assert result(matched, "SESSION", "S1")["outcome"] == "MATCHED"
    out = party.run(c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=41))
    row = result(out, "SESSION", "S1")  # its MATCHED row must not stay
    assert (row["outcome"], row["cdr_ids"], row["due_at"]) == ("AWAITING_CDR", [], None)


def test_a_credit_with_the_originals_cost_unnegated_does_not_match_its_amount() -> None:
    party = Party()
    party.run(c_fact(cdr("C1", cost="2.50"), received=0))
    out = party.run(c_fact(cdr("C1-C", cost="2.50", credit=True, credit_reference="C1"), received=1))
    assert (link(out, "C1-C")["status"], link(out, "C1-C")["amount_matches"]) == ("LINKED", False)
    assert [a.kind.value for a in out.anomalies] == ["CREDIT_AMOUNT_MISMATCH"]


def test_a_session_billed_within_the_tolerances_is_matched_at_their_limit() -> None:
    party = Party()
    party.run(s_fact(completed("S1", kwh="10", cost="2.50"), received=61, final=61))
    out = party.run(c_fact(cdr("C1", kwh="10.01", cost="2.51"), received=62))
    assert result(out, "SESSION", "S1")["outcome"] == "MATCHED"


def test_a_session_split_over_cdrs_in_two_currencies_sums_no_cost() -> None:
    # Half the charge in EUR, half in CHF: the amounts do not add up to anything the session's EUR compares with.
    party = Party()
    party.run(s_fact(completed("S1", kwh="10", cost="2.50"), received=61, final=61))
    party.run(c_fact(cdr("C1", kwh="5", cost="1.25"), received=62))
    out = party.run(c_fact({**cdr("C2", kwh="5", cost="1.25"), "currency": "CHF"}, received=63))
    row = result(out, "SESSION", "S1")
    assert (row["outcome"], row["cdr_kwh"], row["cdr_cost_excl_vat"], row["delta_cost_excl_vat"]) == (
        "MISMATCH", Decimal(10), None, None)


def test_a_cdr_below_its_session_beyond_a_tolerance_is_a_mismatch() -> None:
    # Tolerances bound the difference both ways: a CDR billing less than its session is off as well.
    assert not within_tolerance(Deltas(Decimal("-0.02"), None, Decimal(0), None), RULES)
    assert not within_tolerance(Deltas(Decimal(0), Decimal("-0.02"), Decimal(0), None), RULES)
    d = deltas(s_fact(completed(kwh="10", cost="2.50", start=1)), c_fact(cdr(kwh="9", cost="2.00", start=0, end=59)))
    assert (d.kwh, d.cost_excl_vat, d.start_s, d.end_s) == (Decimal(-1), Decimal("-0.50"), Decimal(-60), Decimal(-60))
    party = Party()
    party.run(s_fact(completed(kwh="10", cost="2.50"), final=61))
    out = party.run(c_fact(cdr(kwh="9.5", cost="2.50")))
    assert result(out, "CDR", "C1")["outcome"] == "MISMATCH" and result(out, "SESSION", "S1")["outcome"] == "MISMATCH"


def test_a_sessions_method_is_the_strongest_of_its_cdrs() -> None:
    party = Party()
    party.run(s_fact(completed("S1", authref="AUTH-1"), final=61))
    party.run(c_fact(cdr("C1", session_id=None, authref="AUTH-1", kwh="5", cost="1.25")))
    out = party.run(c_fact(cdr("C2", session_id="S1", kwh="5", cost="1.25")))
    assert stored(party, "C1") == ("S1", "AUTHORIZATION_REFERENCE")
    row = result(out, "SESSION", "S1")
    assert (row["method"], row["cdr_ids"], row["outcome"]) == ("SESSION_ID", ["C1", "C2"], "MATCHED")


def test_a_cdr_credited_before_it_came_never_matches_an_open_session() -> None:
    # Its credit came first: the CDR is cancelled on arrival; the open session it names never held it (no row).
    party = Party()
    party.run(s_fact(session("S1"), version=1))
    first = party.run(c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=0))
    assert link(first, "C1-C")["due_at"] == ts(10)  # the sweep makes it UNKNOWN_REFERENCE after the grace
    out = party.run(c_fact(cdr("C1"), received=1))
    assert [(r["subject"], r["subject_id"], r["outcome"]) for r in out.results] == [("CDR", "C1", "CREDITED")]
    assert link(out, "C1-C")["status"] == "LINKED"


def test_a_token_match_holds_at_exactly_the_time_tolerance() -> None:
    party = Party()
    party.run(s_fact(completed("S1", start=0), final=61))
    out = party.run(c_fact(cdr("C1", session_id=None, start=5, end=65)))
    row = result(out, "CDR", "C1")
    assert (row["outcome"], row["method"], row["delta_start_s"]) == ("MATCHED", "TOKEN_LOCATION_START", Decimal(300))


def test_a_settled_reference_match_is_undone_when_its_session_changes_its_reference() -> None:
    party = Party()
    party.run(s_fact(completed("S1", authref="AUTH-1", uid="TOK7"), final=61, version=1),
              c_fact(cdr("C1", session_id=None, authref="AUTH-1")))
    assert stored(party, "C1") == ("S1", "AUTHORIZATION_REFERENCE")
    out = party.run(s_fact(completed("S1", authref="AUTH-X", uid="TOK7"), received=30, final=61, version=2))
    # Past the CDR's grace (10): it has no session now, and waits no more.
    assert stored(party, "C1") == (None, "") and result(out, "CDR", "C1")["outcome"] == "NO_SESSION"
    assert result(out, "SESSION", "S1")["outcome"] == "AWAITING_CDR"


def test_a_session_is_late_only_when_its_first_cdr_came_after_the_cdr_grace() -> None:
    party = Party()
    party.run(s_fact(completed(kwh="10", cost="2.50"), received=0, final=0))
    party.run(c_fact(cdr("C1", kwh="5", cost="1.25"), received=5))
    out = party.run(c_fact(cdr("C2", kwh="5", cost="1.25"), received=45))  # after the CDR grace (30 minutes)
    row = result(out, "SESSION", "S1")
    assert (row["cdr_ids"], row["outcome"], row["late"]) == (["C1", "C2"], "MATCHED", False)


def test_a_session_held_by_a_settled_match_of_the_same_key_is_taken_last() -> None:
    party = Party()
    party.run(s_fact(completed("S1", authref="AUTH-1", start=0), final=61),
              s_fact(completed("S2", authref="AUTH-1", start=3), final=61),
              c_fact(cdr("C1", session_id=None, authref="AUTH-1", start=0)))
    assert stored(party, "C1") == ("S1", "AUTHORIZATION_REFERENCE")
    party.run(c_fact(cdr("C2", session_id=None, authref="AUTH-1", start=0), received=20))  # C1 is settled now
    assert (stored(party, "C1"), stored(party, "C2")) == (
        ("S1", "AUTHORIZATION_REFERENCE"), ("S2", "AUTHORIZATION_REFERENCE"))


def test_cdrs_of_one_key_choose_their_session_in_order_of_start() -> None:
    for facts in itertools.permutations([c_fact(cdr("C1", session_id=None, authref="AUTH-1", start=3, end=63)),
                                         c_fact(cdr("C2", session_id=None, authref="AUTH-1", start=0))]):
        party = Party()
        party.run(s_fact(completed("S1", authref="AUTH-1", start=2), final=61),
                  s_fact(completed("S2", authref="AUTH-1", start=20), final=61), *facts)
        # C2 starts first: it takes the nearest session, S1; C1 takes the free one.
        assert (stored(party, "C1"), stored(party, "C2")) == (
            ("S2", "AUTHORIZATION_REFERENCE"), ("S1", "AUTHORIZATION_REFERENCE"))


def test_a_cdr_naming_an_unknown_session_waits_for_it_its_whole_grace_even_past_an_hour() -> None:
    rules = Rules(cdr_grace=RULES.cdr_grace, session_grace=timedelta(hours=2),
                  energy_tolerance=RULES.energy_tolerance, cost_tolerance=RULES.cost_tolerance,
                  time_tolerance=RULES.time_tolerance)
    store = DictStore()

    def run(*facts: Fact) -> None:
        overlay = store.overlay()
        process_party(PartyState("NL/TNM", overlay), list(facts), rules, PartyOutput())
        store.commit(overlay)

    def state_of(cdr_id: str) -> tuple[str | None, str]:
        rec = PartyState("NL/TNM", store.overlay()).cdr(cdr_id)
        assert rec is not None
        return rec.session_id, rec.method

    run(s_fact(completed("S1", authref="AUTH-1"), final=61))
    run(c_fact(cdr("C9", session_id="S9", authref="AUTH-1")))
    for minutes in (70, 130):  # within its grace (two hours), past the hours it was received in
        run(s_fact(session(f"TICK{minutes}", uid="TICK", location="ELSEWHERE"), received=minutes))
        assert state_of("C9") == (None, "")
    run(s_fact(session("TICK250", uid="TICK", location="ELSEWHERE"), received=250))  # the hour its grace ended is over
    assert state_of("C9") == ("S1", "AUTHORIZATION_REFERENCE")


def test_a_credit_in_another_currency_than_its_original_does_not_negate_it() -> None:
    # 10 §1.1: a credit carries its original's data but for the negated total_cost. Billing nets per currency, so a
    # credit of -2.50 USD leaves the 2.50 EUR of its original billed: it must not read as negating it.
    party = Party()
    party.run(c_fact(cdr("C1", cost="2.50"), received=0))
    credit = cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1")
    out = party.run(c_fact(credit | {"currency": "USD"}, received=1))
    assert (link(out, "C1-C")["status"], link(out, "C1-C")["amount_matches"]) == ("LINKED", False)
    assert [a.kind.value for a in out.anomalies] == ["CREDIT_AMOUNT_MISMATCH"]


def test_a_credit_cancels_its_original_only_with_the_originals_energy_in_either_sign() -> None:
    # 10 §1.1: a credit carries its original's data but for the negated total_cost; billing counts its energy as
    # -|value| (README, billing with credits), so a credit of another energy leaves the difference in the kWh billed.
    for credit_kwh, matches in (("8", False), ("-12", False), ("10", True), ("-10", True)):
        party = Party()
        party.run(c_fact(cdr("C1", kwh="10", cost="2.50"), received=0))
        out = party.run(c_fact(cdr("C1-C", kwh=credit_kwh, cost="-2.50", credit=True, credit_reference="C1"),
                               received=1))
        assert (link(out, "C1-C")["status"], link(out, "C1-C")["amount_matches"]) == ("LINKED", matches), credit_kwh
        assert [a.kind.value for a in out.anomalies] == ([] if matches else ["CREDIT_AMOUNT_MISMATCH"]), credit_kwh
    party = Party()  # an original of negative energy (fed to the grid): no credit cancels it in billing
    party.run(c_fact(cdr("C1", kwh="-10", cost="2.50"), received=0))
    out = party.run(c_fact(cdr("C1-C", kwh="-10", cost="-2.50", credit=True, credit_reference="C1"), received=1))
    assert link(out, "C1-C")["amount_matches"] is False
    [anomaly] = out.anomalies
    assert anomaly.detail == "credit of -2.5000 EUR (-3.0250 incl. VAT), -10.0000 kWh does not cancel C1's " \
                             "2.5000 EUR (3.0250 incl. VAT), -10.0000 kWh"

def test_a_credit_whose_cost_incl_vat_does_not_negate_its_originals_does_not_match_its_amount() -> None:
    # Both values of total_cost are negated (10 §1.1); billing nets incl. VAT too, so a difference there stays
    # billed and must be flagged like one excl. VAT.
    for incl in ("-3.0000", None):
        party = Party()
        party.run(c_fact(cdr("C1", cost="2.50"), received=0))  # incl. VAT 3.0250
        credit = cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1")
        credit["total_cost"] = {"excl_vat": Decimal("-2.50")} | ({} if incl is None else {"incl_vat": Decimal(incl)})
        out = party.run(c_fact(credit, received=1))
        assert (link(out, "C1-C")["status"], link(out, "C1-C")["amount_matches"]) == ("LINKED", False), incl
        assert [a.kind.value for a in out.anomalies] == ["CREDIT_AMOUNT_MISMATCH"], incl
    party = Party()  # neither gives incl. VAT: both values negated
    original = cdr("C1", cost="2.50")
    original["total_cost"] = {"excl_vat": Decimal("2.50")}
    party.run(c_fact(original, received=0))
    credit = cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1")
    credit["total_cost"] = {"excl_vat": Decimal("-2.50")}
    out = party.run(c_fact(credit, received=1))
    assert link(out, "C1-C")["amount_matches"] is True and out.anomalies == []


def test_a_fact_written_before_cost_incl_vat_travelled_is_compared_excl_vat_only() -> None:
    # State and topic records of an earlier version hold CDR facts without `cost_incl_vat`: unknown, not absent.
    party = Party()
    party.run(_fact_written_without("cost_incl_vat", cdr("C1", cost="2.50")))
    out = party.run(c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=1))
    assert link(out, "C1-C")["amount_matches"] is True and out.anomalies == []


def test_a_credit_that_does_not_carry_its_originals_home_charging_compensation_does_not_cancel_it() -> None:
    # 10 §1.1: a credit carries its original's data, home_charging_compensation included. Billing counts each line by
    # its own flag, so a credit without its original's flag moves the amount from compensation to charging (or
    # back) instead of cancelling it: flagged like a credit of other amounts, to settle with the CPO.
    for original_flag, credit_flag, matches in ((True, True, True), (True, None, False), (None, True, False),
                                                (None, False, True)):
        party = Party()
        original = cdr("C1", cost="2.50") | ({} if original_flag is None else
                                             {"home_charging_compensation": original_flag})
        party.run(c_fact(original, received=0))
        credit = cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1") | (
            {} if credit_flag is None else {"home_charging_compensation": credit_flag})
        out = party.run(c_fact(credit, received=1))
        assert link(out, "C1-C")["amount_matches"] is matches, (original_flag, credit_flag)
        assert [a.kind.value for a in out.anomalies] == ([] if matches else ["CREDIT_AMOUNT_MISMATCH"])
    party = Party()
    party.run(c_fact(cdr("C1", cost="2.50") | {"home_charging_compensation": True}, received=0))
    [anomaly] = party.run(c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=1)).anomalies
    assert anomaly.detail == "credit of -2.5000 EUR (-3.0250 incl. VAT), 10.0000 kWh does not cancel C1's " \
                             "2.5000 EUR (3.0250 incl. VAT), 10.0000 kWh, home charging compensation"


def test_a_fact_written_before_home_charging_compensation_travelled_is_compared_without_it() -> None:
    # State and topic records of an earlier version hold CDR facts without the flag: unknown, not false.
    party = Party()
    party.run(_fact_written_without("home_charging_compensation", cdr("C1", cost="2.50")))
    credit = cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1") | {"home_charging_compensation": True}
    out = party.run(c_fact(credit, received=1))
    assert link(out, "C1-C")["amount_matches"] is True and out.anomalies == []


def _fact_written_without(field: str, body: dict[str, Any]) -> Any:
    """The CDR fact of `body` as an earlier version wrote it, before `field` travelled."""
    written = msgspec.json.decode(encode_facts([c_fact(body)]))
    del written["facts"][0][field]
    [old] = decode_facts(msgspec.json.encode(written))
    return old


def _as_written_before_token_hours(store: Any) -> None:
    """Rewrite a party state's token indexes as a version before 30bd9ac kept them: sessions (`IT`) and waiting CDRs
    (`WT`) by token and location alone, `<token>/<location>`, where today's code adds the hour of start."""
    for key in [k for k in store.data if k.startswith(("IT/", "WT/"))]:
        ids = msgspec.msgpack.decode(store.data.pop(key))["ids"]
        legacy = key.rsplit("/", 1)[0]
        kept = msgspec.msgpack.decode(store.data[legacy])["ids"] if legacy in store.data else []
        store.data[legacy] = msgspec.msgpack.encode({"ids": kept + [i for i in ids if i not in kept]})


def test_a_state_written_before_token_keys_held_the_hour_still_matches_by_token() -> None:
    # A version before 30bd9ac indexed by token and location only; today's lookups name the hour of start as well,
    # so a session (or a waiting CDR) of such a state was never found by token again: its CDR, arriving after the
    # upgrade, was NO_SESSION and the session MISSING_CDR.
    party = Party()
    party.run(s_fact(completed("S1", start=0), final=61))
    _as_written_before_token_hours(party.store)
    out = party.run(c_fact(cdr("C1", session_id=None, start=2, end=62), received=70))
    assert (result(out, "CDR", "C1")["outcome"], result(out, "CDR", "C1")["method"],
            result(out, "CDR", "C1")["session_id"]) == ("MATCHED", "TOKEN_LOCATION_START", "S1")
    assert result(out, "SESSION", "S1")["cdr_ids"] == ["C1"]

    waiting = Party()
    waiting.run(c_fact(cdr("C1", session_id=None, start=2, end=62), received=3))
    _as_written_before_token_hours(waiting.store)
    out = waiting.run(s_fact(completed("S1", start=0), received=61, final=61))
    assert (result(out, "CDR", "C1")["outcome"], result(out, "CDR", "C1")["session_id"]) == ("MATCHED", "S1")


def test_an_old_token_key_is_not_read_as_another_locations_key_of_today() -> None:
    # `<token>/<location>` of a location holding a `/` spells today's `<token>/<location>/<hour>` of another one:
    # the sessions such a key lists are of that other location and must not be taken.
    party = Party()
    party.run(s_fact(session("S2", status="COMPLETED", start=600, end=660, updated=660, kwh="10", cost="2.50"),
                     received=661, final=661))
    hour = int(ts(600).timestamp() // 3600)
    out = party.run(c_fact(cdr("C2", session_id=None, start=601, end=661, location=f"LOC1/{hour}"), received=670))
    assert result(out, "CDR", "C2")["outcome"] == "AWAITING_SESSION"

def test_a_constant_authorization_reference_keeps_a_bounded_index() -> None:
    """A CPO that sends one authorization_reference for every session: its index listed every session of the
    party for the billing retention, one state value rewritten on every add, past the 16 MB a state record may
    hold within a year. It keeps the latest INDEX_MOST; a CDR with that reference still finds its (recent)
    session by start time."""
    from pipeline.matching import INDEX_MOST

    party = Party()
    sessions = INDEX_MOST + 50
    for first in range(0, sessions, 200):
        party.run(*(s_fact(session(f"S{i}", status="ACTIVE", start=i * 10, updated=i * 10, authref="SAME"),
                           received=i * 10) for i in range(first, min(first + 200, sessions))))
    index = [value for key, value in party.store.data.items() if key.startswith("IA/")]
    assert len(index) == 1 and len(msgspec.msgpack.decode(index[0])["ids"]) == INDEX_MOST
    last = sessions - 1
    out = party.run(c_fact(cdr("C1", session_id=None, authref="SAME", start=last * 10, end=last * 10 + 5),
                           received=last * 10 + 6))
    assert result(out, "CDR", "C1")["session_id"] == f"S{last}"


def test_a_late_cdr_whose_session_left_a_full_reference_index_is_not_matched_to_another_by_it() -> None:
    """A constant authorization_reference past INDEX_MOST sessions is no identifier: a CDR coming after its session
    left the index (a daily CDR batch) was matched by that reference to the nearest session still listed (no
    time tolerance: hours away), its own session left MISSING_CDR, though its token, location and start find it.
    Beyond a full index the reference matches only within the time tolerance, as a token does."""
    from pipeline.matching import INDEX_MOST

    party = Party()
    sessions = INDEX_MOST + 50
    for first in range(0, sessions, 200):
        party.run(*(s_fact(session(f"S{i}", status="ACTIVE", start=i * 600, updated=i * 600, authref="SAME",
                                   uid=f"T{i}"), received=i * 600)
                    for i in range(first, min(first + 200, sessions))))
    out = party.run(c_fact(cdr("C1", session_id=None, authref="SAME", uid="T10", start=6000, end=6060),
                           received=sessions * 600))
    assert result(out, "CDR", "C1")["session_id"] == "S10"


def test_a_credit_whose_original_was_received_after_its_grace_is_flagged_in_either_order() -> None:
    """CREDIT_UNKNOWN_REFERENCE by event time (the sweep writes the same row when no event came first): also when
    the original's fact reaches stage 2 before the credit's (their stage-1 partitions differ)."""
    for order in ((0, 1), (1, 0)):
        party = Party()
        facts = [c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=0),
                 c_fact(cdr("C1"), received=15)]  # 15 min: past the 10 min grace
        outs = [party.run(facts[i]) for i in order]
        flagged = [(a.kind.value, a.object_id, a.observed_at) for out in outs for a in out.anomalies]
        assert flagged == [("CREDIT_UNKNOWN_REFERENCE", "C1-C", ts(10))], order
    party = Party()
    party.run(c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=0))
    assert party.run(c_fact(cdr("C1"), received=10)).anomalies == []  # at the deadline: in time


def test_an_invalid_session_stays_not_billable_when_it_holds_a_cdr_in_either_order() -> None:
    # INVALID: "declared invalid; will not be billed" (09 §1). A CDR that bills it is the anomaly, not a match: the
    # session's row must not turn MATCHED (the outcomes panel and report would count it as billed right). Its
    # CDRs' totals and deltas are still shown.
    invalid = s_fact(session("S1", status="INVALID", kwh="10", cost="2.50", end=60, updated=60), version=2,
                     received=61, final=61)
    active = s_fact(session("S1", status="ACTIVE", kwh="10"), version=1, received=30)
    the_cdr = c_fact(cdr("C1", kwh="10", cost="2.50"), received=62)
    for order in ([invalid, the_cdr], [active, the_cdr, invalid]):
        party = Party()
        rows = {}
        for fact in order:
            rows |= {(r["subject"], r["subject_id"]): r for r in party.run(fact).results}
        row = rows["SESSION", "S1"]
        assert (row["outcome"], row["cdr_ids"], row["cdr_kwh"], row["delta_kwh"]) == (
            "NOT_BILLABLE", ["C1"], Decimal(10), Decimal(0)), order
        assert rows["CDR", "C1"]["outcome"] == "MATCHED"  # the CDR is billed anyway: its anomaly says why not


def test_a_completed_session_past_its_cdr_grace_stays_missing_cdr_when_it_changes() -> None:
    """The sweep made a completed session without a CDR MISSING_CDR at its due_at (version + 1). A later update of
    it (a total_cost PATCH), or the loss of its only CDR, after that deadline wrote AWAITING_CDR again (the grace
    long passed), published and counted as waiting until the next sweep promoted it once more. By the event time
    of the fact that writes the row the deadline has passed: MISSING_CDR at once, due_at still from final_at."""
    party = Party()
    first = result(party.run(s_fact(completed(), received=0, final=0)), "SESSION", "S1")
    assert (first["outcome"], first["due_at"]) == ("AWAITING_CDR", ts(30))
    swept = first["version"] + 1  # the deadline sweep's MISSING_CDR row
    updated = result(party.run(s_fact(completed(kwh="11"), version=2, received=40, final=0)), "SESSION", "S1")
    assert (updated["outcome"], updated["due_at"], updated["session_kwh"]) == ("MISSING_CDR", ts(30), Decimal(11))
    assert updated["version"] > swept
    # A CDR that comes then still matches it (late), and a credit of that CDR leaves it MISSING_CDR, not waiting.
    matched = result(party.run(c_fact(cdr(kwh="11"), received=50)), "SESSION", "S1")
    assert (matched["outcome"], matched["late"]) == ("MATCHED", True) and matched["version"] > updated["version"]
    credited = result(party.run(c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=60)),
                      "SESSION", "S1")
    assert (credited["outcome"], credited["cdr_ids"], credited["due_at"]) == ("MISSING_CDR", [], ts(30))
    assert credited["version"] > matched["version"]
    # At its deadline exactly it is still in time (as a CDR then is not late).
    assert result(Party().run(s_fact(completed(), version=2, received=30, final=0)), "SESSION", "S1")[
        "outcome"] == "AWAITING_CDR"


def test_a_cdr_that_loses_its_session_after_its_grace_is_no_session_at_once() -> None:
    """A CDR matched by token whose session then changes its location (or its reference) after the CDR's session
    grace: its row was AWAITING_SESSION again, a deadline past, until the next sweep made it NO_SESSION."""
    party = Party()
    party.run(s_fact(completed("S1", start=0), final=61, version=1), c_fact(cdr("C1", session_id=None, start=0)))
    out = party.run(s_fact(completed("S1", start=0, location="LOC2"), received=30, final=61, version=2))
    row = result(out, "CDR", "C1")
    assert (row["outcome"], row["session_id"], row["due_at"]) == ("NO_SESSION", None, ts(10))
    # Within its grace it waits again.
    party = Party()
    party.run(s_fact(completed("S1", start=0), final=61, version=1), c_fact(cdr("C1", session_id=None, start=0)))
    out = party.run(s_fact(completed("S1", start=0, location="LOC2"), received=5, final=61, version=2))
    assert (result(out, "CDR", "C1")["outcome"], result(out, "CDR", "C1")["due_at"]) == ("AWAITING_SESSION", ts(10))


def test_a_session_missing_its_cdr_stays_so_when_an_update_stamped_before_its_deadline_comes_after() -> None:
    """Facts of a party reach stage 2 out of event-time order (their stage-1 partitions differ). S0 lost its CDR at
    35 (S1, carrying the CDR's reference, took it), past its deadline (30): MISSING_CDR. Its own update stamped 20,
    handed over after that, wrote AWAITING_CDR again, though its subject had been past the deadline already."""
    party = Party()
    party.run(s_fact(completed("S0"), received=0, final=0), c_fact(cdr("C0", session_id=None, authref="A1")))
    assert stored(party, "C0") == ("S0", "TOKEN_LOCATION_START")
    moved = result(party.run(s_fact(completed("S1", authref="A1", uid="TOK9"), received=35, final=35)),
                   "SESSION", "S0")
    assert (moved["outcome"], moved["due_at"]) == ("MISSING_CDR", ts(30))
    updated = result(party.run(s_fact(completed("S0", kwh="11"), version=2, received=20, final=0)), "SESSION", "S0")
    assert (updated["outcome"], updated["due_at"], updated["session_kwh"]) == ("MISSING_CDR", ts(30), Decimal(11))


def test_a_cdr_past_its_grace_by_an_earlier_row_stays_no_session_when_a_fact_stamped_before_frees_it() -> None:
    party = Party()
    party.run(s_fact(completed("S1", start=0), final=61, version=1), c_fact(cdr("C1", session_id=None, start=0)))
    gone = result(party.run(s_fact(completed("S1", start=0, location="LOC2"), received=30, final=61, version=2)),
                  "CDR", "C1")
    assert gone["outcome"] == "NO_SESSION"  # its grace (10) had passed at 30
    # Handed over after it, stamped before C1's deadline: S2 takes C1, then moves away from its location.
    assert result(party.run(s_fact(completed("S2", start=1), received=5, final=61, version=1)), "CDR", "C1")[
        "outcome"] == "MATCHED"
    freed = result(party.run(s_fact(completed("S2", start=1, location="LOC3"), received=8, final=61, version=2)),
                   "CDR", "C1")
    assert (freed["outcome"], freed["session_id"], freed["due_at"]) == ("NO_SESSION", None, ts(10))


def test_a_credit_fact_after_the_grace_gives_a_cdr_naming_an_unknown_session_its_fallback() -> None:
    # The party's event time moves on with every fact, a credit's too: a CDR naming a session that never came
    # falls back to its weaker keys at the first fact after its grace's hour, whatever kind of fact that is.
    for last in (c_fact(cdr("C5-C", session_id=None, cost="-2.50", credit=True, credit_reference="C5"), received=70),
                 c_fact(cdr("C6", session_id=None, uid="OTHER", location="ELSEWHERE"), received=70)):
        party = Party()
        party.run(s_fact(completed("S1", authref="AUTH-1"), final=61))
        party.run(c_fact(cdr("C9", session_id="S9", authref="AUTH-1")))
        if last.credit_reference_id is None:
            party.run(c_fact(cdr("C6-C", session_id=None, uid="OTHER", location="ELSEWHERE", cost="-2.50",
                                 credit=True, credit_reference="C6"), received=5))  # C6 comes credited already
        else:
            party.run(c_fact(cdr("C5", session_id=None, uid="OTHER", location="ELSEWHERE"), received=5))
        row = result(party.run(last), "CDR", "C9")
        assert (row["outcome"], row["method"], row["session_id"], row["late"]) == (
            "MATCHED", "AUTHORIZATION_REFERENCE", "S1", True)
        assert stored(party, "C9") == ("S1", "AUTHORIZATION_REFERENCE")


def test_a_weaker_key_prefers_a_billable_session_to_a_nearer_invalid_one_in_every_order() -> None:
    """A failed attempt (INVALID, 09 §1: not billed) and the charge that followed it a minute later share the token,
    location and, from a StartSession retry, the authorization reference. The CDR (no session_id) took the nearer
    start, the INVALID attempt: its row a MISMATCH against a charge it does not bill, CDR_FOR_INVALID_SESSION, and
    the charge it bills MISSING_CDR. A session id is the CPO's own link; a weaker key's nearest start is only a
    guess, and among the free sessions of the key one that will be billed is the better one."""
    for authref in (None, "REF1"):
        opened = s_fact(session("S0", status="ACTIVE", start=0, updated=0, authref=authref), received=0)
        attempt = s_fact(session("S0", status="INVALID", start=0, end=1, updated=1, authref=authref), version=2,
                         received=1, final=1)
        charge = s_fact(completed("S1", start=3, authref=authref), received=60, final=60)
        the_cdr = c_fact(cdr("C1", session_id=None, start=1, end=61, authref=authref), received=61)
        # ... and so does a CDR matched to the attempt while it was open, when the attempt turns INVALID.
        for order in [*itertools.permutations([attempt, charge, the_cdr]), (opened, the_cdr, charge, attempt)]:
            party = Party()
            rows, anomalies = {}, []
            for fact in order:
                out = party.run(fact)
                rows |= {(r["subject"], r["subject_id"]): r for r in out.results}
                anomalies += [a.kind.value for a in out.anomalies]
            assert (rows["CDR", "C1"]["outcome"], rows["CDR", "C1"]["session_id"]) == ("MATCHED", "S1"), (authref,
                                                                                                          order)
            assert rows["SESSION", "S1"]["outcome"] == "MATCHED", (authref, order)
            assert rows["SESSION", "S0"]["cdr_ids"] == [], (authref, order)
            if order.index(charge) < order.index(the_cdr):  # else held by the attempt for a while: anomalies stay
                assert anomalies == [], (authref, order)
