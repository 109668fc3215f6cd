"""Stage 1 for Locations: the tree at three levels, changed-rows-only projection, parking, parents' times."""

from __future__ import annotations

import json
from typing import Any

import pytest

from infra.kafka.admin import RECORD_MAX_BYTES
from ocpi.compat import CompatProfile
from ocpi.model import EVSE
from pipeline import wire
from pipeline.locations import _pair_evses, process_locations
from pipeline.projection import (
    ANOMALY_COLUMNS,
    CONNECTOR_COLUMNS,
    EVSE_COLUMNS,
    EVSE_HISTORY_COLUMNS,
    LOCATION_COLUMNS,
    RAW_EVENT_COLUMNS,
)
from pipeline.state import LocationState

from .builders import Harness, column, connector, event, event_bytes, evse, iso, location, rows, stage_rules, ts

KEY = "NL/TNM/LOC1"


def harness(**rules: Any) -> Harness:
    return Harness(process_locations, LocationState, stage_rules(**rules) if rules else None)


def outcome_of(out: Any, event_id: str) -> str:
    found = dict(zip(column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "event_id"),
                     column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "outcome"), strict=True))
    return found[event_id]


def stored(h: Harness) -> dict[str, Any]:
    return json.loads(h.state(KEY).object_json)


def status_patch(uid: str, status: str, minute: float, received: float) -> Any:
    return event("EVSEPatch", {"status": status, "last_updated": iso(ts(minute))}, object_id="LOC1", evse_uid=uid,
                 received=received)


def test_a_location_put_writes_the_location_its_evses_connectors_and_first_statuses() -> None:
    h = harness()
    out = h.run(event("Location", location(evses=[evse("E1"), evse("E2", status="CHARGING")]), received=1))
    assert column(out.batch, "locations", LOCATION_COLUMNS, "evse_count") == [2]
    assert column(out.batch, "evses", EVSE_COLUMNS, "evse_uid") == ["E1", "E2"]
    assert column(out.batch, "connectors", CONNECTOR_COLUMNS, "connector_id") == ["1", "1"]
    assert column(out.batch, "evse_status_history", EVSE_HISTORY_COLUMNS, "status") == ["AVAILABLE", "CHARGING"]


def test_an_evse_status_patch_writes_only_what_changed_and_raises_the_location_time() -> None:
    h = harness()
    h.run(event("Location", location(evses=[evse("E1"), evse("E2")]), received=1))
    patch = status_patch("E2", "CHARGING", 10, 2)
    out = h.run(patch)
    assert outcome_of(out, patch.event_id) == "APPLIED"
    assert column(out.batch, "evses", EVSE_COLUMNS, "evse_uid") == ["E2"]
    assert column(out.batch, "evses", EVSE_COLUMNS, "status") == ["CHARGING"]
    assert rows(out.batch, "connectors") == []
    history = rows(out.batch, "evse_status_history")
    assert [(r[EVSE_HISTORY_COLUMNS.index("previous_status")], r[EVSE_HISTORY_COLUMNS.index("status")])
            for r in history] == [("AVAILABLE", "CHARGING")]
    assert column(out.batch, "locations", LOCATION_COLUMNS, "last_updated") == [ts(10)]
    assert stored(h)["evses"][1]["status"] == "CHARGING"


def test_an_older_child_push_never_lowers_the_location_time() -> None:
    h = harness()
    h.run(event("Location", location(evses=[evse("E1", updated=0)], updated=20), received=1))
    older = event("EVSE", evse("E1", status="BLOCKED", updated=10), object_id="LOC1", evse_uid="E1", received=2)
    out = h.run(older)
    assert outcome_of(out, older.event_id) == "APPLIED"  # newer than the EVSE itself (0), older than the Location
    assert stored(h)["last_updated"] == iso(ts(20)) and stored(h)["evses"][0]["status"] == "BLOCKED"


def test_a_stale_evse_patch_is_recorded_and_not_applied() -> None:
    h = harness()
    h.run(event("Location", location(), received=1), status_patch("E1", "CHARGING", 10, 2))
    late = status_patch("E1", "AVAILABLE", 5, 3)
    out = h.run(late)
    assert outcome_of(out, late.event_id) == "STALE"
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == ["STALE_UPDATE"]
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "sub_id") == ["E1"]
    assert stored(h)["evses"][0]["status"] == "CHARGING"


def test_a_put_older_by_less_than_100_microseconds_is_stale() -> None:
    """The stored Location's `last_updated` keeps a 5th fraction digit (`.12345`, sent without `Z`): truncated to
    .1234 in the stored JSON, an older PUT at .12341 was applied over the newer one."""
    h = harness()
    second = f"{ts(0):%Y-%m-%dT%H:%M:%S}"
    h.run(event("Location", {**location(name="New"), "last_updated": second + ".12345"}, received=1))
    older = event("Location", {**location(name="Old"), "last_updated": second + ".12341"}, received=2)
    out = h.run(older)
    assert outcome_of(out, older.event_id) == "STALE"
    assert stored(h)["name"] == "New" and stored(h)["last_updated"] == second + ".12345"


def test_a_repeated_status_patch_is_a_duplicate() -> None:
    h = harness()
    h.run(event("Location", location(), received=1))
    body = {"status": "CHARGING", "last_updated": iso(ts(10))}
    first = event("EVSEPatch", body, object_id="LOC1", evse_uid="E1", received=2)
    again = event("EVSEPatch", body, object_id="LOC1", evse_uid="E1", received=3)
    out = h.run(first, again)
    assert outcome_of(out, again.event_id) == "DUPLICATE"
    assert len(rows(out.batch, "evse_status_history")) == 1


def test_evse_events_before_their_location_wait_for_it() -> None:
    h = harness()
    patch = status_patch("E1", "CHARGING", 10, 1)
    first = h.run(patch)
    assert outcome_of(first, patch.event_id) == "PARKED" and rows(first.batch, "locations") == []
    put = event("Location", location(), received=2)
    out = h.run(put)
    assert outcome_of(out, put.event_id) == "APPLIED" and outcome_of(out, patch.event_id) == "APPLIED"
    assert stored(h)["evses"][0]["status"] == "CHARGING" and h.state(KEY).parked == []


def test_a_connector_patch_waits_for_its_connector_put_even_when_the_location_exists() -> None:
    h = harness()
    h.run(event("Location", location(), received=1))
    patch = event("ConnectorPatch", {"max_electric_power": 11000, "last_updated": iso(ts(10))}, object_id="LOC1",
                  evse_uid="E1", connector_id="2", received=2)
    assert outcome_of(h.run(patch), patch.event_id) == "PARKED"
    put = event("Connector", connector("2", updated=5), object_id="LOC1", evse_uid="E1", connector_id="2",
                received=3)
    out = h.run(put)
    assert outcome_of(out, put.event_id) == "APPLIED" and outcome_of(out, patch.event_id) == "APPLIED"
    [c1, c2] = stored(h)["evses"][0]["connectors"]
    assert c1["id"] == "1" and c2["max_electric_power"] == 11000
    assert column(out.batch, "connectors", CONNECTOR_COLUMNS, "max_electric_power") == [22000, 11000]


def test_an_evse_missing_from_a_location_put_is_kept_as_not_present() -> None:
    h = harness()
    h.run(event("Location", location(evses=[evse("E1"), evse("E2")]), received=1))
    out = h.run(event("Location", location(evses=[evse("E1", updated=5)], updated=5), received=2))
    present = dict(zip(column(out.batch, "evses", EVSE_COLUMNS, "evse_uid"),
                       column(out.batch, "evses", EVSE_COLUMNS, "present"), strict=True))
    assert present == {"E1": True, "E2": False}
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == ["EVSE_MISSING_FROM_PUT"]
    assert column(out.batch, "connectors", CONNECTOR_COLUMNS, "present") == [True, False]


def test_an_evse_left_out_after_its_status_went_removed_is_not_an_anomaly() -> None:
    """The spec's way to delete an EVSE is status REMOVED; a CPO that later leaves it out of its Location PUT did
    nothing unusual, and the EVSE_MISSING_FROM_PUT anomaly was noise."""
    h = harness()
    h.run(event("Location", location(evses=[evse("E1"), evse("E2", status="REMOVED")]), received=1))
    out = h.run(event("Location", location(evses=[evse("E1", updated=5)], updated=5), received=2))
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == []
    present = dict(zip(column(out.batch, "evses", EVSE_COLUMNS, "evse_uid"),
                       column(out.batch, "evses", EVSE_COLUMNS, "present"), strict=True))
    assert present == {"E1": True, "E2": False}  # its row still says it left the tree


def test_an_evse_that_leaves_the_tree_and_comes_back_keeps_one_status_history_chain() -> None:
    """An EVSE a Location PUT left out kept its last status in the history for ever (CHARGING since it left), and
    when listed again it got a row from '' as at its first sighting: its history had two starts and did not chain
    (the demo's oracle calls that a broken chain), and one listed again with the status it left with got a row
    though nothing changed. Leaving the tree is now a row to status '' (dated by the push that left it out), from
    which its return continues."""
    h = harness()
    h.run(event("Location", location(evses=[evse("E1"), evse("E2", status="CHARGING")]), received=1))
    left = event("Location", location(evses=[evse("E1", updated=5)], updated=5), received=2)
    out = h.run(left)
    history = [(r[EVSE_HISTORY_COLUMNS.index("evse_uid")], r[EVSE_HISTORY_COLUMNS.index("previous_status")],
                r[EVSE_HISTORY_COLUMNS.index("status")], r[EVSE_HISTORY_COLUMNS.index("changed_at")],
                r[EVSE_HISTORY_COLUMNS.index("event_id")]) for r in rows(out.batch, "evse_status_history")]
    assert history == [("E2", "CHARGING", "", ts(5), left.event_id)]
    back = h.run(event("EVSE", evse("E2", status="CHARGING", updated=8), object_id="LOC1", evse_uid="E2",
                       received=3))
    assert [(r[EVSE_HISTORY_COLUMNS.index("previous_status")], r[EVSE_HISTORY_COLUMNS.index("status")])
            for r in rows(back.batch, "evse_status_history")] == [("", "CHARGING")]
    # A Location PATCH of `evses` leaves EVSEs out the same way; one left out again while out of the tree is not.
    patch = event("LocationPatch", {"evses": [evse("E1", updated=9)], "last_updated": iso(ts(9))}, object_id="LOC1",
                  received=4)
    again = event("Location", location(evses=[evse("E1", updated=10)], updated=10), received=5)
    out = h.run(patch, again)
    assert [(r[EVSE_HISTORY_COLUMNS.index("evse_uid")], r[EVSE_HISTORY_COLUMNS.index("previous_status")],
             r[EVSE_HISTORY_COLUMNS.index("status")], r[EVSE_HISTORY_COLUMNS.index("changed_at")])
            for r in rows(out.batch, "evse_status_history")] == [("E2", "CHARGING", "", ts(9))]


