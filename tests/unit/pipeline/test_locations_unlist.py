"""Full sync of Locations (08 §2.1) in stage 1: an UNLIST (a complete pulled list up to its date_to no longer held
the Location) marks its row unlisted and its EVSEs and Connectors gone; it never undoes a newer push, a second one
changes nothing, and only a push newer than the list, or a later pull that returns it, lists the Location again."""

from __future__ import annotations

from typing import Any

from infra.codec import DecodedEvent, decode_event, encode_event
from infra.events import unlist_event
from ocpi.identity import ObjectKey
from pipeline.locations import process_locations
from pipeline.projection import (
    CONNECTOR_COLUMNS,
    EVSE_COLUMNS,
    EVSE_HISTORY_COLUMNS,
    LOCATION_COLUMNS,
    RAW_EVENT_COLUMNS,
)
from pipeline.state import LocationState

from .builders import Harness, column, event, evse, iso, location, rows, ts
from .test_locations import KEY, outcome_of


def harness() -> Harness:
    return Harness(process_locations, LocationState)


def unlist(until: float, received: float) -> DecodedEvent:
    built = unlist_event(partner_id="p1", key=ObjectKey("NL", "TNM", "LOC1"), listed_until=ts(until),
                         correlation_id="c", received_at=ts(received))
    return decode_event(encode_event(built))


def replayed(original: DecodedEvent) -> DecodedEvent:
    """The copy `ocpi-pipeline replay` publishes: the same event, `source` REPLAY (`jobs.replay`)."""
    return decode_event(encode_event({**original.to_event(), "source": "REPLAY"}))


def detail_of(out: Any, event_id: str) -> str:
    found = dict(zip(column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "event_id"),
                     column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "outcome_detail"), strict=True))
    return found[event_id]


def listing(out: Any) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]],
                               list[tuple[Any, ...]]]:
    """The rows of the Location, its EVSEs, Connectors and status history a batch wrote, by the columns that say
    what is listed (version and event id apart)."""
    def pick(table: str, columns: tuple[str, ...], names: tuple[str, ...]) -> list[tuple[Any, ...]]:
        return [tuple(r[columns.index(n)] for n in names) for r in rows(out.batch, table)]
    return (pick("locations", LOCATION_COLUMNS, ("location_id", "name", "evse_count", "last_updated", "unlisted",
                                                 "received_at", "personal_at")),
            pick("evses", EVSE_COLUMNS, ("evse_uid", "status", "present", "last_updated")),
            pick("connectors", CONNECTOR_COLUMNS, ("evse_uid", "connector_id", "present", "last_updated")),
            pick("evse_status_history", EVSE_HISTORY_COLUMNS, ("evse_uid", "previous_status", "status", "changed_at",
                                                               "received_at")))


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
    # The CPO's version from before the list, a push that arrived late: stale (a later pull's would list it again).
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


def test_a_later_pull_listing_the_location_unchanged_lists_it_again_as_stored() -> None:
    """A complete list that wrongly left the Location out (an empty list sent in error) unlisted it; every later pull
    returns it with its unchanged `last_updated`, before the list's date_to. Received after that date_to, the pulled
    PUT comes from a later crawl (pulls of a module never overlap, the UNLIST follows its crawl's pages in the
    partition): the partner lists it again. Not a DUPLICATE of the content stored before the UNLIST, nor STALE."""
    h = harness()
    body = location(evses=[evse("E1", updated=5), evse("E2", status="CHARGING", updated=5)], updated=5)
    h.run(event("Location", body, received=6))
    gone = h.run(unlist(until=60, received=70))
    again = event("Location", body, received=80, source="PULL")
    out = h.run(again)
    assert outcome_of(out, again.event_id) == "APPLIED"
    assert detail_of(out, again.event_id) == (
        f"a pull received after {ts(60).isoformat()}, up to which a complete pulled list no longer held the "
        "Location, lists it again")
    assert listing(out) == (
        [("LOC1", "Station", 2, ts(5), False, ts(80), ts(6))],  # personal data still dated by the PUT that set it
        [("E1", "AVAILABLE", True, ts(5)), ("E2", "CHARGING", True, ts(5))],
        [("E1", "1", True, ts(5)), ("E2", "1", True, ts(5))],
        # From '' (the UNLIST's row at 60), when the pull brought them back.
        [("E1", "", "AVAILABLE", ts(80), ts(80)), ("E2", "", "CHARGING", ts(80), ts(80))])
    assert column(out.batch, "locations", LOCATION_COLUMNS, "version")[0] > \
        column(gone.batch, "locations", LOCATION_COLUMNS, "version")[0]
    assert h.state(KEY).unlisted_at is None
    # Listed again, a pull or push of the same content is the duplicate it was before the UNLIST.
    twice = event("Location", body, received=90, source="PULL")
    out = h.run(twice)
    assert outcome_of(out, twice.event_id) == "DUPLICATE" and rows(out.batch, "locations") == []


