"""CDR rules and stage 1 for CDRs: immutability (duplicate, conflict), credit checks, rows, facts."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import msgspec
import pytest

from ocpi.canonical import cdr_content_hash, ci_spec, content_hash
from ocpi.identity import ci_normalize
from ocpi.model import CDR
from pipeline.cdr_rules import CdrDecision, credit_anomalies, decide
from pipeline.cdrs import process_cdrs
from pipeline.facts import CdrFact
from pipeline.projection import ANOMALY_COLUMNS, CDR_COLUMNS, CDR_PERIOD_COLUMNS, CDR_TARIFF_COLUMNS, RAW_EVENT_COLUMNS
from pipeline.records import Anomaly
from pipeline.state import CdrState

from . import builders
from .builders import Harness, cdr, column, event, rows


def harness() -> Harness:
    return Harness(process_cdrs, CdrState)


def outcomes(out: Any) -> dict[str, str]:
    return dict(zip(column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "event_id"),
                    column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "outcome"), strict=True))


@pytest.mark.parametrize(("stored", "incoming", "expected"), [
    (None, "h1", CdrDecision.NEW), ("h1", "h1", CdrDecision.DUPLICATE), ("h1", "h2", CdrDecision.CONFLICT)])
def test_decide(stored: str | None, incoming: str, expected: CdrDecision) -> None:
    assert decide(stored, incoming) is expected


def test_credit_checks() -> None:
    assert credit_anomalies(cdr()) == []
    assert credit_anomalies(cdr(credit=True, credit_reference="C0", cost="-2.50")) == []
    kinds = [k for k, _ in credit_anomalies({**cdr(credit=True, cost="2.50")})]
    assert kinds == [Anomaly.CREDIT_WITHOUT_REFERENCE, Anomaly.CREDIT_POSITIVE_COST]
    # A credit must carry a non-positive total_cost: zero is one (a credit of a free session).
    assert credit_anomalies(cdr(credit=True, credit_reference="C0", cost="0")) == []
    # `credit: false` is a normal CDR, whatever it does not carry.
    assert credit_anomalies(cdr(credit=False, cost="2.50")) == []
    # An empty `credit_reference_id` names no CDR (the receivers refuse it now; one accepted before may be in Kafka).
    empty = {**event("CDR", cdr("C1-C", credit=True, credit_reference="C1", cost="-2.50")).payload,
             "credit_reference_id": ""}
    assert [k for k, _ in credit_anomalies(empty)] == [Anomaly.CREDIT_WITHOUT_REFERENCE]


@pytest.mark.parametrize(("excl", "incl"), [("-2.50", "3.03"), ("0", "0.01")])
def test_a_credit_whose_incl_vat_is_positive_is_flagged(excl: str, incl: str) -> None:
    # Every value of a credit's total_cost is its original's negated (10 §1.1): a positive incl_vat is a positive
    # total_cost too, whatever excl_vat says (billing nets it as -|incl_vat|, doubling an original's negative one).
    credit = cdr("C1-C", credit=True, credit_reference="C1", cost=excl)
    credit["total_cost"] = {"excl_vat": Decimal(excl), "incl_vat": Decimal(incl)}
    [(kind, detail)] = credit_anomalies(credit)
    assert kind is Anomaly.CREDIT_POSITIVE_COST and incl in detail
    # incl_vat is optional (absent or null): excl_vat alone decides then.
    for given in ({"excl_vat": Decimal(excl)}, {"excl_vat": Decimal(excl), "incl_vat": None}):
        credit["total_cost"] = given
        assert credit_anomalies(credit) == []


TARIFF = {"country_code": "NL", "party_id": "TNM", "id": "T1", "currency": "EUR",
          "elements": [{"price_components": [{"type": "ENERGY", "price": Decimal("0.25"), "step_size": 1}]}],
          "last_updated": "2026-01-01T00:00:00Z"}


def test_a_new_cdr_is_stored_with_periods_tariffs_and_a_fact_exactly() -> None:
    h = harness()
    post = event("CDR", cdr(kwh="12.3456", cost="3.0864", tariffs=[TARIFF]), received=1)
    out = h.run(post)
    assert outcomes(out) == {post.event_id: "APPLIED"}
    [row] = rows(out.batch, "cdrs")
    assert row[CDR_COLUMNS.index("total_energy")] == Decimal("12.3456")
    assert row[CDR_COLUMNS.index("total_cost_excl_vat")] == Decimal("3.0864")
    assert column(out.batch, "cdr_charging_periods", CDR_PERIOD_COLUMNS, "dimension_types") == [["ENERGY", "TIME"]]
    assert column(out.batch, "cdr_tariffs", CDR_TARIFF_COLUMNS, "tariff_id") == ["T1"]
    [fact] = out.facts["NL/TNM"]
    assert isinstance(fact, CdrFact) and fact.cost_excl_vat == Decimal("3.0864") and fact.session_id == "S1"


def test_the_same_cdr_again_is_a_duplicate_even_with_another_last_updated() -> None:
    h = harness()
    h.run(event("CDR", cdr(), received=1))
    again = event("CDR", cdr(updated=90), received=2)
    out = h.run(again)
    assert outcomes(out) == {again.event_id: "DUPLICATE"}
    assert rows(out.batch, "cdrs") == [] and out.facts == {}


def test_a_different_cdr_with_a_known_id_is_a_conflict_and_the_original_stays() -> None:
    h = harness()
    original = event("CDR", cdr(cost="2.50"), received=1)
    h.run(original)
    other = event("CDR", cdr(cost="9.99"), received=2)
    out = h.run(other)
    assert outcomes(out) == {other.event_id: "CONFLICT"}
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == ["CDR_CONFLICT"]
    assert rows(out.batch, "cdrs") == []
    assert h.state("NL/TNM/C1").event_id == original.event_id


def test_a_credit_cdr_with_a_positive_cost_is_stored_and_flagged() -> None:
    h = harness()
    out = h.run(event("CDR", cdr("C1-C", credit=True, credit_reference="C1", cost="2.50"), received=1))
    assert column(out.batch, "cdrs", CDR_COLUMNS, "credit") == [True]
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == ["CREDIT_POSITIVE_COST"]


def test_the_cdr_row_carries_home_charging_compensation_absent_as_false() -> None:
    # Billing tells a compensation CDR (money owed to the driver) from charging by this column (migration 0027).
    h = harness()
    out = h.run(event("CDR", {**cdr("H1"), "home_charging_compensation": True}, received=1),
                event("CDR", cdr("C2"), received=2))
    assert column(out.batch, "cdrs", CDR_COLUMNS, "home_charging_compensation") == [True, False]


def test_a_cdr_of_a_token_no_party_of_ours_issued_is_stored_flagged_and_not_billed() -> None:
    # OCPI_TOKEN_PARTIES: the eMSP parties whose tokens we bill. A CDR of another eMSP's token (cdr_token's
    # country_code/party_id, CiStrings) was sent to the wrong eMSP: kept (immutable) and flagged, to dispute with the
    # CPO; its row says so, and billable_lines leaves its line out (migration 0029). Not checked when the setting is
    # empty (a hub carries every eMSP's tokens).
    rules = dataclasses.replace(builders.stage_rules(), token_parties=frozenset({("NL", "EMS"), ("BE", "EMS")}))
    h = Harness(process_cdrs, CdrState, rules)
    ours = cdr("C1")  # NL/EMS
    lower = {**cdr("C2"), "cdr_token": {**cdr("C2")["cdr_token"], "country_code": "be", "party_id": "ems"}}
    foreign = {**cdr("C3"), "cdr_token": {**cdr("C3")["cdr_token"], "party_id": "XYZ"}}
    out = h.run(event("CDR", ours, received=1), event("CDR", lower, received=2), event("CDR", foreign, received=3))
    assert column(out.batch, "cdrs", CDR_COLUMNS, "token_of_another_emsp") == [False, False, True]
    [anomaly] = rows(out.batch, "anomalies")
    assert anomaly[ANOMALY_COLUMNS.index("kind")] == "CDR_OF_ANOTHER_EMSP"
    assert anomaly[ANOMALY_COLUMNS.index("object_id")] == "C3"
    assert anomaly[ANOMALY_COLUMNS.index("detail")] == "cdr_token of NL/XYZ, not one of OCPI_TOKEN_PARTIES"
    unchecked = Harness(process_cdrs, CdrState).run(event("CDR", foreign, received=1))
    assert rows(unchecked.batch, "anomalies") == []
    assert column(unchecked.batch, "cdrs", CDR_COLUMNS, "token_of_another_emsp") == [False]

def test_a_redelivered_record_is_not_a_duplicate() -> None:
    h = harness()
    post = h.feed.record(event("CDR", cdr(), received=1))
    h.run(post)
    out = h.run(post)
    assert out.replayed == 1 and outcomes(out) == {}


def test_a_cdr_event_kafka_holds_twice_stays_applied() -> None:
    """The same event twice on the topic (a producer's resend, same event_id) is not the CPO posting the CDR again:
    its row stays APPLIED (a DUPLICATE row would replace it: same key)."""
    h = harness()
    post = event("CDR", cdr(), received=1)
    out = h.run(post, post)
    assert outcomes(out) == {post.event_id: "APPLIED"} and len(rows(out.batch, "cdrs")) == 1
    assert rows(h.run(post).batch, "raw_events") == []


def test_the_same_cdr_with_its_dimensions_in_another_order_is_a_duplicate() -> None:
    """A period's dimensions are a set of measurements (`ocpi.patch`: a CPO serialising them from an unordered map
    changes their order): the same CDR resent with them reordered was a CONFLICT with a CDR_CONFLICT anomaly."""
    h = harness()
    h.run(event("CDR", cdr(), received=1))
    body = cdr(updated=90)
    body["charging_periods"][0]["dimensions"].reverse()
    again = event("CDR", body, received=2)
    out = h.run(again)
    assert outcomes(out) == {again.event_id: "DUPLICATE"}
    assert rows(out.batch, "anomalies") == []


@pytest.mark.parametrize("change", ["id", "owner", "token uid", "tariff id", "credit false", "home charging false"])
def test_the_same_cdr_with_cistrings_in_another_case_or_a_false_flag_spelt_out_is_a_duplicate(change: str) -> None:
    """A CiString is case-insensitive (02 §9) and an absent `credit`/`home_charging_compensation` is `false`: a CDR
    sent again with its id in another case (the same CDR: same Kafka key, state and row), or a CPO's Sender list
    spelling out `credit: false` where its push left it out, was a CONFLICT with a CDR_CONFLICT anomaly."""
    h = harness()
    original = event("CDR", cdr(tariffs=[TARIFF]), received=1)
    h.run(original)
    body = cdr(tariffs=[{**TARIFF, "id": "t1"}] if change == "tariff id" else [TARIFF], updated=90,
               cid="c1" if change == "id" else "C1", cc="nl" if change == "owner" else "NL",
               pid="tnm" if change == "owner" else "TNM", uid="tok1" if change == "token uid" else "TOK1",
               credit=False if change == "credit false" else None)
    if change == "home charging false":
        body["home_charging_compensation"] = False
    again = event("CDR", body, received=2)
    out = h.run(again)
    assert outcomes(out) == {again.event_id: "DUPLICATE"}
    assert rows(out.batch, "anomalies") == [] and rows(out.batch, "cdrs") == []
    assert h.state("NL/TNM/C1").event_id == original.event_id


def test_a_cdr_differing_in_a_case_sensitive_string_or_a_flag_set_is_still_a_conflict() -> None:
    h = harness()
    h.run(event("CDR", cdr(), received=1))
    body = cdr(updated=90)
    body["cdr_location"]["city"] = "UTRECHT"  # a string, not a CiString
    flagged = cdr(updated=91)
    flagged["home_charging_compensation"] = True
    first, second = event("CDR", body, received=2), event("CDR", flagged, received=3)
    out = h.run(first, second)
    assert outcomes(out) == {first.event_id: "CONFLICT", second.event_id: "CONFLICT"}


def test_a_cdr_state_written_before_the_case_insensitive_hash_compares_content_hashes() -> None:
    """A state written before `same_hash` was kept has none: its CDR sent again in another case stays a CONFLICT
    (the original is kept either way); the same content again is a DUPLICATE as it always was."""
    h = harness()
    h.run(event("CDR", cdr(), received=1))
    before = msgspec.structs.asdict(h.state("NL/TNM/C1"))
    del before["same_hash"]
    h.store.data["NL/TNM/C1"] = msgspec.msgpack.encode(before)  # as the state was encoded without the field
    assert h.state("NL/TNM/C1").same_hash == ""
    same, other_case = event("CDR", cdr(updated=90), received=2), event("CDR", cdr("c1", updated=91), received=3)
    out = h.run(same, other_case)
    assert outcomes(out) == {same.event_id: "DUPLICATE", other_case.event_id: "CONFLICT"}


def _ci_normalized(value: Any, spec: Any) -> Any:
    """The CDR's CiString values upper-cased, as `cdr_content_hash` is defined (`spec`: `ocpi.canonical.ci_spec`)."""
    if value is None:
        return None
    if type(value) is list:
        return [_ci_normalized(item, spec) for item in value]
    if spec is True:
        return ci_normalize(value) if type(value) is str else value
    if type(value) is dict:
        return {key: _ci_normalized(item, spec[key]) if key in spec else item for key, item in value.items()}
    return value