def test_an_evse_listed_again_with_its_older_own_time_returns_after_it_left_in_its_status_history() -> None:
    """An EVSE a push left out and a later one lists again, unchanged (its own `last_updated` from before it left),
    got its row from '' dated by that old time: before the row that ended its history when it left, so its history
    ordered by time (as the demo's oracle and any reader orders it) ended with '' while the EVSE is in the tree. It
    came back with the push that lists it again, and is dated by it (as its leaving is by the push that left it
    out)."""
    h = harness()
    h.run(event("Location", location(evses=[evse("E1"), evse("E2", status="CHARGING")]), received=1))
    h.run(event("Location", location(evses=[evse("E1")], updated=5), received=2))  # E2 leaves at 5
    back = h.run(event("Location", location(evses=[evse("E1"), evse("E2", status="CHARGING")], updated=8),
                       received=3))
    assert [(r[EVSE_HISTORY_COLUMNS.index("previous_status")], r[EVSE_HISTORY_COLUMNS.index("status")],
             r[EVSE_HISTORY_COLUMNS.index("changed_at")]) for r in rows(back.batch, "evse_status_history")] == [
        ("", "CHARGING", ts(8))]
    # So by a Location PATCH of `evses`; an EVSE new to the tree keeps its own time, after the last list that did not
    # hold it (E3).
    h.run(event("LocationPatch", {"evses": [evse("E1")], "last_updated": iso(ts(9))}, object_id="LOC1", received=4))
    out = h.run(event("LocationPatch", {"evses": [evse("E1"), evse("E2", status="CHARGING"), evse("E3", updated=9.5)],
                                        "last_updated": iso(ts(10))}, object_id="LOC1", received=5))
    assert [(r[EVSE_HISTORY_COLUMNS.index("evse_uid")], r[EVSE_HISTORY_COLUMNS.index("status")],
             r[EVSE_HISTORY_COLUMNS.index("changed_at")]) for r in rows(out.batch, "evse_status_history")] == [
        ("E2", "CHARGING", ts(10)), ("E3", "AVAILABLE", ts(9.5))]


def test_a_status_a_location_put_sets_back_with_the_evses_older_own_time_is_dated_by_the_put() -> None:
    """A Location PUT that lists an EVSE with an own `last_updated` older than the EVSE push it had since (the CPO's
    time for it going back, docs/pipeline.md "stale") is applied, and its status change was dated by that older own
    time: before the change it undoes, so the EVSE's history ordered by time ended with a status it no longer has."""
    h = harness()
    h.run(event("Location", location(evses=[evse("E1")]), received=1))
    h.run(status_patch("E1", "CHARGING", 5, 2))
    out = h.run(event("Location", location(evses=[evse("E1")], updated=8), received=3))
    assert stored(h)["evses"][0]["status"] == "AVAILABLE"
    assert [(r[EVSE_HISTORY_COLUMNS.index("previous_status")], r[EVSE_HISTORY_COLUMNS.index("status")],
             r[EVSE_HISTORY_COLUMNS.index("changed_at")]) for r in rows(out.batch, "evse_status_history")] == [
        ("CHARGING", "AVAILABLE", ts(8))]


def test_an_evse_a_location_patch_of_evses_leaves_out_is_named_as_left_out_by_that_patch() -> None:
    """A Location PATCH of `evses` replaces the list (ocpi.patch) and leaves EVSEs out like a PUT; the anomaly's
    detail said "not in the Location PUT", sending whoever settles it to look for a PUT that never came."""
    h = harness()
    h.run(event("Location", location(evses=[evse("E1"), evse("E2")]), received=1))
    patch = event("LocationPatch", {"evses": [evse("E1", updated=5)], "last_updated": iso(ts(5))}, object_id="LOC1",
                  received=2)
    out = h.run(patch)
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "detail") == ["EVSE E2 is not in the Location PATCH"]
    put = h.run(event("Location", location(evses=[evse("E3", updated=6)], updated=6), received=3))
    assert column(put.batch, "anomalies", ANOMALY_COLUMNS, "detail") == ["EVSE E1 is not in the Location PUT"]


def test_a_location_patch_that_breaks_a_cross_field_rule_is_invalid_and_not_stored() -> None:
    h = harness()
    unpublished = location(publish=False, publish_allowed_to=[{"uid": "TOK1", "type": "RFID"}])
    h.run(event("Location", unpublished, received=1))
    patch = event("LocationPatch", {"publish": True, "last_updated": iso(ts(5))}, object_id="LOC1", received=2)
    out = h.run(patch)
    assert outcome_of(out, patch.event_id) == "INVALID"
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == ["INVALID_MERGE"]
    assert stored(h)["publish"] is False


def test_a_location_accepted_under_a_relaxation_is_stored_and_takes_later_updates() -> None:
    # The receiver accepted a post-d2 errata address (ERRATA_MAX_LENGTH): the value stays in the object, so the
    # pipeline's re-check of every merge must accept it again.
    h = harness()
    relaxed = CompatProfile.from_names("ERRATA_MAX_LENGTH")
    put = event("Location", location(address="A" * 60), received=1, profile=relaxed)
    assert put.relaxations == ["ERRATA_MAX_LENGTH:$.address"]
    assert outcome_of(h.run(put), put.event_id) == "APPLIED"
    patch = status_patch("E1", "CHARGING", 2, 2)
    renamed = event("LocationPatch", {"name": "Renamed", "last_updated": iso(ts(3))}, object_id="LOC1", received=3)
    out = h.run(patch, renamed)
    assert (outcome_of(out, patch.event_id), outcome_of(out, renamed.event_id)) == ("APPLIED", "APPLIED")
    assert stored(h)["address"] == "A" * 60 and stored(h)["evses"][0]["status"] == "CHARGING"


def test_a_location_patch_merges_its_fields() -> None:
    h = harness()
    h.run(event("Location", location(name="Old"), received=1))
    h.run(event("LocationPatch", {"name": "New", "last_updated": iso(ts(5))}, object_id="LOC1", received=2))
    assert stored(h)["name"] == "New" and stored(h)["evses"][0]["uid"] == "E1"


def test_versions_grow_with_every_applied_change() -> None:
    h = harness()
    outs = [h.run(event("Location", location(), received=1)), h.run(status_patch("E1", "CHARGING", 0, 2)),
            h.run(status_patch("E1", "AVAILABLE", 0, 3))]
    versions = [column(o.batch, "locations", LOCATION_COLUMNS, "version")[0] for o in outs]
    assert versions == sorted(set(versions))


def test_a_status_confirmed_by_a_duplicate_is_not_overwritten_by_an_older_push() -> None:
    # Two sessions at one EVSE: B's CHARGING (t=30) repeats A's CHARGING (t=10), then A's AVAILABLE (t=20)
    # arrives late. The duplicate creates no version, but it proves the EVSE was CHARGING at t=30.
    h = harness()
    h.run(event("Location", location(), received=0), status_patch("E1", "CHARGING", 10, 1))
    b_charging = status_patch("E1", "CHARGING", 30, 2)
    a_available = status_patch("E1", "AVAILABLE", 20, 3)
    out = h.run(b_charging, a_available)
    assert outcome_of(out, b_charging.event_id) == "DUPLICATE" and outcome_of(out, a_available.event_id) == "STALE"
    assert stored(h)["evses"][0]["status"] == "CHARGING"


def test_evses_are_paired_in_place_or_by_uid_ignoring_case() -> None:
    def struct(uid: str, status: str = "AVAILABLE") -> EVSE:
        return wire.validated(wire.ocpi_json(evse(uid, status=status)), EVSE)

    e1, e2, e3 = struct("E1"), struct("E2"), struct("E3")
    changed = struct("E2", "CHARGING")
    assert _pair_evses([e1, e2], [e1, changed]) == ([(e1, e1), (changed, e2)], [])  # in place
    assert _pair_evses([e1, e2], [e1, e2, e3]) == ([(e1, e1), (e2, e2), (e3, None)], [])  # appended
    lower = struct("e2")
    assert _pair_evses([e1, e2], [lower, e1]) == ([(lower, e2), (e1, e1)], [])  # reordered, uid in another case
    assert _pair_evses([e1, e2, e3], [e3, e1]) == ([(e3, e3), (e1, e1)], [e2])  # E2 left out of a PUT
    assert _pair_evses([], [e1]) == ([(e1, None)], [])


def test_a_location_re_push_confirms_its_evses_against_an_older_evse_push() -> None:
    # The CPO re-PUTs the Location unchanged with bumped timestamps (t=5): a duplicate, but it confirms E1 was
    # AVAILABLE at t=5. E1's CHARGING of t=3, arriving after it, is stale, as it is when it arrives before the
    # re-push (which is then applied): the end state must not depend on the arrival order.
    late = status_patch("E1", "CHARGING", 3, 2)
    h = harness()
    h.run(event("Location", location(updated=0), received=0))
    repush = event("Location", location(updated=5), received=1)
    out = h.run(repush, late)
    assert (outcome_of(out, repush.event_id), outcome_of(out, late.event_id)) == ("DUPLICATE", "STALE")
    assert stored(h)["evses"][0]["status"] == "AVAILABLE"
    assert rows(out.batch, "evse_status_history") == []
    other = harness()
    other.run(event("Location", location(updated=0), received=0), late, event("Location", location(updated=5)))
    assert other.state(KEY).object_json is not None
    assert json.loads(other.state(KEY).object_json)["evses"][0]["status"] == "AVAILABLE"


