"""Stage 1 for Sessions: dedup, stale updates, PATCH merge and parking, lifecycle, idle gaps, replays."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec

from infra.kafka.admin import RECORD_MAX_BYTES
from ocpi.compat import CompatProfile
from pipeline.facts import SessionFact
from pipeline.projection import ANOMALY_COLUMNS, RAW_EVENT_COLUMNS, SESSION_COLUMNS, SESSION_HISTORY_COLUMNS
from pipeline.sessions import process_sessions
from pipeline.state import SessionState
from pipeline.state_retention import pseudonymise_session_state

from .builders import Harness, column, event, iso, period, rows, session, stage_rules, ts

KEY = "NL/TNM/S1"


def harness(**rules: Any) -> Harness:
    return Harness(process_sessions, SessionState, stage_rules(**rules) if rules else None)


def outcomes(out: Any) -> list[tuple[str, str]]:
    return sorted(zip(column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "event_id"),
                      column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "outcome"), strict=True))


def kinds(out: Any) -> list[str]:
    return sorted(column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind"))


def stored(h: Harness) -> dict[str, Any]:
    state = h.state(KEY)
    assert state is not None and state.object_json is not None
    return json.loads(state.object_json)


def test_a_new_session_is_applied_with_a_row_its_first_status_and_a_fact() -> None:
    h = harness()
    put = event("Session", session(status="PENDING"), received=1)
    out = h.run(put)
    assert outcomes(out) == [(put.event_id, "APPLIED")]
    [row] = rows(out.batch, "sessions")
    assert row[SESSION_COLUMNS.index("session_id")] == "S1" and row[SESSION_COLUMNS.index("status")] == "PENDING"
    assert row[SESSION_COLUMNS.index("version")] == int(ts(0).timestamp() * 1_000_000) * 1000
    assert column(out.batch, "session_status_history", SESSION_HISTORY_COLUMNS, "transition") == ["INITIAL"]
    [fact] = out.facts["NL/TNM"]
    assert isinstance(fact, SessionFact) and fact.status == "PENDING" and fact.token.startswith("psn:")
    assert h.state(KEY).offset == 0


def test_a_retry_and_a_bumped_last_updated_are_duplicates_and_create_no_version() -> None:
    h = harness()
    body = session(kwh="5")
    h.run(event("Session", body, received=1))
    retry = event("Session", body, received=2)
    bumped = event("Session", {**body, "last_updated": iso(ts(10))}, received=3)
    out = h.run(retry, bumped)
    assert outcomes(out) == sorted([(retry.event_id, "DUPLICATE"), (bumped.event_id, "DUPLICATE")])
    assert rows(out.batch, "sessions") == [] and out.facts == {}
    assert h.state(KEY).last_updated == ts(0)  # the bump did not become the stored state


def test_an_older_put_is_stale_recorded_and_not_applied() -> None:
    h = harness()
    h.run(event("Session", session(kwh="5", updated=10), received=1))
    old = event("Session", session(kwh="2", updated=5), received=2)
    out = h.run(old)
    assert outcomes(out) == [(old.event_id, "STALE")]
    assert kinds(out) == ["STALE_UPDATE"] and rows(out.batch, "sessions") == []
    assert stored(h)["kwh"] == 5


def test_equal_last_updated_with_new_content_is_applied_and_the_version_still_grows() -> None:
    h = harness()
    first = h.run(event("Session", session(kwh="5", updated=10), received=1))
    second = h.run(event("Session", session(kwh="6", updated=10), received=2))
    v1 = rows(first.batch, "sessions")[0][SESSION_COLUMNS.index("version")]
    v2 = rows(second.batch, "sessions")[0][SESSION_COLUMNS.index("version")]
    assert v2 == v1 + 2 and stored(h)["kwh"] == 6


def test_a_fifo_resend_after_an_outage_changes_nothing() -> None:
    h = harness()
    e1 = session(kwh="1", updated=1)
    e2 = session(kwh="2", updated=2)
    e3 = session(kwh="3", updated=3)
    h.run(*(event("Session", b, received=i) for i, b in enumerate((e1, e2, e3))))
    resent = [event("Session", b, received=10 + i) for i, b in enumerate((e1, e2, e3))]
    out = h.run(*resent)
    assert [o for _, o in outcomes(out)].count("STALE") == 2
    assert [o for _, o in outcomes(out)].count("DUPLICATE") == 1
    assert rows(out.batch, "sessions") == [] and stored(h)["kwh"] == 3


def test_patch_merges_fields_and_appends_charging_periods_once() -> None:
    h = harness()
    h.run(event("Session", session(periods=[period(0, "1")]), received=1))
    patch = {"kwh": Decimal("4"), "charging_periods": [period(10, "3")], "last_updated": iso(ts(10))}
    h.run(event("SessionPatch", patch, object_id="S1", received=2))
    retried_with_new_time = {**patch, "kwh": Decimal("4.5"), "last_updated": iso(ts(11))}
    h.run(event("SessionPatch", retried_with_new_time, object_id="S1", received=3))
    document = stored(h)
    assert document["kwh"] == 4.5
    assert [p["start_date_time"] for p in document["charging_periods"]] == [iso(ts(0)), iso(ts(10))]
    assert document["last_updated"] == iso(ts(11))


def test_a_start_with_a_fifth_fraction_digit_survives_a_patch() -> None:
    """`2024-01-01T08:00:00.12345` (no `Z`, 25 characters) is an OCPI DateTime: the stored Session, which a PATCH
    is merged onto, must keep it, or the row's start and the reconciliation fact change under a PATCH that does
    not touch them (they were truncated to .1234)."""
    h = harness()
    start = ts(0).replace(microsecond=123450)
    body = {**session(kwh="5"), "start_date_time": f"{start:%Y-%m-%dT%H:%M:%S}.12345"}
    h.run(event("Session", body, received=1))
    out = h.run(event("SessionPatch", {"kwh": Decimal("6"), "last_updated": iso(ts(5))}, object_id="S1",
                      received=2))
    assert column(out.batch, "sessions", SESSION_COLUMNS, "start_date_time") == [start]
    assert out.facts == {}  # nothing reconciliation reads changed
    assert stored(h)["start_date_time"] == f"{start:%Y-%m-%dT%H:%M:%S}.12345"


def test_a_patch_repeating_a_period_with_its_dimensions_in_another_order_does_not_double_it() -> None:
    """A period's dimensions are a set of measurements, not a sequence: a CPO that sends every period so far on
    each PATCH from an unordered map (a Go map, a hash set) writes them in a different order every time."""
    h = harness()
    h.run(event("Session", session(), received=1))
    energy, time = {"type": "ENERGY", "volume": Decimal("2")}, {"type": "TIME", "volume": Decimal("0.5")}
    first = {"start_date_time": iso(ts(1)), "dimensions": [energy, time], "tariff_id": "T1"}
    h.run(event("SessionPatch", {"charging_periods": [first], "last_updated": iso(ts(2))}, object_id="S1",
                received=2))
    h.run(event("SessionPatch", {"kwh": Decimal("2"), "last_updated": iso(ts(3))}, object_id="S1", received=3))
    again = {**first, "dimensions": [time, energy]}
    later = {"start_date_time": iso(ts(4)), "dimensions": [energy], "tariff_id": "T1"}
    h.run(event("SessionPatch", {"charging_periods": [again, later], "last_updated": iso(ts(5))}, object_id="S1",
                received=4))
    assert [p["start_date_time"] for p in stored(h)["charging_periods"]] == [iso(ts(1)), iso(ts(4))]


def test_a_put_with_the_body_of_the_patch_before_it_replaces_the_charging_periods() -> None:
    """A CPO that PATCHes whole Sessions: the PATCH appended its periods, the PUT with the same body replaces them
    (09 §3.3), so it is not a duplicate of the PATCH although the bodies hash alike; a retried PUT still is."""
    h = harness()
    h.run(event("Session", session(periods=[period(0, "1"), period(5, "2")]), received=1))
    whole = session(kwh="6", periods=[period(10, "3")], updated=10)
    h.run(event("SessionPatch", whole, object_id="S1", received=2))
    assert [p["start_date_time"] for p in stored(h)["charging_periods"]] == [iso(ts(0)), iso(ts(5)), iso(ts(10))]
    put = event("Session", {**whole, "last_updated": iso(ts(20))}, received=3)
    retry = event("Session", {**whole, "last_updated": iso(ts(21))}, received=4)
    out = h.run(put, retry)
    assert outcomes(out) == sorted([(put.event_id, "APPLIED"), (retry.event_id, "DUPLICATE")])
    assert [p["start_date_time"] for p in stored(h)["charging_periods"]] == [iso(ts(10))]
    [row] = rows(out.batch, "sessions")
    periods = json.loads(bytes(row[SESSION_COLUMNS.index("payload_json")]))["charging_periods"]
    assert [p["start_date_time"] for p in periods] == [iso(ts(10))]


def test_patch_before_put_is_parked_then_applied_after_the_put() -> None:
    h = harness()
    patch = event("SessionPatch", {"kwh": Decimal("7"), "status": "COMPLETED", "end_date_time": iso(ts(30)),
                                   "last_updated": iso(ts(30))}, object_id="S1", received=1)
    first = h.run(patch)
    assert outcomes(first) == [(patch.event_id, "PARKED")] and rows(first.batch, "sessions") == []
    put = event("Session", session(kwh="0", updated=0), received=2)
    second = h.run(put)
    assert outcomes(second) == sorted([(put.event_id, "APPLIED"), (patch.event_id, "APPLIED")])
    # One row per batch, the last version (the PUT's ACTIVE one is superseded in the same batch).
    assert [r[SESSION_COLUMNS.index("status")] for r in rows(second.batch, "sessions")] == ["COMPLETED"]
    assert stored(h)["kwh"] == 7 and h.state(KEY).parked == []


def test_a_parked_patch_applied_after_its_put_dates_the_state_from_the_put() -> None:
    # Applied when the PUT came: the idle clock, final_at and the row's received_at start then, not at its own
    # (earlier) receipt.
    h = harness(park_ttl_min=5, idle_min=60)
    patch = event("SessionPatch", {"kwh": Decimal("3"), "status": "COMPLETED", "end_date_time": iso(ts(2)),
                                   "last_updated": iso(ts(2))}, object_id="S1", received=0)
    h.run(patch)
    out = h.run(event("Session", session(status="ACTIVE", updated=1), received=4))
    assert column(out.batch, "sessions", SESSION_COLUMNS, "received_at") == [ts(4)]
    assert h.state(KEY).applied_at == ts(4) and h.state(KEY).final_at == ts(4)
    [fact] = [f for f in out.facts["NL/TNM"] if f.status == "COMPLETED"]
    assert isinstance(fact, SessionFact) and fact.final_at == ts(4)


def test_a_parked_patch_does_not_start_the_idle_clock_early() -> None:
    h = harness(park_ttl_min=5, idle_min=60)
    h.run(event("SessionPatch", {"kwh": Decimal("3"), "last_updated": iso(ts(2))}, object_id="S1", received=0))
    h.run(event("Session", session(status="ACTIVE", updated=1), received=4))
    out = h.run(event("SessionPatch", {"kwh": Decimal("6"), "last_updated": iso(ts(61))}, object_id="S1",
                      received=62))
    assert kinds(out) == []


def test_a_session_accepted_under_a_relaxation_takes_later_patches() -> None:
    # `#NA` in a required string the spec does not name is accepted as it is (NA_IN_ANY_REQUIRED_STRING): a merge
    # keeps it, and the re-check of the merged Session must accept it again.
    h = harness()
    relaxed = CompatProfile.from_names("NA_IN_ANY_REQUIRED_STRING")
    put = event("Session", session(location="#NA"), received=1, profile=relaxed)
    assert put.relaxations == ["NA_IN_ANY_REQUIRED_STRING:$.location_id"]
    h.run(put)
    patch = event("SessionPatch", {"status": "COMPLETED", "kwh": Decimal("12"), "last_updated": iso(ts(30))},
                  object_id="S1", received=30)
    out = h.run(patch)
    assert outcomes(out) == [(patch.event_id, "APPLIED")] and kinds(out) == []
    assert stored(h)["status"] == "COMPLETED" and stored(h)["location_id"] == "#NA"


def test_patch_and_put_in_one_batch_leave_one_raw_row_per_event() -> None:
    h = harness()
    patch = event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(30))}, object_id="S1", received=1)
    put = event("Session", session(), received=2)
    out = h.run(patch, put)
    assert outcomes(out) == sorted([(patch.event_id, "APPLIED"), (put.event_id, "APPLIED")])


def test_a_parked_patch_that_is_older_than_the_put_is_stale() -> None:
    h = harness()
    patch = event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(5))}, object_id="S1", received=1)
    h.run(patch)
    out = h.run(event("Session", session(kwh="9", updated=10), received=2))
    assert dict(outcomes(out))[patch.event_id] == "STALE" and stored(h)["kwh"] == 9


def test_a_parked_patch_becomes_an_orphan_when_its_put_comes_too_late() -> None:
    h = harness(park_ttl_min=5)
    patch = event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(30))}, object_id="S1", received=0)
    h.run(patch)
    put = event("Session", session(kwh="1", updated=20), received=6)  # 6 min later: past the 5 min TTL
    out = h.run(put)
    assert outcomes(out) == sorted([(patch.event_id, "ORPHANED"), (put.event_id, "APPLIED")])
    assert kinds(out) == ["ORPHAN_EVENT"]
    assert stored(h)["kwh"] == 1 and h.state(KEY).parked == []
    # The same words as the deadline sweep uses when no later event ends the wait (test_store).
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "detail") == ["waited 0:05:00 for its Session PUT"]
    details = dict(zip(column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "event_id"),
                       column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "outcome_detail"), strict=True))
    assert details[patch.event_id] == "its Session PUT did not arrive within 0:05:00"


def test_a_parked_patch_whose_put_was_stamped_within_the_ttl_is_applied_whatever_landed_first() -> None:
    """Two pushes of one Session a moment apart land on its partition in either order: each is stamped as it is
    received and written within OCPI_KAFKA_SEND_TIMEOUT of its stamp (the margin the deadline sweep keeps). A PATCH
    stamped just past a parked PATCH's deadline, landing before the PUT stamped just within it, orphaned the parked
    one, although its PUT came within OCPI_PIPELINE_PARK_TTL (by receive time), the README's rule, and the sweep
    would have seen the PUT first: its kWh was lost."""
    h = harness(park_ttl_min=5, margin_min=0.5)
    waiting = event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(30))}, object_id="S1", received=0)
    past = event("SessionPatch", {"status": "ACTIVE", "last_updated": iso(ts(31))}, object_id="S1", received=5.1)
    put = event("Session", session(kwh="1", status="PENDING", updated=20), received=4.9)  # landed after `past`
    out = h.run(waiting, past, put)
    assert dict(outcomes(out)) == {waiting.event_id: "APPLIED", past.event_id: "APPLIED", put.event_id: "APPLIED"}
    assert kinds(out) == [] and stored(h)["kwh"] == 7 and stored(h)["status"] == "ACTIVE"
    # A PUT stamped past the deadline still orphans it, whatever the margin.
    h = harness(park_ttl_min=5, margin_min=0.5)
    h.run(waiting)
    out = h.run(event("Session", session(kwh="1", updated=20), received=5.1))
    assert dict(outcomes(out))[waiting.event_id] == "ORPHANED" and kinds(out) == ["ORPHAN_EVENT"]
    # So does any push of it stamped past the deadline and the margin, the PUT not come.
    h = harness(park_ttl_min=5, margin_min=0.5)
    out = h.run(waiting, event("SessionPatch", {"kwh": Decimal("8"), "last_updated": iso(ts(31))}, object_id="S1",
                               received=5.6))
    assert dict(outcomes(out))[waiting.event_id] == "ORPHANED" and kinds(out) == ["ORPHAN_EVENT"]


def test_parking_is_bounded() -> None:
    h = harness(park_max=2)
    patches = [event("SessionPatch", {"kwh": Decimal(i), "last_updated": iso(ts(i))}, object_id="S1", received=i / 10)
               for i in range(1, 4)]
    out = h.run(*patches)
    assert [o for _, o in outcomes(out)].count("PARKED") == 2
    assert dict(outcomes(out))[patches[2].event_id] == "ORPHANED" and kinds(out) == ["PARK_OVERFLOW"]


def test_a_merge_that_is_not_a_valid_session_is_recorded_not_stored() -> None:
    h = harness()
    h.run(event("Session", session(), received=1))
    bad = event("SessionPatch", {"id": "OTHER", "kwh": Decimal("3"), "last_updated": iso(ts(5))}, object_id="S1",
                received=2)
    out = h.run(bad)
    assert outcomes(out) == [(bad.event_id, "INVALID")] and kinds(out) == ["INVALID_MERGE"]
    assert rows(out.batch, "sessions") == [] and stored(h)["kwh"] == 0


def test_leaving_a_final_state_is_rejected_and_the_session_stays_completed() -> None:
    h = harness()
    h.run(event("Session", session(status="COMPLETED", kwh="5", end=30, updated=30), received=1))
    back = event("SessionPatch", {"status": "ACTIVE", "last_updated": iso(ts(40))}, object_id="S1", received=2)
    out = h.run(back)
    assert outcomes(out) == [(back.event_id, "REJECTED")] and kinds(out) == ["ILLEGAL_TRANSITION"]
    assert rows(out.batch, "sessions") == [] and stored(h)["status"] == "COMPLETED"


def test_a_backward_move_between_open_states_is_applied_and_recorded() -> None:
    h = harness()
    h.run(event("Session", session(status="ACTIVE"), received=1))
    back = event("SessionPatch", {"status": "PENDING", "last_updated": iso(ts(5))}, object_id="S1", received=2)
    out = h.run(back)
    assert outcomes(out) == [(back.event_id, "APPLIED")] and kinds(out) == ["ILLEGAL_TRANSITION"]
    assert column(out.batch, "session_status_history", SESSION_HISTORY_COLUMNS, "transition") == ["ILLEGAL"]
    assert stored(h)["status"] == "PENDING"


def test_a_change_after_completion_is_applied_and_flagged() -> None:
    h = harness()
    h.run(event("Session", session(status="COMPLETED", kwh="5", end=30, updated=30), received=1))
    cost = event("SessionPatch", {"total_cost": {"excl_vat": Decimal("2"), "incl_vat": Decimal("2.42")},
                                  "last_updated": iso(ts(31))}, object_id="S1", received=2)
    out = h.run(cost)
    assert outcomes(out) == [(cost.event_id, "APPLIED")] and kinds(out) == ["UPDATE_AFTER_FINAL"]
    assert rows(out.batch, "session_status_history") == []  # the status did not change


def test_a_push_that_leaves_a_final_session_as_it_is_is_a_duplicate_not_an_update_after_final() -> None:
    # Completed by a PATCH, then confirmed by a PATCH of its status alone and by a PUT of the whole final Session:
    # neither changes anything but last_updated, so neither is a change after completion, nor a new version.
    h = harness()
    h.run(event("Session", session(status="ACTIVE", kwh="3"), received=1))
    h.run(event("SessionPatch", {"status": "COMPLETED", "kwh": Decimal("5"), "end_date_time": iso(ts(30)),
                                 "last_updated": iso(ts(30))}, object_id="S1", received=30))
    status = event("SessionPatch", {"status": "COMPLETED", "last_updated": iso(ts(31))}, object_id="S1",
                   received=31)
    whole = event("Session", session(status="COMPLETED", kwh="5", end=30, updated=32), received=32)
    out = h.run(status, whole)
    assert outcomes(out) == sorted([(status.event_id, "DUPLICATE"), (whole.event_id, "DUPLICATE")])
    assert kinds(out) == [] and rows(out.batch, "sessions") == [] and out.facts == {}
    assert h.state(KEY).confirmed == ts(32)  # the CPO confirmed that content then: an older push is stale
    late = event("SessionPatch", {"kwh": Decimal("9"), "last_updated": iso(ts(31))}, object_id="S1", received=33)
    assert outcomes(h.run(late)) == [(late.event_id, "STALE")]
    changed = event("SessionPatch", {"kwh": Decimal("6"), "last_updated": iso(ts(40))}, object_id="S1",
                    received=40)
    out = h.run(changed)  # a real change after completion is still one
    assert outcomes(out) == [(changed.event_id, "APPLIED")] and kinds(out) == ["UPDATE_AFTER_FINAL"]


def test_a_final_session_pushed_again_with_its_dimensions_in_another_order_is_a_duplicate() -> None:
    # "As stored but for last_updated" is the content hash's rule (ocpi.canonical): a period's dimensions are a
    # set, so the same final Session with them in another order changes nothing after completion.
    energy, time = {"type": "ENERGY", "volume": Decimal("5")}, {"type": "TIME", "volume": Decimal("0.5")}
    h = harness()
    h.run(event("Session", session(status="ACTIVE", kwh="3"), received=1))
    first = {"start_date_time": iso(ts(0)), "dimensions": [energy, time]}
    h.run(event("SessionPatch", {"status": "COMPLETED", "kwh": Decimal("5"), "end_date_time": iso(ts(30)),
                                 "charging_periods": [first], "last_updated": iso(ts(30))}, object_id="S1",
                received=30))
    again = {"start_date_time": iso(ts(0)), "dimensions": [time, energy]}
    whole = event("Session", session(status="COMPLETED", kwh="5", end=30, updated=32, periods=[again]), received=32)
    out = h.run(whole)
    assert outcomes(out) == [(whole.event_id, "DUPLICATE")]
    assert kinds(out) == [] and rows(out.batch, "sessions") == []


def test_a_final_session_pushed_again_with_cistrings_in_another_case_is_a_duplicate() -> None:
    # A CiString is case-insensitive (02 §9): the same final Session spelled otherwise (a Sender list that
    # upper-cases its ids) changes nothing after completion, as a CDR spelled so is the same CDR.
    h = harness()
    h.run(event("Session", session("s1", status="COMPLETED", kwh="5", end=30, updated=30, location="loc1",
                                   periods=[{**period(0, "5"), "tariff_id": "T1"}]), received=1))
    spelled = event("Session", session("S1", status="COMPLETED", kwh="5", end=30, updated=31, location="LOC1",
                                       periods=[{**period(0, "5"), "tariff_id": "t1"}]), received=31)
    out = h.run(spelled)
    assert outcomes(out) == [(spelled.event_id, "DUPLICATE")]
    assert kinds(out) == [] and rows(out.batch, "sessions") == []
    assert stored(h)["id"] == "s1" and stored(h)["location_id"] == "loc1"  # as first stored
    other = event("Session", session("S1", status="COMPLETED", kwh="5", end=30, updated=32, location="LOC2",
                                     periods=[{**period(0, "5"), "tariff_id": "t1"}]), received=32)
    assert kinds(h.run(other)) == ["UPDATE_AFTER_FINAL"]  # another location is a change all the same


def test_a_final_session_pushed_again_after_its_state_was_pseudonymised_is_a_duplicate() -> None:
    # The state retention pass rewrites the stored Session's token uid, contract id and authorization reference as
    # pseudonyms (pipeline.state_retention); the same final Session pushed again (a pull over an old window, a
    # partner's resend) brings them in clear. It changes nothing: no UPDATE_AFTER_FINAL, no version, and no row
    # that puts them in clear again, dated anew, for another OCPI_RETENTION_PSEUDONYMISE_DAYS.
    h = harness()
    h.run(event("Session", session(status="ACTIVE", kwh="3", authref="AUTH1"), received=1))
    h.run(event("SessionPatch", {"status": "COMPLETED", "kwh": Decimal("5"), "end_date_time": iso(ts(30)),
                                 "last_updated": iso(ts(30))}, object_id="S1", received=30))
    spelled = event("Session", session(status="COMPLETED", kwh="5", end=30, updated=31, authref="auth1"),
                    received=31)  # a CiString in another case, the state still in clear: the same value
    assert outcomes(h.run(spelled)) == [(spelled.event_id, "DUPLICATE")]
    h.store.data[KEY] = pseudonymise_session_state(h.store.data[KEY], h.pseudonym, ts(60))
    assert stored(h)["cdr_token"]["uid"].startswith("psn:")
    later = 100 * 24 * 60
    whole = event("Session", session(status="COMPLETED", kwh="5", end=30, updated=32, authref="AUTH1"),
                  received=later, source="PULL")
    token = event("SessionPatch", {"status": "COMPLETED", "cdr_token": session()["cdr_token"],
                                   "last_updated": iso(ts(33))}, object_id="S1", received=later + 1)
    out = h.run(whole, token)
    assert outcomes(out) == sorted([(whole.event_id, "DUPLICATE"), (token.event_id, "DUPLICATE")])
    assert kinds(out) == [] and rows(out.batch, "sessions") == [] and out.facts == {}
    assert h.state(KEY).confirmed == ts(33)
    other = event("Session", session(status="COMPLETED", kwh="5", end=30, updated=34, authref="AUTH1", uid="TOK2"),
                  received=later + 2)
    out = h.run(other)  # another token is a change after completion all the same
    assert outcomes(out) == [(other.event_id, "APPLIED")] and kinds(out) == ["UPDATE_AFTER_FINAL"]


def test_status_history_keeps_every_change() -> None:
    h = harness()
    out = h.run(event("Session", session(status="PENDING"), received=1),
                event("SessionPatch", {"status": "ACTIVE", "last_updated": iso(ts(1))}, object_id="S1", received=2),
                event("SessionPatch", {"kwh": Decimal("3"), "last_updated": iso(ts(2))}, object_id="S1", received=3),
                event("SessionPatch", {"status": "COMPLETED", "last_updated": iso(ts(3))}, object_id="S1",
                      received=4))
    history = rows(out.batch, "session_status_history")
    status, previous = SESSION_HISTORY_COLUMNS.index("status"), SESSION_HISTORY_COLUMNS.index("previous_status")
    assert [(r[previous], r[status]) for r in history] == [("", "PENDING"), ("PENDING", "ACTIVE"),
                                                            ("ACTIVE", "COMPLETED")]


def test_a_gap_longer_than_the_idle_time_is_flagged_by_the_next_update() -> None:
    h = harness(idle_min=60)
    first = event("Session", session(status="ACTIVE"), received=0)
    h.run(first)
    out = h.run(event("SessionPatch", {"kwh": Decimal("3"), "last_updated": iso(ts(90))}, object_id="S1",
                      received=90))
    [anomaly] = rows(out.batch, "anomalies")
    assert anomaly[ANOMALY_COLUMNS.index("kind")] == "SESSION_IDLE"
    assert anomaly[ANOMALY_COLUMNS.index("event_id")] == first.event_id  # keyed by the event the gap began with
    assert anomaly[ANOMALY_COLUMNS.index("observed_at")] == ts(60)


def test_a_duplicate_does_not_restart_the_idle_clock() -> None:
    # Idle is a PENDING/ACTIVE session that has not changed for the idle time (README, "session lifecycle"): a
    # retry or a re-push of the same content with a newer last_updated is no change (a DUPLICATE, no row), so the
    # CPO re-sending a session stuck ACTIVE does not hide it; the sweep, reading the last applied row, agrees.
    h = harness(idle_min=60)
    first = event("Session", session(status="ACTIVE", kwh="5"), received=0)
    h.run(first)
    again = h.run(event("Session", session(status="ACTIVE", kwh="5", updated=50), received=50))
    assert outcomes(again)[0][1] == "DUPLICATE" and kinds(again) == []
    out = h.run(event("Session", session(status="ACTIVE", kwh="5", updated=90), received=90))
    [anomaly] = rows(out.batch, "anomalies")
    assert anomaly[ANOMALY_COLUMNS.index("kind")] == "SESSION_IDLE"
    assert anomaly[ANOMALY_COLUMNS.index("event_id")] == first.event_id
    assert anomaly[ANOMALY_COLUMNS.index("observed_at")] == ts(60)


def test_a_patch_of_last_updated_alone_is_a_duplicate_and_does_not_restart_the_idle_clock() -> None:
    # A PATCH that sets only last_updated is a bumped last_updated with no change (README, "duplicate"): it was
    # applied to an open Session as a new version (dedup compared it with the last applied event, a PUT), unlike the
    # same content re-PUT, and restarted the idle clock; its repeats were DUPLICATEs of it. Now none makes a version.
    h = harness(idle_min=60)
    first = event("Session", session(status="ACTIVE", kwh="5"), received=0)
    h.run(first)
    for moment in (20, 40):
        touch = event("SessionPatch", {"last_updated": iso(ts(moment))}, object_id="S1", received=moment)
        out = h.run(touch)
        assert outcomes(out) == [(touch.event_id, "DUPLICATE")] and rows(out.batch, "sessions") == []
        assert kinds(out) == []
    assert stored(h)["last_updated"] == iso(ts(0))
    # It confirms the content at its last_updated: an older PUT arriving after it is stale, as after a duplicate.
    late = h.run(event("Session", session(status="ACTIVE", kwh="6", updated=30), received=45))
    assert outcomes(late)[0][1] == "STALE"
    out = h.run(event("SessionPatch", {"last_updated": iso(ts(150))}, object_id="S1", received=150))
    [anomaly] = rows(out.batch, "anomalies")
    assert anomaly[ANOMALY_COLUMNS.index("kind")] == "SESSION_IDLE"
    assert anomaly[ANOMALY_COLUMNS.index("event_id")] == first.event_id  # the clock runs from the PUT
    assert anomaly[ANOMALY_COLUMNS.index("observed_at")] == ts(60)
    rules = (Path(__file__).resolve().parents[3] / "docs" / "pipeline.md").read_text()
    lifecycle = " ".join(rules.split("### session lifecycle (#9)")[1].split("\n#")[0].split())
    assert "a PATCH of `last_updated` alone is a `DUPLICATE`" in lifecycle


def test_a_put_of_the_session_merged_from_patches_with_a_bumped_last_updated_is_a_duplicate() -> None:
    # A CPO that PATCHes a Session, then PUTs it whole now and then with a newer last_updated and nothing else new
    # (a periodic sync): a bumped last_updated with an unchanged payload (issue #5, item 2) must make no version and
    # must not restart the idle clock. Dedup alone compared the PUT with the last applied event, the PATCH.
    h = harness(idle_min=60)
    first = event("Session", session(status="ACTIVE", kwh="0"), received=0)
    h.run(first, event("SessionPatch", {"kwh": Decimal("5"), "last_updated": iso(ts(10))}, object_id="S1",
                       received=10))
    for moment in (20, 40):
        sync = event("Session", session(status="ACTIVE", kwh="5.000", updated=moment), received=moment)
        out = h.run(sync)
        assert outcomes(out) == [(sync.event_id, "DUPLICATE")] and rows(out.batch, "sessions") == []
        assert out.facts == {} and kinds(out) == []
    assert stored(h)["last_updated"] == iso(ts(10))
    changed = event("Session", session(status="ACTIVE", kwh="6", updated=50), received=50)
    out = h.run(changed)  # a real change is applied as ever
    assert outcomes(out) == [(changed.event_id, "APPLIED")] and len(rows(out.batch, "sessions")) == 1

def test_a_periodic_put_of_an_open_session_compares_as_a_final_sessions_push_does() -> None:
    # The PUT after PATCHes above, sent as a CPO's backend spells it: a period's dimensions in another order,
    # CiString values in another case. The same content (02 §9; dedup's content hash leaves the order of
    # dimensions out), so no version and no restart of the idle clock, as for a final Session.
    h = harness(idle_min=60)
    two = [{"type": "ENERGY", "volume": Decimal("5")}, {"type": "TIME", "volume": Decimal("0.5")}]
    body = session(status="ACTIVE", kwh="0", periods=[{"start_date_time": iso(ts(0)), "dimensions": two}])
    h.run(event("Session", body, received=0),
          event("SessionPatch", {"kwh": Decimal("5"), "last_updated": iso(ts(10))}, object_id="S1", received=10))
    reordered = {**body, "kwh": Decimal("5"), "location_id": "loc1", "last_updated": iso(ts(20)),
                 "charging_periods": [{"start_date_time": iso(ts(0)), "dimensions": two[::-1]}]}
    sync = event("Session", reordered, received=20)
    out = h.run(sync)
    assert outcomes(out) == [(sync.event_id, "DUPLICATE")] and rows(out.batch, "sessions") == []
    assert stored(h)["last_updated"] == iso(ts(10))

def test_facts_follow_matching_keys_and_final_amounts_not_every_kwh_tick() -> None:
    h = harness()
    first = h.run(event("Session", session(status="ACTIVE"), received=1))
    tick = h.run(event("SessionPatch", {"kwh": Decimal("3"), "last_updated": iso(ts(5))}, object_id="S1",
                       received=2))
    done = h.run(event("SessionPatch", {"status": "COMPLETED", "kwh": Decimal("4"), "last_updated": iso(ts(9))},
                       object_id="S1", received=3))
    assert len(first.facts["NL/TNM"]) == 1 and tick.facts == {}
    [fact] = done.facts["NL/TNM"]
    assert isinstance(fact, SessionFact) and fact.kwh == Decimal(4) and fact.final_at == ts(3)


def test_records_read_again_after_a_crash_are_skipped_and_the_state_rewritten() -> None:
    h = harness()
    put = h.feed.record(event("Session", session(), received=1))
    h.run(put)
    h.store.data[KEY] = h.store.data[KEY]  # the state survived the crash, its offset watermark too
    out = h.run(put)  # Kafka delivers it again: not a partner's duplicate
    assert out.replayed == 1 and rows(out.batch, "raw_events") == [] and out.outcomes == {}
    assert h.state(KEY).offset == put.offset


def test_a_duplicate_with_a_newer_time_makes_an_older_push_arriving_later_stale() -> None:
    h = harness()
    h.run(event("Session", session(status="ACTIVE", kwh="5", updated=10), received=1))
    confirmed = event("Session", session(status="ACTIVE", kwh="5", updated=30), received=2)  # same content, t=30
    older = event("SessionPatch", {"kwh": Decimal("4"), "last_updated": iso(ts(20))}, object_id="S1", received=3)
    out = h.run(confirmed, older)
    assert dict(outcomes(out)) == {confirmed.event_id: "DUPLICATE", older.event_id: "STALE"}
    assert stored(h)["kwh"] == 5 and stored(h)["last_updated"] == iso(ts(10))  # no new version


def test_a_replayed_event_that_changes_nothing_leaves_the_original_outcome_alone() -> None:
    h = harness()
    original = event("Session", session(kwh="5", updated=10), received=1)
    older = event("Session", session(kwh="2", updated=5), received=2)
    h.run(original, older)
    replayed = [event("Session", session(kwh="5", updated=10), received=3, event_id=original.event_id,
                      source="REPLAY"),
                event("Session", session(kwh="2", updated=5), received=4, event_id=older.event_id, source="REPLAY")]
    out = h.run(*replayed)
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "anomalies") == []
    assert out.outcomes == {"REPLAYED_DUPLICATE": 1, "REPLAYED_STALE": 1}


def test_a_replayed_refusal_keeps_the_original_row_and_its_source() -> None:
    """Partner health counts pushes by raw_events.source: a replay refused again must not turn the PUSH row into a
    REPLAY row (same event_id)."""
    h = harness()
    h.run(event("Session", session(status="COMPLETED", kwh="5", end=30, updated=30), received=1))
    reopen = event("SessionPatch", {"status": "ACTIVE", "last_updated": iso(ts(40))}, object_id="S1", received=2)
    assert dict(outcomes(h.run(reopen))) == {reopen.event_id: "REJECTED"}
    again = event("SessionPatch", {"status": "ACTIVE", "last_updated": iso(ts(40))}, object_id="S1", received=2,
                  event_id=reopen.event_id, source="REPLAY")
    out = h.run(again)
    assert rows(out.batch, "raw_events") == [] and out.outcomes == {"REPLAYED_REJECTED": 1}


def test_an_event_kafka_holds_twice_keeps_the_outcome_it_had() -> None:
    """A producer that resends a record the broker wrote but did not acknowledge (aiokafka retries retriable errors,
    so does `infra.kafka.publisher`; Tansu has no idempotence) puts the same event, same event_id, on the topic twice.
    The copy is not the partner's retry: it must not turn the APPLIED row of its event into DUPLICATE or STALE (same
    row key), nor be parked a second time."""
    h = harness()
    put = event("Session", session(kwh="5"), received=1)
    tick = event("SessionPatch", {"kwh": Decimal("6"), "last_updated": iso(ts(2))}, object_id="S1", received=2)
    later = event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(3))}, object_id="S1", received=3)
    out = h.run(put, put, tick, later, tick)  # the copy of `tick` comes after `later` (a resent producer batch)
    assert dict(outcomes(out)) == {put.event_id: "APPLIED", tick.event_id: "APPLIED", later.event_id: "APPLIED"}
    assert kinds(out) == [] and stored(h)["kwh"] == 7

    h = harness()
    patch = event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(5))}, object_id="S1", received=1)
    h.run(patch, patch)
    assert [p.event_id for p in h.state(KEY).parked] == [patch.event_id]
    out = h.run(event("Session", session(kwh="5"), received=2))
    assert dict(outcomes(out))[patch.event_id] == "APPLIED" and stored(h)["kwh"] == 7
    out = h.run(patch)  # and a copy after its parked original was applied
    assert rows(out.batch, "raw_events") == [] and kinds(out) == []


def test_a_replayed_copy_of_a_parked_event_is_not_parked_again_nor_rewrites_its_row() -> None:
    """`ocpi-pipeline replay` of a window holding an event still parked (waiting for its Session PUT): the copy
    (same event id, source REPLAY) was parked a second time, taking a parking slot, and its PARKED row replaced the
    original's with source REPLAY, so an event that then waited in vain ended ORPHANED as a replay, not counted by
    partner health (which counts source PUSH). The event already waits: its copy changes nothing."""
    h = harness()
    patch = event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(5))}, object_id="S1", received=1)
    h.run(patch)
    replayed = event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(5))}, object_id="S1", received=1,
                     event_id=patch.event_id, source="REPLAY")
    out = h.run(replayed)
    assert [p.event_id for p in h.state(KEY).parked] == [patch.event_id]
    assert rows(out.batch, "raw_events") == [] and out.outcomes == {"REPLAYED_PARKED": 1}
    out = h.run(event("Session", session(kwh="5"), received=2))
    assert dict(outcomes(out))[patch.event_id] == "APPLIED" and stored(h)["kwh"] == 7


def test_a_push_dated_ahead_of_its_receipt_is_flagged_and_applied() -> None:
    """A CPO clock ahead of ours: its push is applied (the CPO owns the object), but every later push dated before
    it is STALE, so the cause is recorded, not only the STALEs that follow (the duplicate confirms its time too)."""
    h = harness(skew_min=5, idle_min=60 * 24 * 400)
    ahead = event("Session", session(kwh="5", updated=60 * 24 * 365), received=1)  # a year ahead
    confirmed = event("Session", session(kwh="5", updated=60 * 24 * 366), received=2)
    near = event("SessionPatch", {"kwh": Decimal("6"), "last_updated": iso(ts(60 * 24 * 366 + 5))}, object_id="S1",
                 received=60 * 24 * 366)  # 5 minutes ahead: within the skew
    out = h.run(ahead, confirmed, near)
    assert dict(outcomes(out)) == {ahead.event_id: "APPLIED", confirmed.event_id: "DUPLICATE",
                                   near.event_id: "APPLIED"}
    flagged = sorted(zip(column(out.batch, "anomalies", ANOMALY_COLUMNS, "event_id"),
                         column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind"), strict=True))
    assert flagged == sorted([(ahead.event_id, "FUTURE_LAST_UPDATED"), (confirmed.event_id, "FUTURE_LAST_UPDATED")])
    details = column(out.batch, "anomalies", ANOMALY_COLUMNS, "detail")
    assert any("is 364 days, 23:59:00 ahead of its receipt" in d for d in details)


def test_a_retry_with_the_dimensions_in_another_order_is_a_duplicate_and_creates_no_version() -> None:
    """The dimensions of a charging period are a set (`ocpi.patch` skips a period whose dimensions only moved):
    a retried PUT or PATCH with them reordered was applied as a new version of an unchanged Session."""
    def two(start: float) -> dict[str, Any]:
        return {"start_date_time": iso(ts(start)), "dimensions": [{"type": "ENERGY", "volume": Decimal("2")},
                                                                   {"type": "TIME", "volume": Decimal("0.5")}]}

    def moved(start: float) -> dict[str, Any]:
        value = two(start)
        value["dimensions"].reverse()
        return value

    h = harness()
    h.run(event("Session", session(kwh="2", periods=[two(0)]), received=1))
    put = event("Session", session(kwh="2", periods=[moved(0)], updated=5), received=2)
    assert outcomes(h.run(put)) == [(put.event_id, "DUPLICATE")]
    body = {"kwh": Decimal("4"), "charging_periods": [two(10)], "last_updated": iso(ts(10))}
    h.run(event("SessionPatch", body, object_id="S1", received=3))
    retry = event("SessionPatch", {**body, "charging_periods": [moved(10)]}, object_id="S1", received=4)
    out = h.run(retry)
    assert outcomes(out) == [(retry.event_id, "DUPLICATE")]
    assert rows(out.batch, "sessions") == []


def test_an_update_after_final_keeps_the_time_the_session_became_final() -> None:
    # The CDR grace runs from when the session completed: a late total_cost PATCH must not postpone it.
    h = harness()
    h.run(event("Session", session(status="COMPLETED", end=2, updated=2), received=3))
    out = h.run(event("SessionPatch", {"total_cost": {"excl_vat": Decimal("2.50"), "incl_vat": Decimal("3.03")},
                                       "last_updated": iso(ts(20))}, object_id="S1", received=20))
    assert kinds(out) == ["UPDATE_AFTER_FINAL"]
    [fact] = out.facts["NL/TNM"]
    assert isinstance(fact, SessionFact) and fact.final_at == ts(3) and h.state(KEY).final_at == ts(3)


def test_a_batch_of_patches_of_one_session_writes_its_row_once() -> None:
    # Every applied PATCH wrote a `sessions` row carrying the whole Session (payload_json, every charging period
    # so far), superseded in ClickHouse by the next one: a backlog of one long session's PATCHes made an insert
    # that grew with their number times the session's size.
    h = harness()
    h.run(event("Session", session(periods=[period(i * 0.01, "0.5") for i in range(2000)]), received=0))
    patches = [event("SessionPatch", {"charging_periods": [period(30 + i, "0.5")], "kwh": Decimal(i),
                                      "last_updated": iso(ts(30 + i))}, object_id="S1", received=30 + i)
               for i in range(20)]
    out = h.run(*patches, event("SessionPatch", {"status": "COMPLETED", "last_updated": iso(ts(60))},
                                object_id="S1", received=60))
    [row] = rows(out.batch, "sessions")
    assert row[SESSION_COLUMNS.index("version")] == h.state(KEY).version
    assert json.loads(bytes(row[SESSION_COLUMNS.index("payload_json")])) == stored(h)
    assert column(out.batch, "session_status_history", SESSION_HISTORY_COLUMNS, "status") == ["COMPLETED"]


def test_parked_patches_are_bounded_by_their_bytes_so_that_the_state_fits_one_record() -> None:
    # A state value is one changelog record, which a broker refuses above `max.message.bytes` (RECORD_MAX_BYTES,
    # 16 MB) for good: the worker retried that batch for ever, every Session with it. Parked by count alone
    # (OCPI_PIPELINE_PARK_MAX, 32), 32 PATCHes of 4 MB of charging periods (0.69 MB as Avro each) before their
    # PUT made a state of 22 MB.
    h = harness(park_max=32)
    big = event("SessionPatch", {"charging_periods": [period(i * 0.001, "0.5") for i in range(46000)],
                                 "last_updated": iso(ts(1))}, object_id="S1", received=1)
    patches = [msgspec.structs.replace(big, event_id=f"e{i}") for i in range(14)]
    out = h.run(*patches)
    parked = len(h.state(KEY).parked)
    assert 0 < parked < 14
    assert outcomes(out) == sorted([(p.event_id, "PARKED") for p in patches[:parked]]
                                   + [(p.event_id, "ORPHANED") for p in patches[parked:]])
    assert kinds(out) == ["PARK_OVERFLOW"] * (14 - parked)
    assert len(h.store.data[KEY]) < RECORD_MAX_BYTES // 2


def test_a_patch_that_would_grow_the_session_beyond_one_state_record_is_invalid() -> None:
    # Charging periods are appended: four pushes of 46,000 periods each (4 MB of JSON, valid) made a Session of
    # 17.3 MB, a state value above RECORD_MAX_BYTES that the broker refuses for good (the worker retried its batch
    # for ever, every Session with it). A merge beyond ordering.OBJECT_MAX_BYTES is now refused like any invalid
    # merge; the stored Session stays as it was.
    def periods(first: int) -> list[dict[str, Any]]:
        return [period((first + i) * 0.001, "0.5") for i in range(46000)]

    h = harness()
    h.run(event("Session", session(periods=periods(0)), received=0))
    patches = [event("SessionPatch", {"charging_periods": periods(46000 * n), "last_updated": iso(ts(10 + n))},
                     object_id="S1", received=10 + n) for n in (1, 2, 3)]
    out = h.run(*patches)
    assert outcomes(out) == sorted((p.event_id, "INVALID") for p in patches)  # 8.6 MB already
    assert kinds(out) == ["INVALID_MERGE"] * 3
    assert len(h.store.data[KEY]) < RECORD_MAX_BYTES // 2
    assert len(stored(h)["charging_periods"]) == 46000


def test_a_replayed_copy_of_an_event_dated_like_the_stored_session_is_not_applied_again() -> None:
    """Two pushes with one `last_updated`: the later arrival wins. `ocpi-pipeline replay` sends every event again
    after the whole history, so the copy of the first arrives after the second, and "equal is applied" applied it
    again: the Session went back to the content the second had replaced (until the second's copy came), a new
    version was written, and the first's raw_events row (APPLIED, source PUSH) became a REPLAY row. The copy was
    received before the event the stored Session came from: it changes nothing."""
    h = harness()
    first = event("Session", session(kwh="1", updated=20), received=1)
    second = event("Session", session(kwh="2", updated=20), received=2)
    h.run(first, second)
    version = h.state(KEY).version
    out = h.run(event("Session", session(kwh="1", updated=20), received=1, event_id=first.event_id,
                      source="REPLAY"))
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "sessions") == []
    assert out.outcomes == {"REPLAYED_STALE": 1}
    assert stored(h)["kwh"] == 2 and h.state(KEY).version == version

    # Topics that hold only replayed copies (a rebuild after `replay --from-archive`): the later arrival still wins.
    h = harness()
    out = h.run(event("Session", session(kwh="1", updated=20), received=1, source="REPLAY"),
                event("Session", session(kwh="2", updated=20), received=2, source="REPLAY"))
    assert out.outcomes == {"APPLIED": 2} and stored(h)["kwh"] == 2


def test_a_replayed_copy_of_a_patch_orphaned_by_a_late_put_is_not_applied() -> None:
    """A PATCH parked for its Session PUT and ORPHANED when the PUT came after OCPI_PIPELINE_PARK_TTL was never
    applied. `ocpi-pipeline replay` sends its copy (received before the PUT) after the PUT; dated after the PUT, it
    was not stale, so it was applied now: the Session took content the pipeline had refused (a new version, kWh
    changed), and the PATCH's ORPHANED row (source PUSH) became an APPLIED row of source REPLAY. A copy of an event
    received no later than the last one applied that would change the object now was not applied then: STALE."""
    h = harness(park_ttl_min=5)
    patch = event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(30))}, object_id="S1", received=0)
    put = event("Session", session(kwh="1", updated=20), received=6)  # 6 min later: past the 5 min TTL
    out = h.run(patch, put)
    assert dict(outcomes(out)) == {patch.event_id: "ORPHANED", put.event_id: "APPLIED"}
    version = h.state(KEY).version
    out = h.run(event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(30))}, object_id="S1", received=0,
                      event_id=patch.event_id, source="REPLAY"),
                event("Session", session(kwh="1", updated=20), received=6, event_id=put.event_id, source="REPLAY"))
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "sessions") == []
    assert stored(h)["kwh"] == 1 and h.state(KEY).version == version


def test_a_replayed_copy_of_a_patch_orphaned_while_its_put_never_came_is_not_parked_again() -> None:
    """A PATCH for a Session whose PUT never came, ORPHANED when a later PATCH of it arrived past the park TTL: its
    replayed copy was parked again, its row turned PARKED with source REPLAY (then ORPHANED as a replay by the
    sweep: partner health, which counts source PUSH, lost the push). It waited in vain already: no row."""
    h = harness(park_ttl_min=5)
    first = event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(1))}, object_id="S1", received=0)
    later = event("SessionPatch", {"kwh": Decimal("8"), "last_updated": iso(ts(10))}, object_id="S1", received=10)
    out = h.run(first, later)
    assert dict(outcomes(out)) == {first.event_id: "ORPHANED", later.event_id: "PARKED"}
    out = h.run(event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(1))}, object_id="S1", received=0,
                      event_id=first.event_id, source="REPLAY"))
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "anomalies") == []
    assert [p.event_id for p in h.state(KEY).parked] == [later.event_id]


def test_a_state_from_before_created_at_is_not_dated_by_its_next_event() -> None:
    """A Session state written before `created_at` existed keeps None there (`stage.replayed_orphan` cannot tell
    then): its next event is not its PUT, and dating it so made a replayed copy of any PATCH received more than
    OCPI_PIPELINE_PARK_TTL before that event pass for an ORPHANED one."""
    h = harness(park_ttl_min=5)
    put = event("Session", session(kwh="1", updated=0), received=0)
    h.run(put)
    assert h.state(KEY).created_at == put.received_at
    before = h.state(KEY)
    before.created_at = None  # as written by the version before
    h.store.data[KEY] = h.codec.encode(before)
    h.run(event("SessionPatch", {"kwh": Decimal("2"), "last_updated": iso(ts(30))}, object_id="S1", received=30))
    assert stored(h)["kwh"] == 2 and h.state(KEY).created_at is None


def test_a_replayed_copy_of_a_patch_orphaned_by_a_full_park_is_neither_applied_nor_recorded() -> None:
    """A PATCH ORPHANED at once because its Session's parked events were at OCPI_PIPELINE_PARK_MAX (PARK_OVERFLOW)
    was never applied. `ocpi-pipeline replay` sends its copy after the PUT came (within the park TTL, so the TTL
    rule does not see it): dated after what is stored, it was applied now (a new version, kWh changed, its ORPHANED
    row of source PUSH turned APPLIED of source REPLAY); and while the PUT had not come, its copy was ORPHANED
    again, the row turned a REPLAY row (partner health counts source PUSH). It was refused for good: no row."""
    h = harness(park_ttl_min=5, park_max=1)
    parked = event("SessionPatch", {"kwh": Decimal("5"), "last_updated": iso(ts(5))}, object_id="S1", received=0)
    overflow = event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(30))}, object_id="S1", received=1)
    out = h.run(parked, overflow)
    assert dict(outcomes(out)) == {parked.event_id: "PARKED", overflow.event_id: "ORPHANED"}

    def copy_of(original: Any) -> Any:
        return event("SessionPatch", {"kwh": Decimal("7"), "last_updated": iso(ts(30))}, object_id="S1", received=1,
                     event_id=original.event_id, source="REPLAY")

    out = h.run(copy_of(overflow))  # the PUT has not come yet
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "anomalies") == []
    assert out.outcomes == {"REPLAYED_ORPHANED": 1}

    h.run(event("Session", session(kwh="1", updated=0), received=2))  # within the TTL: the parked PATCH applies
    assert stored(h)["kwh"] == 5
    version = h.state(KEY).version
    out = h.run(copy_of(overflow))
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "sessions") == []
    assert out.outcomes == {"REPLAYED_ORPHANED": 1}
    assert stored(h)["kwh"] == 5 and h.state(KEY).version == version


def test_a_replayed_copy_of_a_patch_orphaned_by_its_wait_is_not_applied_whatever_the_put_s_stamp() -> None:
    """A PATCH parked, then ORPHANED when a later PATCH came past OCPI_PIPELINE_PARK_TTL, was never applied. The PUT
    that came after both (landing late, but stamped within the TTL of the first: a push answered 3000 and written
    later, a known limit) left neither `created_at` past the orphan's deadline nor anything parked, so
    `stage.replayed_orphan` did not know it, and its replayed copy was applied. The state remembers such orphans, as
    the Location state does (`overflowed`), and their copies write nothing."""
    h = harness(park_ttl_min=5)
    first = event("SessionPatch", {"kwh": Decimal("5"), "last_updated": iso(ts(9))}, object_id="S1", received=0)
    second = event("SessionPatch", {"kwh": Decimal("6"), "last_updated": iso(ts(6))}, object_id="S1", received=6)
    out = h.run(first, second)
    assert dict(outcomes(out)) == {first.event_id: "ORPHANED", second.event_id: "PARKED"}
    h.run(event("Session", session(kwh="1", updated=0), received=2))  # stamped at 2, landed after both
    assert stored(h)["kwh"] == 6
    version = h.state(KEY).version
    out = h.run(event("SessionPatch", {"kwh": Decimal("5"), "last_updated": iso(ts(9))}, object_id="S1", received=0,
                      event_id=first.event_id, source="REPLAY"))  # dated after what is stored
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "sessions") == []
    assert out.outcomes == {"REPLAYED_ORPHANED": 1}
    assert stored(h)["kwh"] == 6 and h.state(KEY).version == version


def test_a_state_restored_by_a_replay_applies_a_patch_parked_for_its_put_as_the_original_did() -> None:
    """README "A worker's state starting empty over a populated store": the replay restores every table as it was.
    A PATCH that came before its PUT, dated like the PUT (a CPO stamping whole seconds), was parked and applied
    after the PUT (the later arrival). Its replayed copy, parked again and retried when the PUT's copy came, was
    STALE: a copy received no later than the event the stored Session came from (`ordering.replayed_earlier`, for
    copies sent after what followed them; a parked one is retried in its original place). The Session kept the
    PUT's content and the PATCH's row stayed PARKED (of the copy), for the sweep to turn ORPHANED."""
    patch_body = {"status": "ACTIVE", "kwh": Decimal("2"), "last_updated": iso(ts(10))}
    original = harness()
    patch = event("SessionPatch", patch_body, object_id="S1", received=1)
    put = event("Session", session(status="PENDING", kwh="0", updated=10), received=2)
    out = original.run(patch, put)
    assert dict(outcomes(out)) == {patch.event_id: "APPLIED", put.event_id: "APPLIED"}
    assert stored(original)["status"] == "ACTIVE"

    restored = harness()
    out = restored.run(event("SessionPatch", patch_body, object_id="S1", received=1, event_id=patch.event_id,
                             source="REPLAY"),
                       event("Session", session(status="PENDING", kwh="0", updated=10), received=2,
                             event_id=put.event_id, source="REPLAY"))
    assert dict(outcomes(out)) == {patch.event_id: "APPLIED", put.event_id: "APPLIED"}
    assert stored(restored) == stored(original) and restored.state(KEY).version == original.state(KEY).version
    assert column(out.batch, "session_status_history", SESSION_HISTORY_COLUMNS, "status") == ["PENDING", "ACTIVE"]


def test_a_state_restored_by_a_replay_records_the_outcome_of_every_patch_parked_for_its_put() -> None:
    """A PATCH before its PUT that was STALE (dated before the PUT) or a DUPLICATE (a retry of another parked one)
    when the PUT came: its replayed copy, parked again by a state restored by a replay, wrote a PARKED row (source
    REPLAY) over the original's; retried when the PUT's copy came, its outcome was one a replayed event does not
    record (it changes nothing), so the row stayed PARKED, for the deadline sweep to turn ORPHANED. The copy's row
    was replaced all the same: its outcome is recorded."""
    pushes = [("SessionPatch", {"kwh": Decimal("1"), "last_updated": iso(ts(5))}, 1),
              ("SessionPatch", {"kwh": Decimal("3"), "last_updated": iso(ts(20))}, 2),
              ("SessionPatch", {"kwh": Decimal("3"), "last_updated": iso(ts(20))}, 3),
              ("Session", session(kwh="2", updated=10), 4)]
    original = [event(kind, body, object_id="S1", received=received) for kind, body, received in pushes]
    out = harness().run(*original)
    expected = ["STALE", "APPLIED", "DUPLICATE", "APPLIED"]
    assert dict(outcomes(out)) == {e.event_id: o for e, o in zip(original, expected, strict=True)}

    restored = harness()
    out = restored.run(*(event(kind, body, object_id="S1", received=received, event_id=e.event_id, source="REPLAY")
                         for (kind, body, received), e in zip(pushes, original, strict=True)))
    assert dict(outcomes(out)) == {e.event_id: o for e, o in zip(original, expected, strict=True)}
    assert stored(restored)["kwh"] == 3
def test_a_patch_of_last_updated_with_no_charging_periods_is_a_duplicate_too() -> None:
    # `charging_periods` in a PATCH are appended, so `[]` appends nothing (SessionPatch): a PATCH of last_updated and
    # an empty list sets nothing, as one of last_updated alone. It was applied as a new version and restarted the
    # idle clock, so a CPO's periodic sign of life in that form kept a stuck session from being flagged.
    h = harness(idle_min=60)
    first = event("Session", session(status="ACTIVE", kwh="5"), received=0)
    h.run(first)
    touch = event("SessionPatch", {"last_updated": iso(ts(40)), "charging_periods": []}, object_id="S1", received=40)
    out = h.run(touch)
    assert outcomes(out) == [(touch.event_id, "DUPLICATE")] and rows(out.batch, "sessions") == []
    assert stored(h)["last_updated"] == iso(ts(0))
    out = h.run(event("SessionPatch", {"last_updated": iso(ts(150))}, object_id="S1", received=150))
    [anomaly] = rows(out.batch, "anomalies")
    assert anomaly[ANOMALY_COLUMNS.index("kind")] == "SESSION_IDLE"
    assert anomaly[ANOMALY_COLUMNS.index("event_id")] == first.event_id  # the clock runs from the PUT


def test_a_patch_that_repeats_the_stored_values_is_a_duplicate() -> None:
    # A PATCH that sets fields to what the open Session already holds (its status again, its kwh again, its ids, the
    # last period once more) changes nothing but last_updated: a bumped last_updated with no change, so no version
    # and no restart of the idle clock. It was applied as a new version: dedup compared it with the last applied
    # event (the PUT) only, and the check of the merged Session against the stored one ran for final sessions only.
    h = harness(idle_min=60)
    first = event("Session", session(status="ACTIVE", kwh="5"), received=0)
    h.run(first)
    body = stored(h)
    same = {"status": "ACTIVE", "kwh": Decimal("5.000"), "country_code": body["country_code"],
            "party_id": body["party_id"], "id": body["id"], "last_updated": iso(ts(40))}
    if body.get("charging_periods"):
        same["charging_periods"] = body["charging_periods"][-1:]
    patch = event("SessionPatch", same, object_id="S1", received=40)
    out = h.run(patch)
    assert outcomes(out) == [(patch.event_id, "DUPLICATE")] and rows(out.batch, "sessions") == []
    assert stored(h)["last_updated"] == iso(ts(0))
    changed = event("SessionPatch", {**same, "kwh": Decimal("6"), "last_updated": iso(ts(50))}, object_id="S1",
                    received=50)
    assert outcomes(h.run(changed)) == [(changed.event_id, "APPLIED")]


def test_an_older_patch_of_last_updated_alone_is_stale() -> None:
    # Compared after the stale rule, as any PATCH: one dated before the stored Session is STALE (it is older news),
    # not a DUPLICATE.
    h = harness()
    h.run(event("Session", session(status="ACTIVE", kwh="5", updated=30), received=30))
    old = event("SessionPatch", {"last_updated": iso(ts(10))}, object_id="S1", received=40)
    out = h.run(old)
    assert outcomes(out)[0][1] == "STALE" and kinds(out) == ["STALE_UPDATE"]


def test_a_session_of_a_token_no_party_of_ours_issued_is_applied_and_flagged_once() -> None:
    """OCPI_TOKEN_PARTIES (as for CDRs): a Session of another eMSP's token is that eMSP's driver's data sent to us.
    Applied as sent (it is the CPO's Session) and flagged when it comes and when an update brings another foreign
    issuer's token, not on every update; a token of ours (CiStrings in any case) is not flagged. Not checked when the
    setting is empty."""
    h = Harness(process_sessions, SessionState,
                dataclasses.replace(stage_rules(), token_parties=frozenset({("NL", "EMS")})))
    foreign = {**session(), "cdr_token": {**session()["cdr_token"], "party_id": "XYZ"}}
    first = event("Session", foreign, received=1)
    kwh = event("SessionPatch", {"kwh": 3, "last_updated": iso(ts(60))}, object_id="S1", received=2)
    again = event("Session", {**foreign, "kwh": Decimal(4), "last_updated": iso(ts(90))}, received=3)
    other = event("SessionPatch", {"cdr_token": {**foreign["cdr_token"], "country_code": "be"},
                                   "last_updated": iso(ts(120))}, object_id="S1", received=4)
    ours = event("SessionPatch", {"cdr_token": {**foreign["cdr_token"], "party_id": "ems"},
                                  "last_updated": iso(ts(150))}, object_id="S1", received=5)
    out = h.run(first, kwh, again, other, ours)
    assert {outcome for _id, outcome in outcomes(out)} == {"APPLIED"}
    flagged = rows(out.batch, "anomalies")
    assert [(row[ANOMALY_COLUMNS.index("event_id")], row[ANOMALY_COLUMNS.index("detail")]) for row in flagged] == [
        (first.event_id, "cdr_token of NL/XYZ, not one of OCPI_TOKEN_PARTIES"),
        (other.event_id, "cdr_token of BE/XYZ, not one of OCPI_TOKEN_PARTIES")]
    assert kinds(out) == ["SESSION_OF_ANOTHER_EMSP"] * 2
    assert stored(h)["cdr_token"]["party_id"] == "ems"
    assert rows(harness().run(event("Session", foreign, received=1)).batch, "anomalies") == []