def _cdr_content_hash_as_defined(payload: dict[str, Any]) -> str:
    """`cdr_content_hash` as it is defined: `content_hash` of the CiString-normalised tree, false flags absent."""
    tree = _ci_normalized(payload, ci_spec(CDR))
    for name in ("credit", "home_charging_compensation"):
        if tree.get(name) is False:
            del tree[name]
    return content_hash(tree)


def _variants() -> list[dict[str, Any]]:
    mixed = cdr("c1", cc="nl", pid="tNm", uid="tok1", tariffs=[{**TARIFF, "id": "t1"}], credit=False,
                credit_reference="ref", authref="Auth1", session_id="s1")
    mixed["home_charging_compensation"] = False
    mixed["charging_periods"][0]["dimensions"].reverse()
    flagged = cdr(credit=True, credit_reference="C0", cost="-2.50")
    flagged["home_charging_compensation"] = True
    flagged["remark"] = "Remark"
    trailing = cdr(kwh="10.500", cost="2.5000", tariffs=[TARIFF], session_id=None)
    return [cdr(), cdr(tariffs=[TARIFF]), mixed, flagged, trailing]


@pytest.mark.parametrize("index", range(5))
def test_the_cdr_content_hash_is_the_content_hash_of_the_normalised_cdr(
        index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cdr_content_hash` canonicalises and normalises in one walk (it runs for every CDR event): its value is
    stored in the state, so it must stay exactly the hash of its definition, and the values it had."""
    monkeypatch.setattr(builders, "T0", _PINNED_T0)  # the builders' times follow today's date; the pins cannot
    payload = event("CDR", _variants()[index]).payload
    assert cdr_content_hash(payload) == _cdr_content_hash_as_defined(payload) == _PINNED[index]


_PINNED_T0: Final = datetime(2026, 11, 25, 8, tzinfo=UTC)  # the builders' T0 when the hashes were pinned
_PINNED: Final = (  # the hashes of `_variants()` as stored in CDR states since same_hash was kept
    "908dc9fce38f9ca3fd08bbc6dbbbe8d27a5c315df15af6a0242156699626b7e0",
    "7eb07eca1b23c1b7a6d2dde5d30d3a5557921a2b3f4bf977350733eb76c836c0",
    "c426bc58b8eead74a084e8ba8082609e7d50cce33678457b563e587b69506a9c",
    "89529b1e734ae127942dc18412d96934e6a85dd04989ad94e2e594c8ddacfe89",
    "df536d3d2e70cbaba0ddf743a45f6305f97e4aa99aa3f31bf4ad01a07bd8ced9",
)


def test_the_cdr_content_hash_of_values_the_decoder_does_not_give_is_the_defined_one() -> None:
    payload = event("CDR", cdr(tariffs=[TARIFF])).payload
    payload["charging_periods"][0]["dimensions"][0]["extra"] = (b"\x00", ("a", None), [])
    payload["total_cost"]["note"] = {"last_updated": 1, "empty": [], "n": None, "x": 1.5, "flag": True}
    assert cdr_content_hash(payload) == _cdr_content_hash_as_defined(payload)
    payload["start_date_time"] = payload["start_date_time"].replace(tzinfo=None)
    with pytest.raises(ValueError, match="naive datetime"):
        cdr_content_hash(payload)