def late_power_patch(*, received: float) -> Any:
    """A PATCH of E1's Connector 1 stamped t=3 (11 kW), sent before a re-push of t=5 but arriving after it."""
    return event("ConnectorPatch", {"max_electric_power": 11000, "last_updated": iso(ts(3))}, object_id="LOC1",
                 evse_uid="E1", connector_id="1", received=received)


def assert_stale_after(h: Any, repush: Any, late: Any) -> None:
    """The re-push is a duplicate that confirms the Connector at t=5: the late PATCH is stale, 22 kW stays."""
    out = h.run(repush, late)
    assert (outcome_of(out, repush.event_id), outcome_of(out, late.event_id)) == ("DUPLICATE", "STALE")
    assert stored(h)["evses"][0]["connectors"][0]["max_electric_power"] == 22000


def test_an_evse_re_push_confirms_its_connectors_against_an_older_connector_push() -> None:
    h = harness()
    h.run(event("Location", location(updated=0), received=0),
          event("EVSE", evse("E1", status="CHARGING", updated=2), object_id="LOC1", evse_uid="E1", received=1))
    repush = event("EVSE", evse("E1", status="CHARGING", updated=5), object_id="LOC1", evse_uid="E1", received=2)
    assert_stale_after(h, repush, late_power_patch(received=3))


def test_sub_object_identities_with_a_bar_in_their_ids_do_not_collide() -> None:
    # EVSE "A|B" Connector "C" and EVSE "A" Connector "B|C": `|` is printable ASCII, so valid in a CiString.
    h = harness()
    h.run(event("Location", location(evses=[evse("A", connectors=[connector("B|C")]),
                                            evse("A|B", connectors=[connector("C")])]), received=0))
    body = {"max_electric_power": 11000, "last_updated": iso(ts(5))}
    first = event("ConnectorPatch", body, object_id="LOC1", evse_uid="A|B", connector_id="C", received=1)
    second = event("ConnectorPatch", body, object_id="LOC1", evse_uid="A", connector_id="B|C", received=2)
    out = h.run(first, second)
    assert (outcome_of(out, first.event_id), outcome_of(out, second.event_id)) == ("APPLIED", "APPLIED")
    assert [e["connectors"][0]["max_electric_power"] for e in stored(h)["evses"]] == [11000, 11000]


def test_a_child_duplicate_confirms_its_parents_against_an_older_location_put() -> None:
    # The CPO sends E1 CHARGING (t=3), re-PUTs the Location with E1 AVAILABLE (t=4), then E1 CHARGING again (t=5).
    # Applied, the t=5 PATCH would raise the Location's last_updated to 5 and the late PUT of t=4 would be stale;
    # as a duplicate of the t=3 PATCH it creates no version, but it still proves the tree's state at t=5: the PUT
    # of t=4 arriving after it must not set E1 back to AVAILABLE, whatever the arrival order.
    put = event("Location", location(updated=4), received=3)
    in_order = harness()
    in_order.run(event("Location", location(), received=0), status_patch("E1", "CHARGING", 3, 1), put,
                 status_patch("E1", "CHARGING", 5, 4))
    assert stored(in_order)["evses"][0]["status"] == "CHARGING"
    h = harness()
    h.run(event("Location", location(), received=0), status_patch("E1", "CHARGING", 3, 1))
    again = status_patch("E1", "CHARGING", 5, 2)
    late = event("Location", location(updated=4), received=3)
    out = h.run(again, late)
    assert (outcome_of(out, again.event_id), outcome_of(out, late.event_id)) == ("DUPLICATE", "STALE")
    assert stored(h)["evses"][0]["status"] == "CHARGING"


@pytest.mark.parametrize("parent", ["EVSE", "Location"])
def test_a_connector_duplicate_confirms_its_parents_against_an_older_parent_put(parent: str) -> None:
    # A Connector push, applied, raises its EVSE's and the Location's last_updated too (08 §3): its duplicate at
    # t=5 proves the tree's state at t=5 up to the Location, so an EVSE or Location PUT of t=4 arriving after it
    # is stale.
    h = harness()
    h.run(event("Location", location(), received=0))
    body = {"max_electric_power": 11000}
    h.run(event("ConnectorPatch", {**body, "last_updated": iso(ts(3))}, object_id="LOC1", evse_uid="E1",
                connector_id="1", received=1))
    again = event("ConnectorPatch", {**body, "last_updated": iso(ts(5))}, object_id="LOC1", evse_uid="E1",
                  connector_id="1", received=2)
    late = (event("EVSE", evse("E1", updated=4), object_id="LOC1", evse_uid="E1", received=3) if parent == "EVSE"
            else event("Location", location(updated=4), received=3))
    out = h.run(again, late)
    assert (outcome_of(out, again.event_id), outcome_of(out, late.event_id)) == ("DUPLICATE", "STALE")
    assert stored(h)["evses"][0]["connectors"][0]["max_electric_power"] == 11000


def test_a_location_re_push_confirms_the_connectors_it_carries() -> None:
    # The re-PUT (t=5, a duplicate) carries E1's Connector at t=5: a Connector PATCH of t=3 arriving after it
    # is stale, as the EVSE-level re-push makes it.
    h = harness()
    h.run(event("Location", location(updated=0), received=0))
    repush = event("Location", location(updated=5), received=1)
    assert_stale_after(h, repush, late_power_patch(received=2))


def test_a_re_push_confirms_each_connector_at_the_connectors_own_last_updated() -> None:
    # The re-PUT of E1 bumps only the EVSE's last_updated (t=5); its Connector still says t=1. For a Connector
    # push "stored" is the Connector's own last_updated: a PATCH of t=3 is newer than that and is applied.
    h = harness()
    h.run(event("Location", location(evses=[evse("E1", updated=1)], updated=1), received=0))
    h.run(event("EVSE", evse("E1", connectors=[connector(updated=1)], updated=2), object_id="LOC1",
                evse_uid="E1", received=1))
    repush = event("EVSE", evse("E1", connectors=[connector(updated=1)], updated=5), object_id="LOC1",
                   evse_uid="E1", received=1)
    patch = event("ConnectorPatch", {"max_electric_power": 11000, "last_updated": iso(ts(3))}, object_id="LOC1",
                  evse_uid="E1", connector_id="1", received=2)
    out = h.run(repush, patch)
    assert (outcome_of(out, repush.event_id), outcome_of(out, patch.event_id)) == ("DUPLICATE", "APPLIED")
    assert stored(h)["evses"][0]["connectors"][0]["max_electric_power"] == 11000


def test_a_push_for_an_evse_in_another_case_is_stale_against_that_evse() -> None:
    # EVSE uids are CiStrings: "e1" is the stored "E1", so its older status is stale against E1's t=10.
    h = harness()
    h.run(event("Location", location(), received=0), status_patch("E1", "CHARGING", 10, 1))
    late = status_patch("e1", "AVAILABLE", 5, 2)
    late_connector = event("ConnectorPatch", {"max_electric_power": 11000, "last_updated": iso(ts(5))},
                           object_id="LOC1", evse_uid="e1", connector_id="1", received=3)
    h.run(event("ConnectorPatch", {"max_electric_power": 7400, "last_updated": iso(ts(10))}, object_id="LOC1",
                evse_uid="E1", connector_id="1", received=2))
    out = h.run(late, late_connector)
    assert (outcome_of(out, late.event_id), outcome_of(out, late_connector.event_id)) == ("STALE", "STALE")
    assert stored(h)["evses"][0]["status"] == "CHARGING"
    assert stored(h)["evses"][0]["connectors"][0]["max_electric_power"] == 7400


def test_an_older_push_does_not_bring_back_an_evse_or_connector_a_newer_put_left_out() -> None:
    # E2 is PUT CHARGING at t=2 and E1's Connector 2 PATCHed at t=2; the Location PUT of t=3 lists neither (E2 and
    # Connector 2 are gone at t=3). In this order they stay gone; arriving after that PUT, the pushes of t=2 are
    # older than what it says of them: stale, as they are in order, not an EVSE and a Connector back in the tree.
    first = event("Location", location(evses=[evse("E1", updated=1, connectors=[connector("1", updated=1),
                                                                                connector("2", updated=1)]),
                                              evse("E2", updated=1)], updated=1))
    e2 = event("EVSE", evse("E2", status="CHARGING", updated=2), object_id="LOC1", evse_uid="E2")
    c2 = event("Connector", connector("2", updated=2, power=11000), object_id="LOC1", evse_uid="E1", connector_id="2")

    def put() -> Any:
        return event("Location", location(evses=[evse("E1", updated=3)], updated=3))

    def tree(h: Harness) -> list[tuple[str, list[str]]]:
        return [(e["uid"], [c["id"] for c in e["connectors"]]) for e in stored(h)["evses"]]

    in_order = harness()
    in_order.run(first, e2, c2, put())
    late = harness()
    late.run(first, put())
    out = late.run(e2, c2)
    assert tree(late) == tree(in_order) == [("E1", ["1"])]
    assert [outcome_of(out, e.event_id) for e in (e2, c2)] == ["STALE", "STALE"]
    assert rows(out.batch, "evses") == rows(out.batch, "connectors") == []
    # Pushed again after the PUT (newer), they are back.
    again = harness()
    again.run(first, put(), event("EVSE", evse("E2", status="CHARGING", updated=4), object_id="LOC1", evse_uid="E2"))
    assert tree(again) == [("E1", ["1"]), ("E2", ["1"])]


