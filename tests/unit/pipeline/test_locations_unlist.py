"""Full sync of Locations (08 §2.1) in stage 1: an UNLIST (a complete pulled list up to its date_to no longer held
the Location) marks its row unlisted and its EVSEs and Connectors gone; it never undoes a newer push, a second one
changes nothing, and only a push newer than the list lists the Location again."""

from __future__ import annotations

from typing import Any

from infra.codec import DecodedEvent, decode_event, encode_event
from infra.events import unlist_event
from ocpi.identity import ObjectKey
from pipeline.locations import process_locations
from pipeline.projection import CONNECTOR_COLUMNS, EVSE_COLUMNS, EVSE_HISTORY_COLUMNS, LOCATION_COLUMNS
from pipeline.state import LocationState

from .builders import Harness, column, event, evse, iso, location, rows, ts
from .test_locations import KEY, outcome_of


def harness() -> Harness:
    return Harness(process_locations, LocationState)


def unlist(until: float, received: float) -> DecodedEvent:
    built = unlist_event(partner_id="p1", key=ObjectKey("NL", "TNM", "LOC1"), listed_until=ts(until),
                         correlation_id="c", received_at=ts(received))
    return decode_event(encode_event(built))


def unlisted(out: Any) -> list[bool]:
    return column(out.batch, "locations", LOCATION_COLUMNS, "unlisted")


def test_an_unlist_marks_the_location_unlisted_and_its_evses_and_connectors_gone() -> None:
    h = harness()
    put = h.run(event("Location", location(evses=[evse("E1"), evse("E2", status="CHARGING")], updated=5),
                      received=6))
    assert unlisted(put) == [False]
    gone = unlist(until=60, received=70)
    out = h.run(gone)
    assert outcome_of(out, gone.event_id) == "APPLIED"
    assert unlisted(out) == [True]
    assert column(out.batch, "locations", LOCATION_COLUMNS, "last_updated") == [ts(5)]  # the CPO's last version
    assert column(out.batch, "locations", LOCATION_COLUMNS, "version")[0] > \
        column(put.batch, "locations", LOCATION_COLUMNS, "version")[0]
    assert column(out.batch, "evses", EVSE_COLUMNS, "present") == [False, False]
    assert column(out.batch, "connectors", CONNECTOR_COLUMNS, "present") == [False, False]
    history = [(r[EVSE_HISTORY_COLUMNS.index("evse_uid")], r[EVSE_HISTORY_COLUMNS.index("previous_status")],
                r[EVSE_HISTORY_COLUMNS.index("status")], r[EVSE_HISTORY_COLUMNS.index("changed_at")])
               for r in rows(out.batch, "evse_status_history")]
    assert history == [("E1", "AVAILABLE", "", ts(60)), ("E2", "CHARGING", "", ts(60))]
    assert h.state(KEY).unlisted_at == ts(60)


def test_an_unlist_never_undoes_a_push_as_new_as_its_list() -> None:
    """The list held only Locations updated before its date_to: one stored with a later (or the same) time may have
    left it for that version."""
    for updated in (60, 61):
        h = harness()
        h.run(event("Location", location(updated=updated), received=62))
        gone = unlist(until=60, received=70)
        out = h.run(gone)
        assert outcome_of(out, gone.event_id) == "STALE" and rows(out.batch, "locations") == []
        assert h.state(KEY).unlisted_at is None


def test_an_unlist_again_or_of_nothing_stored_changes_nothing() -> None:
    h = harness()
    first = unlist(until=60, received=70)
    assert outcome_of(h.run(first), first.event_id) == "DUPLICATE"  # nothing stored
    h.run(event("Location", location(updated=5), received=80))
    h.run(unlist(until=90, received=95))
    again = unlist(until=100, received=110)  # a second full pull
    out = h.run(again)
    assert outcome_of(out, again.event_id) == "DUPLICATE" and rows(out.batch, "locations") == []
    # The same UNLIST read again (a replay) is no second change either.
    copy = h.run(again)
    assert rows(copy.batch, "locations") == [] and h.state(KEY).unlisted_at == ts(100)


def test_only_a_push_newer_than_the_list_lists_the_location_again() -> None:
    h = harness()
    h.run(event("Location", location(evses=[evse("E1")], updated=5), received=6))
    h.run(unlist(until=60, received=70))
    # The CPO's version from before the list (a push that arrived late, a windowed pull reading it again): stale.
    late = event("Location", location(evses=[evse("E1")], updated=30), received=71)
    out = h.run(late)
    assert outcome_of(out, late.event_id) == "STALE" and rows(out.batch, "locations") == []
    # Listed again, unchanged but for its time: no duplicate of the content applied before the UNLIST.
    back = event("Location", location(evses=[evse("E1")], updated=65), received=72)
    out = h.run(back)
    assert outcome_of(out, back.event_id) == "APPLIED" and unlisted(out) == [False]
    assert column(out.batch, "evses", EVSE_COLUMNS, "present") == [True]  # its EVSE and Connector enter again
    assert column(out.batch, "connectors", CONNECTOR_COLUMNS, "present") == [True]
    assert [(r[EVSE_HISTORY_COLUMNS.index("previous_status")], r[EVSE_HISTORY_COLUMNS.index("status")])
            for r in rows(out.batch, "evse_status_history")] == [("", "AVAILABLE")]
    assert h.state(KEY).unlisted_at is None


def test_a_newer_evse_patch_lists_the_location_again() -> None:
    h = harness()
    h.run(event("Location", location(evses=[evse("E1"), evse("E2")], updated=5), received=6))
    h.run(unlist(until=60, received=70))
    patch = event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(65))}, object_id="LOC1",
                  evse_uid="E2", received=72)
    out = h.run(patch)
    assert outcome_of(out, patch.event_id) == "APPLIED" and unlisted(out) == [False]
    assert sorted(column(out.batch, "evses", EVSE_COLUMNS, "evse_uid")) == ["E1", "E2"]


def test_a_push_dated_at_the_lists_date_to_lists_the_location_again_in_either_order() -> None:
    """date_to is exclusive (04 §4.2): the list held only Locations updated before it, so it says nothing of a
    version dated at it. Applied before the UNLIST that version makes the UNLIST stale; arriving after it, it must
    list the Location again: the outcome may not depend on which of the two Kafka holds first."""
    first = harness()
    first.run(event("Location", location(updated=5), received=6))
    first.run(event("Location", location(updated=60), received=62))
    first.run(unlist(until=60, received=70))
    assert first.state(KEY).unlisted_at is None
    then = harness()
    then.run(event("Location", location(updated=5), received=6))
    then.run(unlist(until=60, received=70))
    at = event("Location", location(updated=60), received=72)
    out = then.run(at)
    assert outcome_of(out, at.event_id) == "APPLIED" and unlisted(out) == [False]
    assert then.state(KEY).unlisted_at is None