def test_a_later_pull_of_an_older_version_lists_the_stored_location_again_without_going_back() -> None:
    h = harness()
    h.run(event("Location", location(name="Old", updated=5), received=6))
    h.run(event("Location", location(name="New", updated=20), received=21))
    h.run(unlist(until=60, received=70))
    old = event("Location", location(name="Old", updated=5), received=80, source="PULL")
    out = h.run(old)
    assert outcome_of(out, old.event_id) == "APPLIED"
    assert listing(out) == ([("LOC1", "New", 1, ts(20), False, ts(80), ts(21))], [("E1", "AVAILABLE", True, ts(20))],
                            [("E1", "1", True, ts(20))], [("E1", "", "AVAILABLE", ts(80), ts(80))])
    assert h.state(KEY).unlisted_at is None


def test_a_later_pull_of_a_newer_version_dated_before_the_list_is_applied() -> None:
    h = harness()
    h.run(event("Location", location(name="Old", updated=5), received=6))
    h.run(unlist(until=60, received=70))
    newer = event("Location", location(name="New", updated=20), received=80, source="PULL")
    out = h.run(newer)
    assert outcome_of(out, newer.event_id) == "APPLIED" and detail_of(out, newer.event_id) == ""
    assert listing(out) == ([("LOC1", "New", 1, ts(20), False, ts(80), ts(80))], [("E1", "AVAILABLE", True, ts(20))],
                            [("E1", "1", True, ts(20))], [("E1", "", "AVAILABLE", ts(20), ts(80))])
    assert h.state(KEY).unlisted_at is None


def test_a_late_push_or_a_pull_received_by_the_lists_date_to_does_not_list_the_location_again() -> None:
    """A push dated before the list's date_to, arriving after the UNLIST, is a late one (the list no longer held
    that version). A pulled PUT received by the date_to comes from a crawl before the list's, applied before it."""
    h = harness()
    h.run(event("Location", location(updated=5), received=6))
    h.run(unlist(until=60, received=70))
    for late in (event("Location", location(updated=5), received=80),
                 event("Location", location(updated=5), received=60, source="PULL")):
        out = h.run(late)
        assert outcome_of(out, late.event_id) == "STALE" and rows(out.batch, "locations") == []
        assert h.state(KEY).unlisted_at == ts(60)


def test_a_replay_of_the_unlist_and_the_pull_that_listed_the_location_again_changes_nothing() -> None:
    """Replayed copies carry `source` REPLAY, so a copy of the pulled PUT cannot say it came from a crawl: the
    replayed UNLIST, received before the event the stored Location was listed again by, must not unlist it."""
    h = harness()
    body = location(updated=5)
    first = event("Location", body, received=6)
    h.run(first)
    gone = unlist(until=60, received=70)
    h.run(gone)
    again = event("Location", body, received=80, source="PULL")
    h.run(again)
    for copy in (replayed(first), replayed(gone), replayed(again)):
        out = h.run(copy)
        assert rows(out.batch, "locations") == [] and rows(out.batch, "evses") == []
    assert h.state(KEY).unlisted_at is None


def test_a_rebuild_leaves_a_location_a_pull_listed_again_unlisted_until_the_next_pull() -> None:
    """A rebuild (replayed copies into an empty state) cannot tell the replayed pulled PUT from a late push: it stays
    STALE, and the Location unlisted, until the next pull returns it (README, full sync)."""
    body = location(updated=5)
    history = [event("Location", body, received=6), unlist(until=60, received=70),
               event("Location", body, received=80, source="PULL")]
    h = harness()
    for copy in map(replayed, history):
        h.run(copy)
    assert h.state(KEY).unlisted_at == ts(60)
    nxt = event("Location", body, received=200, source="PULL")
    out = h.run(nxt)
    assert outcome_of(out, nxt.event_id) == "APPLIED" and unlisted(out) == [False]
    assert h.state(KEY).unlisted_at is None