def test_an_event_kafka_holds_twice_keeps_the_outcome_it_had() -> None:
    """A producer's resend puts the same event (same event_id) on the topic twice, its copy possibly after later
    events of the Location (a resent batch): the copy must not turn its APPLIED row into DUPLICATE or STALE, nor
    raise a STALE_UPDATE for a push the CPO sent in order."""
    h = harness()
    h.run(event("Location", location(evses=[evse("E1")]), received=1))
    charging = status_patch("E1", "CHARGING", 3, 2)
    available = status_patch("E1", "AVAILABLE", 4, 3)
    out = h.run(charging, available, charging, available)
    assert outcome_of(out, charging.event_id) == "APPLIED" and outcome_of(out, available.event_id) == "APPLIED"
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == []
    assert stored(h)["evses"][0]["status"] == "AVAILABLE"


def test_a_resent_producer_batch_of_a_hubs_status_updates_keeps_every_outcome() -> None:
    """aiokafka resends a whole producer batch (up to 16 KiB per partition, its default `max_batch_size`) the broker
    wrote but did not acknowledge, and a burst of a hub's status updates fills one with a single Location's events:
    each copy comes a batch later, after dozens of its Location's events, and must still be recognised."""
    batch_bytes = 16384  # aiokafka's max_batch_size (the receivers' producer keeps the default)
    size = len(event_bytes("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(2))}, object_id="LOC1",
                           evse_uid="E00"))
    n = batch_bytes // size  # the smallest pushes of one Location a producer batch holds
    assert n > 16
    h = harness()
    h.run(event("Location", location(evses=[evse(f"E{i:02}") for i in range(n)]), received=1))
    first = status_patch("E00", "CHARGING", 2, 2)
    others = [status_patch(f"E{i:02}", "CHARGING", 2, 2) for i in range(1, n - 1)]
    last = status_patch("E00", "AVAILABLE", 3, 2)
    originals = [first, *others, last]
    h.run(*originals)
    version = h.state(KEY).version
    out = h.run(*originals)  # the batch again, same event ids
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "anomalies") == []
    assert rows(out.batch, "evse_status_history") == [] and h.state(KEY).version == version
    assert stored(h)["evses"][0]["status"] == "AVAILABLE"


def test_a_push_dated_ahead_of_its_receipt_is_flagged_at_its_level() -> None:
    h = harness(skew_min=5)
    h.run(event("Location", location(), received=1))
    ahead = status_patch("E1", "CHARGING", 60, 2)  # 58 minutes ahead
    out = h.run(ahead)
    assert outcome_of(out, ahead.event_id) == "APPLIED"
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == ["FUTURE_LAST_UPDATED"]
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "sub_id") == ["E1"]
    later = status_patch("E1", "AVAILABLE", 30, 31)  # correct clock, but dated before the push ahead
    assert outcome_of(h.run(later), later.event_id) == "STALE"


@pytest.mark.parametrize("extra", [{}, {"charging_when_closed": True, "facilities": []},
                                   {"charging_when_closed": None}],
                         ids=["default-left-out", "empty-list", "null-default"])
def test_a_location_patch_with_the_body_of_the_put_applied_last_is_a_duplicate(extra: dict[str, Any]) -> None:
    """A PATCH with the body of the PUT applied last changes nothing (README, duplicate): its `last_updated` alone
    moved, so no new version. The PUT's hash holds what the full object means (`charging_when_closed` filled in
    with its default, `[]` and null left out), the PATCH's what it sets: they hashed differently, and the PATCH
    was APPLIED as a new version of an unchanged Location."""
    h = harness()
    body = location(updated=0, **extra)
    h.run(event("Location", body, received=1))
    patch = event("LocationPatch", {**body, "last_updated": iso(ts(5))}, received=2)
    out = h.run(patch)
    assert outcome_of(out, patch.event_id) == "DUPLICATE"
    assert rows(out.batch, "locations") == []
    assert stored(h)["last_updated"] == iso(ts(0))


def test_an_evse_patch_with_the_body_of_the_evse_put_applied_last_is_a_duplicate() -> None:
    h = harness()
    h.run(event("Location", location(), received=1))
    body = {**evse("E1", status="CHARGING", updated=2), "capabilities": [], "images": None}
    h.run(event("EVSE", body, object_id="LOC1", evse_uid="E1", received=2))
    patch = event("EVSEPatch", {**body, "last_updated": iso(ts(5))}, object_id="LOC1", evse_uid="E1", received=3)
    out = h.run(patch)
    assert outcome_of(out, patch.event_id) == "DUPLICATE"
    assert rows(out.batch, "evses") == []


def test_a_re_put_with_ids_in_lower_case_writes_what_changed_and_marks_only_what_is_gone() -> None:
    # CiString uids and ids in lower case, the EVSEs listed in another order (paired by uid, not by position):
    # e1 loses Connector c2, e2 changes status, e3 is unchanged. Nothing else is missing, nothing else changed.
    h = harness()
    two = [connector("c1"), connector("c2")]
    h.run(event("Location", location(evses=[evse("e1", connectors=two), evse("e2"), evse("e3")]), received=1))
    out = h.run(event("Location", location(evses=[evse("e2", status="CHARGING"), evse("e3"),
                                                  evse("e1", connectors=[connector("c1")])]), received=2))
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == []
    evses = dict(zip(column(out.batch, "evses", EVSE_COLUMNS, "evse_uid"),
                     column(out.batch, "evses", EVSE_COLUMNS, "present"), strict=True))
    assert evses == {"E1": True, "E2": True}  # rows hold CiStrings upper-cased; e3 unchanged: no row
    assert list(zip(column(out.batch, "connectors", CONNECTOR_COLUMNS, "connector_id"),
                    column(out.batch, "connectors", CONNECTOR_COLUMNS, "present"), strict=True)) == [("C2", False)]
    history = rows(out.batch, "evse_status_history")
    assert [(r[EVSE_HISTORY_COLUMNS.index("previous_status")], r[EVSE_HISTORY_COLUMNS.index("status")])
            for r in history] == [("AVAILABLE", "CHARGING")]


def test_one_more_event_than_park_max_waiting_for_its_location_is_an_orphan() -> None:
    h = harness(park_max=2)
    waiting = [status_patch("E1", "CHARGING", minute, minute) for minute in (1, 2)]
    extra = status_patch("E1", "AVAILABLE", 3, 3)
    out = h.run(*waiting, extra)
    assert [outcome_of(out, e.event_id) for e in (*waiting, extra)] == ["PARKED", "PARKED", "ORPHANED"]
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == ["PARK_OVERFLOW"]
    assert len(h.state(KEY).parked) == 2


def test_an_event_parked_for_its_location_stamped_within_the_ttl_is_applied_whatever_landed_first() -> None:
    """As for a Session PATCH (test_sessions): an EVSE push stamped just past a parked one's deadline, landing before
    the Location PUT stamped just within it (pushes are written within OCPI_KAFKA_SEND_TIMEOUT of their stamps),
    orphaned the parked one, although its Location came within OCPI_PIPELINE_PARK_TTL (by receive time)."""
    h = harness(park_ttl_min=5, margin_min=0.5)
    waiting = status_patch("E1", "CHARGING", 30, 0)
    past = status_patch("E2", "BLOCKED", 31, 5.1)
    put = event("Location", location(evses=[evse("E1", updated=20), evse("E2", updated=20)], updated=20),
                received=4.9)  # landed after `past`
    out = h.run(waiting, past, put)
    assert [outcome_of(out, e.event_id) for e in (waiting, past, put)] == ["APPLIED", "APPLIED", "APPLIED"]
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == []
    assert [e["status"] for e in stored(h)["evses"]] == ["CHARGING", "BLOCKED"]
    # The Location stamped past the deadline still orphans it, whatever the margin; an event that still waits for
    # more than the Location (an EVSE it does not list) waits on.
    h = harness(park_ttl_min=5, margin_min=0.5)
    other = status_patch("E3", "BLOCKED", 31, 1)
    h.run(waiting, other)
    out = h.run(event("Location", location(evses=[evse("E1", updated=20)], updated=20), received=5.1))
    assert outcome_of(out, waiting.event_id) == "ORPHANED" and [p.event_id for p in h.state(KEY).parked] == [
        other.event_id]
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == ["ORPHAN_EVENT"]
    # So does any push of its Location stamped past the deadline and the margin.
    h = harness(park_ttl_min=5, margin_min=0.5)
    out = h.run(waiting, status_patch("E2", "BLOCKED", 31, 5.6))
    assert outcome_of(out, waiting.event_id) == "ORPHANED"


def test_parked_events_that_wait_for_each_other_are_all_applied_when_the_location_comes() -> None:
    # A Connector PATCH for E2 arrives before E2's PUT, both before the Location: when the Location comes, E2's
    # PUT applies, and then the Connector PATCH can: applied in the same pass, not left waiting for another event.
    h = harness()
    patch = event("ConnectorPatch", {"max_electric_power": 11000, "last_updated": iso(ts(6))}, object_id="LOC1",
                  evse_uid="E2", connector_id="1", received=1)
    put_e2 = event("EVSE", evse("E2", updated=5), object_id="LOC1", evse_uid="E2", received=2)
    h.run(patch, put_e2)
    out = h.run(event("Location", location(), received=3))
    assert outcome_of(out, put_e2.event_id) == "APPLIED" and outcome_of(out, patch.event_id) == "APPLIED"
    assert h.state(KEY).parked == []
    assert stored(h)["evses"][1]["connectors"][0]["max_electric_power"] == 11000


def test_an_older_duplicate_does_not_lower_what_a_newer_one_confirmed() -> None:
    # The tail of a FIFO resend: a re-push of t=5, then one of t=2 (both duplicates). The t=5 confirmation stands,
    # so a Location PUT of t=3 is stale.
    h = harness()
    h.run(event("Location", location(updated=0), received=0))
    h.run(event("Location", location(updated=5), received=1), event("Location", location(updated=2), received=2))
    older = event("Location", location(updated=3, name="Older"), received=3)
    out = h.run(older)
    assert outcome_of(out, older.event_id) == "STALE" and stored(h)["name"] == "Station"


def test_a_location_re_push_confirms_each_evse_at_the_evses_own_last_updated() -> None:
    # The re-push bumps the Location's last_updated (t=10) but not E1's (t=0): it confirms E1 at t=0 only, so an
    # E1 PATCH of t=5 is newer than E1 and is applied.
    h = harness()
    h.run(event("Location", location(evses=[evse("E1", updated=0)], updated=8), received=0))
    repush = event("Location", location(evses=[evse("E1", updated=0)], updated=10), received=1)
    patch = status_patch("E1", "CHARGING", 5, 2)
    out = h.run(repush, patch)
    assert (outcome_of(out, repush.event_id), outcome_of(out, patch.event_id)) == ("DUPLICATE", "APPLIED")
    assert stored(h)["evses"][0]["status"] == "CHARGING"


def test_a_batch_of_status_patches_of_a_big_location_writes_its_tree_once() -> None:
    # Every applied event wrote a `locations` row carrying the whole tree (payload_json), superseded in ClickHouse
    # by the next one: a batch of status updates of a hub wrote its tree once per update. 2,500 EVSEs (0.74 MB of
    # JSON) and 1,500 status updates in one batch (a backlog) made a 1.1 GB insert, more than the embedded store's
    # shim takes (1 GiB: HTTP 413, retried for ever); 5,000 updates (a full batch) 3.7 GB in the worker's memory.
    h = harness()
    h.run(event("Location", location(evses=[evse(f"E{i}") for i in range(500)]), received=1))
    out = h.run(*(status_patch(f"E{i}", "CHARGING", 10 + i, 2 + i) for i in range(50)))
    [row] = rows(out.batch, "locations")  # the Location's last version only: the others were superseded anyway
    assert row[LOCATION_COLUMNS.index("version")] == h.state(KEY).version
    assert json.loads(bytes(row[LOCATION_COLUMNS.index("payload_json")])) == stored(h)
    assert len(rows(out.batch, "evses")) == 50 and len(rows(out.batch, "evse_status_history")) == 50


def test_parked_events_are_bounded_by_their_bytes_so_that_the_state_fits_one_record() -> None:
    # A state value is one changelog record, which a broker refuses above `max.message.bytes` (RECORD_MAX_BYTES,
    # 16 MB) for good: the worker retried that batch for ever, every Location with it. Parked by count alone
    # (OCPI_PIPELINE_PARK_MAX, 32), five EVSE PATCHes of 4 MB (a valid push: `directions` of 7,800 texts) for a
    # Location not pushed yet made a state of 19.7 MB.
    h = harness(park_max=32)
    directions = [{"language": "en", "text": "x" * 500}] * 7800
    pushes = [event("EVSEPatch", {"directions": directions, "last_updated": iso(ts(minute))}, object_id="LOC1",
                    evse_uid="E1", received=minute) for minute in range(5)]
    out = h.run(*pushes)
    assert [outcome_of(out, e.event_id) for e in pushes] == ["PARKED", "PARKED", "ORPHANED", "ORPHANED", "ORPHANED"]
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == ["PARK_OVERFLOW"] * 3
    assert len(h.store.data[KEY]) < RECORD_MAX_BYTES // 2


def test_an_evse_push_that_would_grow_the_location_beyond_one_state_record_is_invalid() -> None:
    # Each EVSE PUT adds to the tree: five of 4 MB each (`directions` of 7,800 texts, a valid push) made a Location
    # of 20 MB, a state value above RECORD_MAX_BYTES that the broker refuses for good. A tree beyond
    # ordering.OBJECT_MAX_BYTES is now refused like any invalid merge; the stored Location stays as it was.
    h = harness()
    h.run(event("Location", location(), received=1))
    directions = [{"language": "en", "text": "x" * 500}] * 7800
    pushes = [event("EVSE", dict(evse(f"E{n}", updated=n), directions=directions), object_id="LOC1",
                    evse_uid=f"E{n}", received=n) for n in (2, 3)]
    out = h.run(*pushes)
    assert [outcome_of(out, e.event_id) for e in pushes] == ["APPLIED", "INVALID"]
    assert column(out.batch, "anomalies", ANOMALY_COLUMNS, "kind") == ["INVALID_MERGE"]
    assert [e["uid"] for e in stored(h)["evses"]] == ["E1", "E2"]
    assert len(h.store.data[KEY]) < RECORD_MAX_BYTES // 2


# --- the spec's examples, stored as sent ------------------------------------------------------------------------

def _spec(name: str) -> Any:
    from tests.conftest import EXAMPLES

    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def _exact(document: bytes | str) -> Any:
    """JSON with every number as a Decimal: `372` and the stored `372.0000` are the same amount."""
    from decimal import Decimal

    return json.loads(document, parse_float=Decimal, parse_int=Decimal)


def _example_locations() -> list[tuple[str, dict[str, Any]]]:
    bodies = [(name, _spec(name)) for name in (
        "location_example.json", "location_example_uc2_destination_charger.json",
        "location_example_uc3_destination_charger_not_published.json", "location_example_uc5_home_charge_point.json")]
    for name, field in (("location_hours_247_open_exception_closing.json", "opening_times"),
                        ("location_hours_opening_hours_with_exceptional_closing.json", "opening_times"),
                        ("location_regularhours_example.json", None),
                        ("location_energymix_example_simple.json", None),
                        ("location_energymix_example_energy_provider.json", None),
                        ("location_energymix_example_complete.json", None)):
        fragment = _spec(name) if field is None else {field: _spec(name)}
        bodies.append((name, {**_spec("location_example.json"), **fragment}))
    return bodies


@pytest.mark.parametrize(("name", "body"), _example_locations(), ids=[name for name, _ in _example_locations()])
def test_every_example_location_is_stored_as_sent(name: str, body: dict[str, Any]) -> None:
    h = harness()
    put = event("Location", body, cc=body["country_code"], pid=body["party_id"])
    out = h.run(put)
    assert outcome_of(out, put.event_id) == "APPLIED"
    state = h.state(f"{body['country_code']}/{body['party_id']}/{body['id']}".upper())
    # Only the spec's default of an absent `charging_when_closed` (08 §4.1: true) is added.
    assert _exact(state.object_json) == _exact(json.dumps({"charging_when_closed": True, **body}))
    assert column(out.batch, "evses", EVSE_COLUMNS, "evse_uid") == [e["uid"].upper() for e in body.get("evses") or ()]


def test_the_spec_patch_examples_are_merged_as_sent_and_raise_the_parents() -> None:
    # 08 §3.4's PATCHes of Location NL/TNM/1012 (the example Location under that identity, EVSE 3256 as 3255).
    body = {**_spec("location_example.json"), "country_code": "NL", "party_id": "TNM", "id": "1012"}
    body["evses"][0]["uid"] = "3255"
    h = harness()
    h.run(event("Location", body, cc="NL", pid="TNM"))
    patches = [
        event("LocationPatch", _spec("location_patch_example_location.json"), object_id="1012"),
        event("EVSEPatch", _spec("location_patch_example_status.json"), object_id="1012", evse_uid="3255"),
        event("ConnectorPatch", {"tariff_ids": ["15", "16"], "last_updated": "2019-06-24T12:40:09Z"},
              object_id="1012", evse_uid="3255", connector_id="2"),
        event("EVSEPatch", {"status": "REMOVED", "last_updated": "2019-06-24T12:41:09Z"}, object_id="1012",
              evse_uid="3257"),
    ]
    out = h.run(*patches)
    assert [outcome_of(out, p.event_id) for p in patches] == ["APPLIED"] * 4
    stored_tree = json.loads(h.state("NL/TNM/1012").object_json)
    e3255, e3257 = stored_tree["evses"]
    assert stored_tree["name"] == "Interparking Gent Zuid"
    assert (e3255["status"], e3255["last_updated"]) == ("CHARGING", "2019-06-24T12:40:09Z")
    assert e3255["connectors"][1]["tariff_ids"] == ["15", "16"]
    assert e3255["connectors"][0] == body["evses"][0]["connectors"][0]  # untouched
    assert (e3257["status"], e3257["last_updated"]) == ("REMOVED", "2019-06-24T12:41:09Z")  # kept (08 §1)
    assert stored_tree["last_updated"] == "2019-06-24T12:41:09Z"
    assert column(out.batch, "evse_status_history", EVSE_HISTORY_COLUMNS, "status") == ["CHARGING", "REMOVED"]


def test_an_older_push_does_not_add_an_evse_or_connector_a_newer_put_left_out() -> None:
    # E2 is first PUT at t=2 and E1's Connector 2 first PUT at t=2 (both new); the Location PUT of t=3 lists neither
    # (connectors are removed by leaving them out; an EVSE should come REMOVED, but the PUT is the CPO's truth at
    # t=3). In this order they are gone at t=3; arriving after that PUT, the pushes of t=2 are older than what it
    # says of the tree: stale, as they are in order, not an EVSE and a Connector the CPO no longer has.
    first = event("Location", location(evses=[evse("E1", updated=1)], updated=1))
    e2 = event("EVSE", evse("E2", status="CHARGING", updated=2), object_id="LOC1", evse_uid="E2")
    c2 = event("Connector", connector("2", updated=2, power=11000), object_id="LOC1", evse_uid="E1", connector_id="2")

    def put() -> Any:
        return event("Location", location(evses=[evse("E1", updated=3)], updated=3))

    def tree(h: Harness) -> list[tuple[str, list[str]]]:
        return [(e["uid"], [c["id"] for c in e["connectors"]]) for e in stored(h)["evses"]]

    in_order = harness()
    in_order.run(first, e2, c2, put())
    late = harness()
    late.run(first, put())
    out = late.run(e2, c2)
    assert tree(late) == tree(in_order) == [("E1", ["1"])]
    assert [outcome_of(out, e.event_id) for e in (e2, c2)] == ["STALE", "STALE"]
    # The same for a Connector an EVSE PUT left out, and an EVSE a Location PATCH of `evses` left out.
    evse_put = harness()
    evse_put.run(first, event("EVSE", evse("E1", updated=3), object_id="LOC1", evse_uid="E1"))
    assert outcome_of(evse_put.run(c2), c2.event_id) == "STALE"
    patched = harness()
    patched.run(first, event("LocationPatch", {"evses": [evse("E1", updated=3)], "last_updated": iso(ts(3))},
                             object_id="LOC1"))
    assert outcome_of(patched.run(e2), e2.event_id) == "STALE"
    # Newer than that PUT, they are added.
    again = harness()
    again.run(first, put(), event("EVSE", evse("E2", status="CHARGING", updated=4), object_id="LOC1", evse_uid="E2"),
              event("Connector", connector("2", updated=4), object_id="LOC1", evse_uid="E1", connector_id="2"))
    assert tree(again) == [("E1", ["1", "2"]), ("E2", ["1"])]


def test_a_replayed_copy_of_an_event_dated_like_its_stored_evse_is_not_applied_again() -> None:
    """`ocpi-pipeline replay` sends every event again after the whole history. The copy of an EVSE's last status
    PATCH is no duplicate once another EVSE's push was applied after it, and its `last_updated` equals the EVSE's:
    "equal is applied" applied it again, writing the Location at a new version and turning the PATCH's raw_events
    row (APPLIED, source PUSH) into a REPLAY row. Of two PATCHes with one `last_updated` (the later arrival wins),
    the first's copy even put its status back and rewrote the status history (BLOCKED -> CHARGING) until the second's
    copy came. A copy received before the event the stored Location came from changes nothing."""
    h = harness()
    h.run(event("Location", location(evses=[evse("E1"), evse("E2")]), received=1))
    charging, blocked = status_patch("E1", "CHARGING", 10, 2), status_patch("E1", "BLOCKED", 10, 3)
    other = status_patch("E2", "CHARGING", 11, 4)
    h.run(charging, blocked, other)
    version = h.state(KEY).version
    copies = [event("EVSEPatch", {"status": s, "last_updated": iso(ts(10))}, object_id="LOC1", evse_uid="E1",
                    received=r, event_id=e.event_id, source="REPLAY")
              for s, r, e in (("CHARGING", 2, charging), ("BLOCKED", 3, blocked))]
    out = h.run(*copies)
    assert out.outcomes == {"REPLAYED_STALE": 2}
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "locations") == []
    assert rows(out.batch, "evse_status_history") == []
    assert stored(h)["evses"][0]["status"] == "BLOCKED" and h.state(KEY).version == version

    # Topics that hold only replayed copies (a rebuild after `replay --from-archive`): the later arrival still wins.
    h = harness()
    out = h.run(event("Location", location(evses=[evse("E1")]), received=1, source="REPLAY"),
                *(event("EVSEPatch", {"status": s, "last_updated": iso(ts(10))}, object_id="LOC1", evse_uid="E1",
                        received=r, source="REPLAY") for s, r in (("CHARGING", 2), ("BLOCKED", 3))))
    assert out.outcomes == {"APPLIED": 3} and stored(h)["evses"][0]["status"] == "BLOCKED"


def test_the_confirmations_of_a_hub_whose_evse_uids_change_stay_as_many_as_its_tree() -> None:
    """`LocationState.confirmed` kept an entry for every EVSE, Connector and Connector list a push ever left out of
    the tree, for ever: a hub re-PUT daily whose EVSE uids change (two of twenty a day) grew it by ~200 bytes a day
    beside an object bounded by OBJECT_MAX_BYTES and parked events bounded by PARKED_MAX_BYTES, in one changelog
    record. An entry of an object out of the tree no newer than the lists over it decides nothing (a push for that
    object is compared with those lists too), nor one no newer than its object's own `last_updated`."""
    h = harness()
    uids = [f"E{i}" for i in range(20)]
    day = 24 * 60
    for n in range(60):
        uids = [*uids[2:], f"E{20 + 2 * n}", f"E{21 + 2 * n}"]
        m = n * day
        h.run(event("Location", location(evses=[evse(u, updated=m, connectors=[connector("1", updated=m),
                                                                               connector("2", updated=m)])
                                                for u in uids], updated=m), received=m))
        h.run(event("EVSE", evse(uids[0], updated=m + 1), object_id="LOC1", evse_uid=uids[0], received=m + 1))
    from pipeline.locations import PRUNE_OVER

    # Pruned when it outgrows the tree (PRUNE_OVER entries beyond two per EVSE), not on every event: bounded by the
    # tree, not by the 60 days of churn (about 240 entries unpruned).
    assert len(h.state(KEY).confirmed) <= PRUNE_OVER + 2 * len(uids)
    # What the dropped entries decided still holds: a late push for an EVSE or Connector left out long ago is stale.
    late = [event("EVSE", evse("E0", status="CHARGING", updated=30), object_id="LOC1", evse_uid="E0"),
            event("Connector", connector("3", updated=30), object_id="LOC1", evse_uid="E5", connector_id="3"),
            event("ConnectorPatch", {"max_electric_power": 11000, "last_updated": iso(ts(30))}, object_id="LOC1",
                  evse_uid="E1", connector_id="1")]
    out = h.run(*late)
    assert [outcome_of(out, e.event_id) for e in late] == ["STALE", "STALE", "STALE"]


def test_an_evse_listed_again_with_its_older_time_keeps_what_left_it_out() -> None:
    # E2 (t=1) is left out by the PUT of t=3 and listed again, as it was at t=1, by the PUT of t=5. E2's PATCH of
    # t=2 came, in order, before the PUT of t=3 and went with it: arriving after the PUT of t=5 it is stale, as it
    # was between the two PUTs (before this, the entry of t=3 kept it so; now that entry goes once the lists are
    # newer, and the EVSE keeps the time of the list that had left it out when it enters the tree again).
    def put(minute: float, *uids: str) -> Any:
        return event("Location", location(evses=[evse(u, updated=1) for u in uids], updated=minute))

    patch = status_patch("E2", "CHARGING", 2, 6)
    in_order = harness()
    in_order.run(put(1, "E1", "E2"), status_patch("E2", "CHARGING", 2, 2), put(3, "E1"), put(5, "E1", "E2"))
    late = harness()
    late.run(put(1, "E1", "E2"), put(3, "E1"), put(5, "E1", "E2"))
    assert outcome_of(late.run(patch), patch.event_id) == "STALE"
    assert stored(late)["evses"] == stored(in_order)["evses"]
    assert stored(late)["evses"][1]["status"] == "AVAILABLE"


def test_a_replayed_copy_of_a_duplicate_is_stale_against_the_location_trees_last_applied_event() -> None:
    """`replayed_earlier` compares with the Location tree's `applied_at`, not the EVSE's: E1's second CHARGING PATCH
    was a DUPLICATE (received after the EVSE's last applied event); its replayed copy, no duplicate once E2's PATCH
    was applied, must not be applied and turn that row into an APPLIED REPLAY with a new version."""
    h = harness()
    h.run(event("Location", location(evses=[evse("E1"), evse("E2")]), received=1))
    first, again = status_patch("E1", "CHARGING", 10, 2), status_patch("E1", "CHARGING", 10, 3)
    out = h.run(first, again, status_patch("E2", "CHARGING", 11, 4))
    assert outcome_of(out, again.event_id) == "DUPLICATE"
    version = h.state(KEY).version
    copy = event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(10))}, object_id="LOC1", evse_uid="E1",
                 received=3, event_id=again.event_id, source="REPLAY")
    out = h.run(copy)
    assert out.outcomes == {"REPLAYED_STALE": 1} and rows(out.batch, "raw_events") == []
    assert h.state(KEY).version == version


def test_a_replayed_copy_is_not_applied_again_on_a_state_written_before_applied_at() -> None:
    """A `location-state` written before `applied_at` existed (d8b2eb1) says no receive time. A replay from offset 0
    after the upgrade sent the copy of an EVSE's last status PATCH (no duplicate: another EVSE's push came after it)
    dated like the stored EVSE, and "equal is applied" applied it again (a new Location version, its raw_events row
    turned into a REPLAY row), and of two PATCHes with one `last_updated` the first's copy put its status back and
    rewrote the status history: the fix of replayed copies did not reach the states it was meant for. Every event
    a state folded in was received before a replay of it sends its copy, so an unknown `applied_at` is no later."""
    h = harness()
    h.run(event("Location", location(evses=[evse("E1"), evse("E2")]), received=1))
    charging, blocked = status_patch("E1", "CHARGING", 10, 2), status_patch("E1", "BLOCKED", 10, 3)
    h.run(charging, blocked, status_patch("E2", "CHARGING", 11, 4))
    old = h.state(KEY)
    old.applied_at = None  # as d8b2eb1 wrote it
    h.store.data[KEY] = h.codec.encode(old)
    version = old.version
    copies = [event("EVSEPatch", {"status": s, "last_updated": iso(ts(10))}, object_id="LOC1", evse_uid="E1",
                    received=r, event_id=e.event_id, source="REPLAY")
              for s, r, e in (("CHARGING", 2, charging), ("BLOCKED", 3, blocked))]
    out = h.run(*copies)
    assert out.outcomes == {"REPLAYED_STALE": 2}
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "evse_status_history") == []
    assert stored(h)["evses"][0]["status"] == "BLOCKED" and h.state(KEY).version == version


@pytest.mark.parametrize("prune_over", [16, -1])
def test_a_deferred_prune_changes_no_outcome(monkeypatch: pytest.MonkeyPatch, prune_over: int) -> None:
    """`confirmed` is pruned only once it outgrows the tree (`PRUNE_OVER`); whether it ran must decide nothing.
    E1's entry of t=8 (a duplicate Location PUT confirming it) decides nothing once E1's own time is 9; kept, it
    survived E1's removal at t=3 and made E1's push of t=5, newer than that removal, stale: APPLIED when the prune
    had run, STALE when the state had too few entries for it to."""
    import pipeline.locations

    monkeypatch.setattr(pipeline.locations, "PRUNE_OVER", prune_over)  # -1: pruned after every event

    def put(minute: float, received: float, *evses: dict[str, Any]) -> Any:
        return event("Location", location(evses=list(evses), updated=minute), received=received)

    h = harness()
    h.run(put(1, 1, evse("E1", updated=1)), put(1, 2, evse("E1", updated=8)),  # the second: a duplicate
          put(2, 3, evse("E1", status="BLOCKED", updated=9)), put(3, 4, evse("E2", updated=3)))
    late = event("EVSE", evse("E1", status="CHARGING", updated=5), object_id="LOC1", evse_uid="E1", received=5)
    assert outcome_of(h.run(late), late.event_id) == "APPLIED"
    assert [e["uid"] for e in stored(h)["evses"]] == ["E2", "E1"]


PRUNES = {"deferred": None, "after every event": -1, "never": "never"}


def _prune(monkeypatch: pytest.MonkeyPatch, prune: str) -> None:
    """Run `_prune_confirmed` as deployed (once `confirmed` outgrows the tree, and after every push that can change
    the tree's lists), after every event, or never: whether it ran must decide nothing."""
    import pipeline.locations

    if PRUNES[prune] == "never":
        monkeypatch.setattr(pipeline.locations, "_prune_confirmed", lambda state, location: None)
    elif PRUNES[prune] is not None:
        monkeypatch.setattr(pipeline.locations, "PRUNE_OVER", PRUNES[prune])


def _location_row(out: Any) -> tuple[Any, ...]:
    (row,) = rows(out.batch, "locations")
    return tuple(row[LOCATION_COLUMNS.index(c)] for c in ("event_id", "version", "last_updated"))


def _connector_rows(out: Any) -> list[tuple[Any, ...]]:
    return [tuple(row[CONNECTOR_COLUMNS.index(c)] for c in ("evse_uid", "connector_id", "last_updated", "event_id"))
            for row in rows(out.batch, "connectors")]


@pytest.mark.parametrize("prune", list(PRUNES))
def test_a_confirmation_a_location_put_passed_decides_nothing_once_a_later_put_back_dates_its_object(
        monkeypatch: pytest.MonkeyPatch, prune: str) -> None:
    """E1/1's duplicate of t=3 confirmed it at 3; the PUT of t=4 listed it at 4, past that, and the PUT of t=4
    arriving later (the first PUT again, bumped: the later arrival wins) back at its own 0. E1/1's push of t=2,
    arriving last, is compared with that own time (docs/pipeline.md "stale": the CPO's time for it going back), as it is
    when the push of t=3 had changed it (applied, not a duplicate). It was STALE when the entry of t=3, which the
    PUT of t=4 had passed, was still in `confirmed` (pruning had not run since), APPLIED when it had been pruned:
    the rows depended on when the state was pruned (test_tree_order_properties, found by hypothesis)."""
    _prune(monkeypatch, prune)

    def e(uid: str, minute: float) -> dict[str, Any]:
        return evse(uid, updated=minute, connectors=[connector("1", updated=minute, power=11000)])

    def push(minute: float) -> Any:
        return event("Connector", connector("1", updated=minute, power=11000), object_id="LOC1", evse_uid="E1",
                     connector_id="1")

    first = event("Location", location(evses=[e("E1", 0), e("E2", 0), e("E3", 0)], name="A"))
    again = event("Location", location(evses=[e("E1", 0), e("E2", 0), e("E3", 0)], name="A", updated=4))
    history = [first, push(1), push(3), event("Location", location(evses=[e("E1", 4), e("E2", 4)], name="A",
                                                                    updated=4)), again]
    h = harness()
    out = h.run(*history)
    assert [outcome_of(out, x.event_id) for x in history] == ["APPLIED", "APPLIED", "DUPLICATE", "APPLIED",
                                                              "APPLIED"]
    version = h.state(KEY).version
    late = push(2)
    out = h.run(late)
    assert outcome_of(out, late.event_id) == "APPLIED"
    assert _location_row(out) == (late.event_id, version + 2, ts(4))
    assert _connector_rows(out) == [("E1", "1", ts(2), late.event_id)]
    assert [(r[EVSE_COLUMNS.index("evse_uid")], r[EVSE_COLUMNS.index("last_updated")]) for r in
            rows(out.batch, "evses")] == [("E1", ts(2))]
    assert stored(h)["evses"][0]["connectors"][0]["last_updated"] == iso(ts(2))


@pytest.mark.parametrize("prune", list(PRUNES))
@pytest.mark.parametrize("confirmed", [True, False])
def test_a_confirmation_a_patch_passed_decides_nothing_once_a_location_put_back_dates_its_object(
        monkeypatch: pytest.MonkeyPatch, prune: str, confirmed: bool) -> None:
    """As deployed: E1/1's duplicate PATCH of t=3 confirms it at 3, its PATCH of t=4 sets its own time past that
    (a status update: no prune runs, `confirmed` holds few entries), the Location PUT of t=5 lists it back at its
    own 0. Its PATCH of t=2, arriving last, was STALE (the entry of 3 was read after the PUT had lowered the time
    it had passed); APPLIED had the state been pruned after the PATCH of t=4, and when the push of t=3 was a change
    (`confirmed` False) rather than a duplicate: a duplicate's time counts as the time an applied push sets."""
    _prune(monkeypatch, prune)

    def patch(minute: float, power: int) -> Any:
        return event("ConnectorPatch", {"max_electric_power": power, "last_updated": iso(ts(minute))},
                     object_id="LOC1", evse_uid="E1", connector_id="1")

    h = harness()
    first = patch(1, 22000)
    third = patch(3, 22000 if confirmed else 11000)
    h.run(event("Location", location(evses=[evse("E1", connectors=[connector("1", power=11000)])])), first)
    assert outcome_of(h.run(third), third.event_id) == ("DUPLICATE" if confirmed else "APPLIED")
    h.run(patch(4, 7000),
          event("Location", location(evses=[evse("E1", updated=5, connectors=[connector("1", power=11000)])],
                                     updated=5)))
    version = h.state(KEY).version
    late = patch(2, 22000)
    out = h.run(late)
    assert outcome_of(out, late.event_id) == "APPLIED"
    assert _location_row(out) == (late.event_id, version + 2, ts(5))
    assert _connector_rows(out) == [("E1", "1", ts(2), late.event_id)]
    assert stored(h)["evses"][0]["connectors"][0]["max_electric_power"] == 22000


def test_a_replayed_copy_of_an_evse_patch_orphaned_by_a_late_location_put_is_not_applied() -> None:
    """An EVSE status PATCH parked for its Location and ORPHANED when the Location PUT came after
    OCPI_PIPELINE_PARK_TTL was never applied. `ocpi-pipeline replay` sends its copy after the PUT; dated after the
    PUT's EVSE, it was applied now: the EVSE's status changed by a replay, a new status-history row, and the PATCH's
    ORPHANED row (source PUSH) became an APPLIED row of source REPLAY."""
    h = harness(park_ttl_min=5)
    patch = status_patch("E1", "CHARGING", 2, 0)
    put = event("Location", location(updated=1), received=6)  # 6 min later: past the 5 min TTL
    out = h.run(patch, put)
    assert outcome_of(out, patch.event_id) == "ORPHANED" and outcome_of(out, put.event_id) == "APPLIED"
    version = h.state(KEY).version
    out = h.run(event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(2))}, object_id="LOC1",
                      evse_uid="E1", received=0, event_id=patch.event_id, source="REPLAY"),
                event("Location", location(updated=1), received=6, event_id=put.event_id, source="REPLAY"))
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "evses") == []
    assert stored(h)["evses"][0]["status"] == "AVAILABLE" and h.state(KEY).version == version


def test_a_state_from_before_created_at_is_not_dated_by_its_next_event() -> None:
    """A Location state written before `created_at` existed has None there (`stage.replayed_orphan` then cannot
    tell). The next event applied set it to that event's receipt, months after the Location's real PUT: a replayed
    copy of an EVSE push received more than OCPI_PIPELINE_PARK_TTL before it, which the state never saw (the
    README's upgrade: events dead-lettered meanwhile are replayed), was taken for an ORPHANED one and dropped, the
    EVSE's status left wrong."""
    h = harness(park_ttl_min=5)
    h.run(event("Location", location(evses=[evse("E1", updated=1), evse("E2", updated=1)], updated=1), received=0))
    before = h.state(KEY)
    before.created_at = None  # as written by the version before
    h.store.data[KEY] = h.codec.encode(before)
    h.run(status_patch("E2", "CHARGING", 30, 30))  # the upgraded worker's first event of it
    assert h.state(KEY).created_at is None
    lost = event("EVSEPatch", {"status": "OUTOFORDER", "last_updated": iso(ts(20))}, object_id="LOC1",
                 evse_uid="E1", received=20, source="REPLAY")
    out = h.run(lost)
    assert outcome_of(out, lost.event_id) == "APPLIED"
    assert {e["uid"]: e["status"] for e in stored(h)["evses"]} == {"E1": "OUTOFORDER", "E2": "CHARGING"}


def test_an_event_parked_for_another_evse_does_not_make_a_replayed_copy_an_orphan() -> None:
    """An event of an existing Location parks for an EVSE or Connector it does not hold, not for the Location. A
    replayed copy of an event of an EVSE it does hold, received more than OCPI_PIPELINE_PARK_TTL before such an event
    still parked, needed nothing and was never orphaned (the README's upgrade: an event dead-lettered meanwhile,
    replayed), but was dropped as REPLAYED_ORPHANED, the EVSE's status left wrong."""
    h = harness(park_ttl_min=5)
    h.run(event("Location", location(evses=[evse("E1", updated=1)], updated=1), received=0))
    waiting = status_patch("E9", "CHARGING", 30, 30)  # an EVSE the Location does not hold (yet)
    assert outcome_of(h.run(waiting), waiting.event_id) == "PARKED"
    lost = event("EVSEPatch", {"status": "OUTOFORDER", "last_updated": iso(ts(20))}, object_id="LOC1",
                 evse_uid="E1", received=20, source="REPLAY")
    out = h.run(lost)
    assert outcome_of(out, lost.event_id) == "APPLIED"
    assert stored(h)["evses"][0]["status"] == "OUTOFORDER" and len(h.state(KEY).parked) == 1


def test_a_replayed_copy_of_an_evse_patch_orphaned_while_its_evse_never_came_is_not_parked_again() -> None:
    # The other side: a copy that would wait again (its EVSE still unknown), received more than the TTL before an
    # event of its Location still parked, was ORPHANED: neither parked again nor recorded.
    h = harness(park_ttl_min=5)
    h.run(event("Location", location(evses=[evse("E1", updated=1)], updated=1), received=0))
    first, second = status_patch("E9", "CHARGING", 2, 2), status_patch("E9", "AVAILABLE", 10, 10)
    out = h.run(first, second)
    assert outcome_of(out, first.event_id) == "ORPHANED" and outcome_of(out, second.event_id) == "PARKED"
    out = h.run(event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(2))}, object_id="LOC1",
                      evse_uid="E9", received=2, event_id=first.event_id, source="REPLAY"))
    assert rows(out.batch, "raw_events") == [] and out.outcomes == {"REPLAYED_ORPHANED": 1}
    assert [p.event_id for p in h.state(KEY).parked] == [second.event_id]


def test_a_replayed_copy_of_an_event_orphaned_by_a_late_evse_is_not_applied() -> None:
    """A Connector PUT for an EVSE the stored Location did not hold yet was parked, and ORPHANED when that EVSE came
    after OCPI_PIPELINE_PARK_TTL: never applied. Its Location was stored (within the TTL) and nothing else was parked,
    so `stage.replayed_orphan` did not know it, and `ocpi-pipeline replay` applied its copy: a Connector the original
    never held added to the tree, a new Location version, and its ORPHANED row (source PUSH) became an APPLIED row of
    source REPLAY."""
    h = harness(park_ttl_min=5)
    h.run(event("Location", location(evses=[evse("E1", updated=1)], updated=1), received=0))
    waiting = event("Connector", connector("2", updated=2), object_id="LOC1", evse_uid="E3", connector_id="2",
                    received=2)
    assert outcome_of(h.run(waiting), waiting.event_id) == "PARKED"
    put_e3 = event("EVSE", evse("E3", updated=1), object_id="LOC1", evse_uid="E3", received=10)  # 8 min later
    out = h.run(put_e3)
    assert outcome_of(out, waiting.event_id) == "ORPHANED" and outcome_of(out, put_e3.event_id) == "APPLIED"
    version = h.state(KEY).version
    out = h.run(event("Connector", connector("2", updated=2), object_id="LOC1", evse_uid="E3", connector_id="2",
                      received=2, event_id=waiting.event_id, source="REPLAY"))
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "connectors") == []
    assert out.outcomes == {"REPLAYED_ORPHANED": 1}
    assert [c["id"] for c in stored(h)["evses"][1]["connectors"]] == ["1"] and h.state(KEY).version == version


def test_a_patch_of_an_evses_own_fields_older_than_a_connector_push_is_applied() -> None:
    # The CPO sets E1 CHARGING (t=3) and E1's Connector 1 to 11 kW (t=5): independent fields. Arriving the other way
    # round, the Connector push has raised E1's last_updated to 5 (08 §3), but the status PATCH is newer than every
    # push that set E1's own fields: it is applied, as in order, and E1's last_updated stays the Connector's.
    status = status_patch("E1", "CHARGING", 3, 3)
    power = event("ConnectorPatch", {"max_electric_power": 11000, "last_updated": iso(ts(5))}, object_id="LOC1",
                  evse_uid="E1", connector_id="1", received=2)
    in_order = harness()
    in_order.run(event("Location", location(), received=0), status, power)
    h = harness()
    h.run(event("Location", location(), received=0))
    out = h.run(power, status)
    assert outcome_of(out, status.event_id) == "APPLIED"
    assert stored(h) == stored(in_order)
    assert stored(h)["evses"][0]["status"] == "CHARGING" and stored(h)["evses"][0]["last_updated"] == iso(ts(5))
    history = rows(out.batch, "evse_status_history")
    assert [(r[EVSE_HISTORY_COLUMNS.index("status")], r[EVSE_HISTORY_COLUMNS.index("changed_at")])
            for r in history] == [("CHARGING", ts(3))]
    # Still stale: a status PATCH older than E1's own last status PATCH, and a PUT of E1 older than the Connector
    # push (it would put the older Connector back).
    older = status_patch("E1", "AVAILABLE", 2, 4)
    put = event("EVSE", evse("E1", status="BLOCKED", updated=4), object_id="LOC1", evse_uid="E1", received=5)
    out = h.run(older, put)
    assert (outcome_of(out, older.event_id), outcome_of(out, put.event_id)) == ("STALE", "STALE")
    assert stored(h)["evses"][0]["status"] == "CHARGING"


def test_a_patch_of_the_locations_own_fields_older_than_an_evse_push_is_applied() -> None:
    # A Location `name` PATCH (t=3) and an EVSE status PATCH (t=5), or a duplicate of one, arriving the other way
    # round: the name is applied, as in order; the Location's last_updated stays the EVSE's.
    for repeat in (False, True):
        h = harness()
        h.run(event("Location", location(), received=0))
        if repeat:
            h.run(status_patch("E1", "CHARGING", 1, 1))
        out = h.run(status_patch("E1", "CHARGING", 5, 2),
                    named := event("LocationPatch", {"name": "New", "last_updated": iso(ts(3))}, object_id="LOC1",
                                   received=3))
        assert outcome_of(out, named.event_id) == "APPLIED"
        assert stored(h)["name"] == "New"
        assert stored(h)["last_updated"] == iso(ts(5 if not repeat else 3))  # a duplicate changes no time
        older = event("LocationPatch", {"name": "Old", "last_updated": iso(ts(2))}, object_id="LOC1", received=4)
        assert outcome_of(h.run(older), older.event_id) == "STALE"


def _copy(original: Any, kind: str, body: dict[str, Any], received: float, **ids: Any) -> Any:
    return event(kind, body, received=received, event_id=original.event_id, source="REPLAY", **ids)


def test_a_replayed_copy_of_an_evse_push_orphaned_by_a_full_park_is_neither_applied_nor_recorded() -> None:
    """An EVSE PATCH ORPHANED at once because its Location's parked events were at OCPI_PIPELINE_PARK_MAX
    (PARK_OVERFLOW) was never applied. `ocpi-pipeline replay` sends its copy after the Location PUT came (within the
    park TTL, which the TTL rule dates): dated after the stored EVSE, it was applied now (the EVSE's status changed,
    its ORPHANED row of source PUSH turned APPLIED of source REPLAY). It was refused for good: no row."""
    h = harness(park_ttl_min=5, park_max=1)
    parked = status_patch("E1", "CHARGING", 1, received=0)
    body = {"status": "BLOCKED", "last_updated": iso(ts(30))}
    overflow = event("EVSEPatch", body, object_id="LOC1", evse_uid="E1", received=1)
    out = h.run(parked, overflow)
    assert outcome_of(out, parked.event_id) == "PARKED" and outcome_of(out, overflow.event_id) == "ORPHANED"
    h.run(event("Location", location(), received=2))  # within the TTL: the parked PATCH applies
    assert stored(h)["evses"][0]["status"] == "CHARGING"
    out = h.run(_copy(overflow, "EVSEPatch", body, 1, object_id="LOC1", evse_uid="E1"))
    assert rows(out.batch, "raw_events") == [] and rows(out.batch, "evses") == []
    assert out.outcomes == {"REPLAYED_ORPHANED": 1} and stored(h)["evses"][0]["status"] == "CHARGING"


def _restored_outcome(minute: float) -> tuple[str, str, bool]:
    """(original outcome, restored outcome, same tree) of an EVSE PATCH dated `minute` that came before its Location
    PUT (dated 0), and of its copy in a state restored by a replay (README "A worker's state starting empty over a
    populated store")."""
    body = {"status": "CHARGING", "last_updated": iso(ts(minute))}
    patch = event("EVSEPatch", body, object_id="LOC1", evse_uid="E1", received=0)
    put = event("Location", location(updated=0), received=1)
    original = harness()
    first = outcome_of(original.run(patch, put), patch.event_id)
    restored = harness()
    out = restored.run(_copy(patch, "EVSEPatch", body, 0, object_id="LOC1", evse_uid="E1"),
                       _copy(put, "Location", location(updated=0), 1))
    return first, outcome_of(out, patch.event_id), stored(restored) == stored(original)


def test_a_state_restored_by_a_replay_applies_an_evse_push_parked_for_its_location_as_the_original_did() -> None:
    """An EVSE PATCH dated like its Location PUT that came before it was parked, then applied after the PUT (the
    later arrival). Its copy, parked again by the restoring replay, was STALE when the PUT's copy came: a copy
    received before the event the stored tree came from is stale at an equal `last_updated`, a rule for copies sent
    after what followed them, not for a parked one retried in its original place. The status was lost, and the
    row stayed PARKED (of the copy) for the sweep to orphan."""
    assert _restored_outcome(0) == ("APPLIED", "APPLIED", True)


def test_a_state_restored_by_a_replay_records_the_outcome_of_an_evse_push_parked_for_its_location() -> None:
    """An EVSE PATCH dated before its Location PUT that came before it was parked, then STALE. Its copy, parked
    again by the restoring replay, wrote a PARKED row (source REPLAY) over the original's, and its STALE when the
    PUT's copy came was not recorded (a replay that changes nothing): the row stayed PARKED for the sweep to turn
    ORPHANED. The copy's row was replaced all the same: its outcome is recorded."""
    assert _restored_outcome(-1) == ("STALE", "STALE", True)
