"""Stage 1 for Locations: one Location tree's events (Location, EVSE and Connector level) in order.

The state holds the whole Location as OCPI JSON; every applied event writes the Location row and the rows of
the EVSEs and Connectors that changed (version = the Location's version), plus EVSE status history. The
Location row carries `personal_at` (see `LocationState`), by which retention dates its `publish_allowed_to`.

A Location PUT replaces the Location (08 §3.3). EVSEs it no longer lists (digest ambiguity #5: EVSEs are never
deleted, they should come with status REMOVED) are recorded as EVSE_MISSING_FROM_PUT (unless their status was
REMOVED already: deleted the spec's way) and their rows kept with `present = false`, so EVSE status history and
sessions that point at them keep their meaning; so are those a Location PATCH of `evses` leaves out. Their status
history ends with a row to status '' (as before its first row), from which one listed again continues. The push's
`last_updated` is kept for each EVSE and Connector it left out (`LocationState.confirmed`): an older push for one of
them, arriving after it, is stale, as it is in order, and does not bring it back. So is it kept for the lists a push
replaces whole (the Location's EVSEs, an EVSE's Connectors): an older push for an EVSE or Connector the tree never
held, arriving after it, is stale too and does not add it (in order the newer list would have dropped it).
Full sync (08 §2.1): an UNLIST (a complete pulled list, up to its date_to, no longer held the Location; `unlist`)
writes the Location row `unlisted` and its EVSEs and Connectors as left out; a push dated at or after that list's
date_to (exclusive: the list said nothing of such a version) lists it again, and so does a later pull's PUT of it
whatever its date (`lists_again`).
A push of an EVSE or Connector raises its parents' `last_updated` (08 §3), but sets none of their own fields: where
it raised one beyond the time of the pushes that set the parent's own fields, that time is kept
(`LocationState.own_updated`), and a PATCH of the parent's own fields (an EVSE `status`) is compared with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import msgspec

from infra.codec import DecodedEvent
from ocpi.canonical import content_hash
from ocpi.identity import ci_equal, ci_normalize
from ocpi.model import EVSE, Location
from pipeline import ordering, projection, wire
from pipeline.dedup import (
    confirmations,
    fingerprint,
    identity,
    is_duplicate,
    level_identity,
    list_keys_over,
    lists_over,
    lists_over_key,
    lists_replaced,
)
from pipeline.records import Anomaly, Outcome, Record
from pipeline.retention import LOCATION_PERSONAL_FIELD
from pipeline.stage import (
    PARKED_MAX_BYTES,
    StageOutput,
    StageRules,
    expire_parked,
    orphan_expired,
    overflowed,
    parked_record,
    parking_full,
    remember,
    replayed_before_created,
    replayed_before_parked,
    replayed_overflow,
    seen_before,
    to_parked,
)
from pipeline.state import LocationState, TypedView


@dataclass(slots=True)
class Run:
    """What a run of one Location's events in a batch carries from event to event (never stored): the Location
    as a Struct (`wire.StoredStruct`) and its EVSEs' JSON (`wire.EvseJson`)."""

    stored: wire.StoredStruct[Location] = field(default_factory=lambda: wire.StoredStruct(Location))
    json: wire.EvseJson = field(default_factory=wire.EvseJson)


def process_locations(view: TypedView[LocationState], key: str, records: list[Record], rules: StageRules,
                      out: StageOutput) -> None:
    state = view.get(key) or LocationState()
    run = Run()
    for record in records:
        if record.offset <= state.offset:
            out.read_before(record, state.offset)
            continue
        state.offset = record.offset
        state.seen_at = ordering.newest(state.seen_at, record.received_at)
        if seen_before(state, record, out):
            continue
        expire_parked(state, record, rules, out)
        handle(state, run, record, rules, out)
        remember(state, record.event.event_id)
    view.set(key, state)


def handle(state: LocationState, run: Run, record: Record, rules: StageRules, out: StageOutput, *,
           retry: bool = False) -> bool:
    """Apply one event; returns False when it had to be parked."""
    event = record.event
    if event.operation == "UNLIST":
        unlist(state, record, out)
        return True
    if (event.level, event.operation) != ("LOCATION", "PUT") and (
            replayed_before_created(record, state, rules.park_ttl) or replayed_overflow(record, state)):
        out.outcomes["REPLAYED_ORPHANED"] += 1  # its ORPHANED row (and source) stands
        return True
    last_updated = event.payload["last_updated"]
    out.flag_future(record, last_updated, rules)
    current = run.stored.of(state.object_json)
    relists = state.unlisted_at is not None and lists_again(record, state.unlisted_at)
    if state.unlisted_at is not None and last_updated < state.unlisted_at and not relists:
        # A complete list up to `unlisted_at` (its date_to, exclusive) no longer held the Location: a push dated at
        # or after it lists it again, as, arriving first, it made the UNLIST stale (`unlist`): either order agrees.
        detail = (f"last_updated {last_updated.isoformat()} is before {state.unlisted_at.isoformat()}, up to which "
                  "a complete pulled list no longer held the Location")
        out.outcome(record, Outcome.STALE, detail)
        out.anomaly(Anomaly.STALE_UPDATE, event, detail)
        return True
    if is_duplicate(state.last_identity, state.last_hash, event):
        _confirm(state, current, event)
        out.outcome(record, Outcome.DUPLICATE)
        return True
    target = ordering.target_last_updated(current, event)
    ident = identity(event)
    stored = ordering.newest(target, state.confirmed.get(ident))
    if target is not None and ident in state.own_updated and own_fields_only(event):
        stored = state.own_updated[ident]  # its own fields' time, not what its children's pushes raised it to
    if target is None:  # an EVSE or Connector not in the tree: not in any newer list that left it out either
        stored = ordering.newest(stored, *(state.confirmed.get(key) for key in lists_over(event)))
    # A parked event is retried in its original place, right after the push it waited for (also when both are
    # replayed copies, a state restored by a replay): not a copy sent again after what followed it.
    if ordering.is_stale(stored, last_updated, replayed_earlier=not retry and ordering.replayed_earlier(
            event, record.received_at, state.applied_at)):
        if relists and current is not None:  # listed again, but not back to an older version
            relist(state, record, current, out)
            return True
        detail = f"last_updated {last_updated.isoformat()} is older than the stored {stored}"
        out.outcome(record, Outcome.STALE, detail)
        out.anomaly(Anomaly.STALE_UPDATE, event, detail)
        return True
    try:
        location, document = ordering.apply_location_event(current, event, run.json)
    except ordering.NeedsObject as missing:
        if retry:
            return False  # still waiting; the caller keeps it parked
        if replayed_before_parked(record, state, rules.park_ttl):
            out.outcomes["REPLAYED_ORPHANED"] += 1  # its ORPHANED row (and source) stands
            return True
        if parking_full(state.parked, record, rules.park_max):
            out.outcome(record, Outcome.ORPHANED, "too many parked events for this Location")
            out.anomaly(Anomaly.PARK_OVERFLOW, event, f"more than {rules.park_max} events (or {PARKED_MAX_BYTES} "
                        "bytes) wait for their object")
            overflowed(state, event.event_id)
        else:
            state.parked.append(to_parked(record))
            out.outcome(record, Outcome.PARKED, f"waiting: {missing}")
        return True
    except ordering.InvalidMerge as exc:
        out.outcome(record, Outcome.INVALID, exc.reason)
        out.anomaly(Anomaly.INVALID_MERGE, event, exc.reason)
        return True
    if relists and current is not None and location == current:  # the content stored: a new version of it all the same
        relist(state, record, current, out)
        return True
    apply(state, record, current, location, document, out)
    run.stored.keep(document, location)
    out.outcome(record, Outcome.APPLIED)
    if state.parked and not retry:
        retry_parked(state, run, rules, out, record.received_at)
    return True


def unlist(state: LocationState, record: Record, out: StageOutput) -> None:
    """Full sync (08 §2.1): a complete pulled list up to `listed_until` (the UNLIST's `last_updated`, the list's
    date_to) no longer held the stored Location, which is no longer valid: its row says `unlisted`, its EVSEs and
    Connectors leave (rows `present = false`, status history to ''), as those a Location PUT leaves out. Not when the
    stored Location (or a duplicate that confirmed it) is dated at or after `listed_until`: the list could not hold
    that version, so it says nothing of it (STALE). Unlisted already, or nothing stored: a DUPLICATE (the list read
    again, a pull resumed). A later push dated at or after `listed_until` lists it again (`apply`); an older one is
    stale, unless a later pull returned it (`lists_again`)."""
    event = record.event
    listed_until: datetime = event.payload["last_updated"]
    current = wire.StoredStruct(Location).of(state.object_json)
    if current is None or state.unlisted_at is not None:
        if state.unlisted_at is not None:
            state.unlisted_at = max(state.unlisted_at, listed_until)
        out.outcome(record, Outcome.DUPLICATE, "unlisted already" if current is not None else "no Location stored")
        return
    if state.applied_at is not None and ordering.replayed_earlier(event, record.received_at, state.applied_at):
        # A replayed copy received before the event the stored Location came from: a pulled PUT that listed it again
        # after this UNLIST, dated before it (`lists_again`), whose own replayed copy can no longer say it was pulled.
        out.outcome(record, Outcome.STALE, "a replayed copy of an UNLIST received before the stored Location's event")
        return
    stored = ordering.newest(current.last_updated, state.confirmed.get(level_identity("LOCATION")))
    if stored is not None and stored >= listed_until:
        out.outcome(record, Outcome.STALE, f"the stored Location is dated {stored.isoformat()}, not before "
                    f"{listed_until.isoformat()}, up to which the complete list was read")
        return
    version = projection.next_version(state.version, current.last_updated)
    tree = wire.builtins(msgspec.structs.replace(current, evses=None))
    personal_at = _personal_at(state, current, record.received_at)
    document = state.object_json or b""
    row = projection.location_row(event, tree, document, version, personal_at,
                                  evse_count=len(current.evses or ()), unlisted=True)
    out.batch.put("locations", projection.LOCATION_COLUMNS, ("locations", row[0], row[1], row[2]), row)
    for evse in current.evses or ():
        _leave(out, tree, evse, event, version, listed_until)
    state.personal_at = personal_at
    state.unlisted_at = listed_until
    state.last_identity = identity(event)
    state.last_hash = f"UNLIST:{listed_until.isoformat()}"  # a PUT of the content listed before is no duplicate
    state.version = version
    state.applied_event_id = event.event_id
    state.applied_at = ordering.newest(state.applied_at, record.received_at)
    out.outcome(record, Outcome.APPLIED, f"a complete pulled list up to {listed_until.isoformat()} no longer held it")


def lists_again(record: Record, unlisted_at: datetime) -> bool:
    """Whether a push for a Location unlisted up to `unlisted_at` (`unlist`) lists it again whatever its
    `last_updated`: a Location PUT pulled (`source` PULL) after `unlisted_at`, the list's date_to. It comes from a
    later crawl: pulls of a partner's module never overlap (a lock), a crawl's UNLISTs follow its acknowledged pages,
    the events of one Location land in one partition in order, so an earlier crawl's pulled PUTs were read before
    the UNLIST; the crawl that sent it did not hold the Location. So the partner lists it again (its list had left
    it out by mistake: an empty list sent in error, a page gone wrong), unchanged since, or even older than stored.
    Not a push dated before `unlisted_at` (a late one), nor a replayed copy, which no longer says it was pulled."""
    event = record.event
    return (event.source == "PULL" and (event.level, event.operation) == ("LOCATION", "PUT")
            and record.received_at > unlisted_at)


def relist(state: LocationState, record: Record, stored: Location, out: StageOutput) -> None:
    """List the unlisted Location again as stored (`lists_again`: a pulled PUT of the stored content, or an older
    one, which does not take it back): a new version of its row not `unlisted`, its EVSEs and Connectors present
    again, their status history from '' (the UNLIST's row) at the pull's receipt, as when an EVSE is listed again."""
    event = record.event
    assert state.unlisted_at is not None
    version = projection.next_version(state.version, stored.last_updated)
    tree = wire.builtins(msgspec.structs.replace(stored, evses=None))
    personal_at = _personal_at(state, stored, record.received_at)
    evses = stored.evses or ()
    row = projection.location_row(event, tree, state.object_json or b"", version, personal_at,
                                  evse_count=len(evses))
    out.batch.put("locations", projection.LOCATION_COLUMNS, ("locations", row[0], row[1], row[2]), row)
    for evse in evses:
        evse_tree = wire.builtins(evse)
        out.batch.add("evses", projection.EVSE_COLUMNS,
                      projection.evse_row(tree, evse_tree, present=True, event_id=event.event_id, version=version))
        out.batch.add("evse_status_history", projection.EVSE_HISTORY_COLUMNS,
                      projection.evse_history_row(tree, evse_tree, None, event, version,
                                                  changed_at=record.received_at))
        for connector in evse_tree["connectors"]:
            out.batch.add("connectors", projection.CONNECTOR_COLUMNS,
                          projection.connector_row(tree, evse.uid, connector, present=True, event_id=event.event_id,
                                                   version=version))
    detail = (f"a pull received after {state.unlisted_at.isoformat()}, up to which a complete pulled list no longer "
              "held the Location, lists it again")
    state.personal_at = personal_at
    state.unlisted_at = None
    state.last_identity = level_identity("LOCATION")
    state.last_hash = content_hash(stored)  # a PUT of the stored content is its duplicate again
    state.version = version
    state.applied_event_id = event.event_id
    state.applied_at = ordering.newest(state.applied_at, record.received_at)
    out.outcome(record, Outcome.APPLIED, detail)


def _personal_at(state: LocationState, stored: Location, received_at: datetime) -> datetime:
    """When the stored Location's `publish_allowed_to` came (`LocationState.personal_at`). A state from before
    `personal_at` does not know: the Location's last_updated then (bumped when the CPO set it) stands in, fixed by the
    event at `received_at` so later updates cannot postpone it."""
    return state.personal_at or min(stored.last_updated, received_at)


def _leave(out: StageOutput, tree: dict[str, Any], gone_evse: EVSE, event: DecodedEvent, version: int,
           at: datetime) -> list[str]:
    """Rows of an EVSE that leaves the tree at `at` (left out by a push, or its Location unlisted): kept with
    `present = false`, and so are its Connectors; its status history ends with a row to '' (as before its first
    sighting: listed again, it continues from '' instead of after a status it kept for ever). Returns the
    identities (`dedup.level_identity`) of the EVSE and its Connectors."""
    gone = wire.builtins(gone_evse)
    out.batch.add("evses", projection.EVSE_COLUMNS,
                  projection.evse_row(tree, gone, present=False, event_id=event.event_id, version=version))
    out.batch.add("evse_status_history", projection.EVSE_HISTORY_COLUMNS,
                  projection.evse_history_row(tree, gone, gone_evse.status, event, version, changed_at=at, status=""))
    return [level_identity("EVSE", gone["uid"]),
            *_missing_connectors(out, tree, gone["uid"], gone, set(), event.event_id, version)]


def _confirm(state: LocationState, current: Location | None, event: DecodedEvent) -> None:
    """Record the newer `last_updated` a dropped duplicate confirms, for its object, the EVSEs and Connectors
    it carries and its parents (`dedup.confirmations`); another object's only where it is newer than that stored
    object's own, so the state holds what the tree does not. Its parents' own fields it does not confirm
    (`own_updated`): their time is raised by a child's, as an applied child push would raise it."""
    parents = {parent for parent, _ in _parents(event)}
    for ident, evse_uid, connector_id, moment in confirmations(event):
        if ident in parents:
            _raised(state, ident, current, evse_uid, moment)
        elif ident in state.own_updated:
            state.own_updated[ident] = max(state.own_updated[ident], moment)
        if ident != state.last_identity:
            own = ordering.stored_last_updated(current, evse_uid, connector_id)
            if own is not None and moment <= own:
                continue
        _confirm_at(state, ident, moment)
    _confirm_lists(state, event)


def _confirm_at(state: LocationState, key: str, moment: datetime) -> None:
    """`confirmed[key]` raised to `moment` (never lowered)."""
    state.confirmed[key] = ordering.newest(state.confirmed.get(key), moment) or moment


def own_fields_only(event: DecodedEvent) -> bool:
    """Whether the push is a PATCH of the Location's or an EVSE's own fields: one that replaces no list of the tree
    (`dedup.lists_replaced`), so it sets nothing its children's pushes set."""
    return event.operation == "PATCH" and event.level != "CONNECTOR" and not lists_replaced(event)


def _parents(event: DecodedEvent) -> tuple[tuple[str, str | None], ...]:
    """(identity, EVSE uid) of the objects above the push's object, whose `last_updated` it raises (08 §3)."""
    if event.level == "CONNECTOR":
        return (level_identity("EVSE", event.evse_uid), event.evse_uid), (level_identity("LOCATION"), None)
    return ((level_identity("LOCATION"), None),) if event.level == "EVSE" else ()


def _raised(state: LocationState, parent: str, tree: Location | None, evse_uid: str | None,
            moment: datetime) -> None:
    """A child push dated `moment` raises (applied) or confirms (a duplicate) `parent`, the Location or its EVSE
    `evse_uid` in `tree`: the first time it goes beyond the parent's time (its `last_updated` or confirmed time),
    that time is its own fields' (`own_updated`)."""
    if parent in state.own_updated:
        return
    before = ordering.newest(ordering.stored_last_updated(tree, evse_uid), state.confirmed.get(parent))
    if before is not None and moment > before:
        state.own_updated[parent] = before


def _track_own(state: LocationState, previous: Location | None, location: Location, event: DecodedEvent) -> None:
    """Keep `own_updated` for an applied push: its parents' own time, where it raises them; its own object's, where
    that has an entry (dropped once it is the object's time again, which then decides the same); none after a push
    that replaced the object with its children's list. The entries stay as many as the tree's EVSEs and one: an
    EVSE leaves the tree only by a Location PUT or `evses` PATCH, which clears them all."""
    own = state.own_updated
    if event.level == "LOCATION" and lists_replaced(event):  # every object of the tree is as the push dates it
        own.clear()
        return
    moment = event.payload["last_updated"]
    for parent, evse_uid in _parents(event):
        _raised(state, parent, previous, evse_uid, moment)
    ident = identity(event)
    if lists_replaced(event):  # an EVSE PUT or `connectors` PATCH
        own.pop(ident, None)
    elif ident in own:
        time = ordering.stored_last_updated(location, event.evse_uid if event.level == "EVSE" else None)
        full = ordering.newest(time, state.confirmed.get(ident))
        raised = max(own[ident], moment)
        if full is not None and raised < full:
            own[ident] = raised
        else:
            del own[ident]


def _confirm_lists(state: LocationState, event: DecodedEvent) -> None:
    """Record when the push replaced the tree's lists (`dedup.lists_replaced`), applied or a duplicate: an older
    push for an EVSE or Connector they do not list, arriving later, is stale (`handle`), as it is in order."""
    moment = event.payload["last_updated"]
    for key in lists_replaced(event):
        _confirm_at(state, key, moment)


def retry_parked(state: LocationState, run: Run, rules: StageRules, out: StageOutput, arrived_at: datetime) -> None:
    """Give every parked event another try, in arrival order, until none makes progress. One whose wait was over by
    `arrived_at` (the stamp of the push applied, which a push stamped past its deadline may have landed before:
    `StageRules.arrival_margin`) is ORPHANED instead once it waits no more (what it waited for came too late), and
    left parked while it still waits (`expire_parked` or the sweep ends that wait)."""
    progress = True
    with out.retrying_parked():  # a replayed copy parked wrote a PARKED row: its outcome replaces it
        while progress and state.parked:
            progress = False
            pending, state.parked = state.parked, []
            for parked in pending:
                record = parked_record(parked)
                if arrived_at > ordering.park_deadline(parked, rules.park_ttl):
                    if _waits(state, run, record):
                        state.parked.append(parked)
                    else:
                        orphan_expired(state, [parked], rules.park_ttl, out)
                        progress = True
                elif handle(state, run, record, rules, out, retry=True):
                    progress = True
                else:
                    state.parked.append(parked)


def _waits(state: LocationState, run: Run, record: Record) -> bool:
    """Whether the parked `record` still waits for its Location, EVSE or Connector in the stored tree."""
    try:
        ordering.apply_location_event(run.stored.of(state.object_json), record.event)
    except ordering.NeedsObject:
        return True
    except ordering.InvalidMerge:
        return False
    return False


def apply(state: LocationState, record: Record, previous: Location | None, location: Location, document: bytes,
          out: StageOutput) -> None:
    event = record.event
    personal_at = state.personal_at
    if event.level == "LOCATION" and (event.operation == "PUT" or LOCATION_PERSONAL_FIELD in event.payload):
        personal_at = record.received_at
    elif previous is not None:
        personal_at = _personal_at(state, previous, record.received_at)
    _track_own(state, previous, location, event)
    version = projection.next_version(state.version, location.last_updated)
    # The Location's own fields as builtins (its EVSEs are turned into builtins only where they changed).
    tree = wire.builtins(msgspec.structs.replace(location, evses=None))
    evses = location.evses or ()
    # The row carries `personal_at` too, so the ClickHouse sweep dates its `publish_allowed_to` like the state's.
    # One row per Location and batch, its last version (the earlier ones would be superseded by it): the row
    # carries the whole tree, and a batch of status updates of a hub must not write that tree once per update.
    row = projection.location_row(event, tree, document, version, personal_at, evse_count=len(evses))
    out.batch.put("locations", projection.LOCATION_COLUMNS, ("locations", row[0], row[1], row[2]), row)
    # Listed again after an UNLIST (`unlist`), whose rows left every EVSE and Connector: all of them enter again.
    held = previous.evses or () if previous is not None and state.unlisted_at is None else ()
    pairs, gone_evses = _pair_evses(held, evses)
    removed: list[str] = []  # identities (`dedup.level_identity`) of the EVSEs and Connectors left out of the tree
    for evse, before in pairs:
        if before is evse or before == evse:
            continue
        evse_tree = wire.builtins(evse)
        out.batch.add("evses", projection.EVSE_COLUMNS,
                      projection.evse_row(tree, evse_tree, present=True, event_id=event.event_id, version=version))
        if before is None or before.status != evse.status:
            # Its own time: an EVSE PATCH's, not the later time a Connector push raised the EVSE's last_updated to.
            patched = event.level == "EVSE" and ci_equal(evse.uid, event.evse_uid)
            changed_at = event.payload["last_updated"] if patched or _own_time_passed(state, before, evse) else None
            out.batch.add("evse_status_history", projection.EVSE_HISTORY_COLUMNS,
                          projection.evse_history_row(tree, evse_tree, None if before is None else before.status,
                                                      event, version, changed_at=changed_at))
        before_connectors = {ci_normalize(c.id): c for c in before.connectors} if before else {}
        for connector, connector_tree in zip(evse.connectors, evse_tree["connectors"], strict=True):
            if before_connectors.get(ci_normalize(connector.id)) != connector:
                out.batch.add("connectors", projection.CONNECTOR_COLUMNS,
                              projection.connector_row(tree, evse.uid, connector_tree, present=True,
                                                       event_id=event.event_id, version=version))
        present = {ci_normalize(c.id) for c in evse.connectors}
        if before is not None and any(ci_normalize(c.id) not in present for c in before.connectors):
            removed += _missing_connectors(out, tree, evse.uid, wire.builtins(before), present, event.event_id,
                                           version)
    for gone_evse in gone_evses:
        if gone_evse.status != "REMOVED":  # removed as the spec says first (08: status REMOVED), then left out
            # The PUT, or a PATCH of `evses` (which replaces the list): the detail names the one that left it out.
            out.anomaly(Anomaly.EVSE_MISSING_FROM_PUT, event, f"EVSE {gone_evse.uid} is not in the Location "
                        f"{event.operation}", sub=ci_normalize(gone_evse.uid))
        # Its status history ends here, at the push that left it out.
        removed += _leave(out, tree, gone_evse, event, version, event.payload["last_updated"])
    structural = may_add_to_tree(event)  # else nothing enters, leaves or goes back in time
    if state.confirmed and structural:  # two tree walks saved per status update
        held_tree = _tree(previous)
        _drop_passed(state, held_tree)
        _confirm_entered(state, held_tree, location)
    # The push says the tree holds none of them at its last_updated: an older push for one of them, arriving
    # later, is stale (in order it came before and was dropped with them), not the object back in the tree.
    moment = event.payload["last_updated"]
    for ident in removed:
        _confirm_at(state, ident, moment)
    _confirm_lists(state, event)
    # After a push that can remove an object, always (its removals add entries); after a status update, when worth
    # it. Pruning decides nothing: an entry its object's own time passed is dropped before a push can lower that
    # time (`_drop_passed`), whether or not a prune ran since.
    if state.confirmed and (structural or len(state.confirmed) > PRUNE_OVER + 2 * len(location.evses or ())):
        _prune_confirmed(state, location)
    state.personal_at = personal_at
    state.unlisted_at = None  # a push newer than the list that no longer held it, or pulled later (`handle`)
    state.object_json = document
    state.last_identity = identity(event)
    state.last_hash = fingerprint(event)
    state.version = version
    state.applied_event_id = event.event_id
    state.applied_at = ordering.newest(state.applied_at, record.received_at)
    if previous is None:  # its first event (a state from before `created_at` keeps None: not known)
        state.created_at = record.received_at
    remember(state, event.event_id)


def _own_time_passed(state: LocationState, before: EVSE | None, evse: EVSE) -> bool:
    """Whether an EVSE's own `last_updated` cannot date the status change a Location-level push makes: it is older
    than the EVSE we held (the CPO's time for it going back: a re-sent old EVSE that sets a status back), or, for an
    EVSE entering the tree, no later than the last push that replaced the Location's EVSEs (`confirmed`, before this
    push's), which did not hold it (an EVSE leaves only so: one left out and listed again unchanged). Dated by it, the
    change would come before the one it undoes or the row to '' of its leaving; it is dated by the push instead, as a
    leaving is by the push that left it out."""
    if before is not None:
        return evse.last_updated < before.last_updated
    replaced = ordering.newest(*(state.confirmed.get(key) for key in list_keys_over(evse.uid, False)))
    return replaced is not None and evse.last_updated <= replaced


def _tree(location: Location | None) -> dict[str, tuple[datetime, tuple[str, ...]]]:
    """Identity (`dedup.level_identity`) -> (own `last_updated`, the `confirmed` list keys over it) of every EVSE
    and Connector of the tree."""
    tree: dict[str, tuple[datetime, tuple[str, ...]]] = {}
    for evse in (location.evses or ()) if location is not None else ():
        tree[level_identity("EVSE", evse.uid)] = (evse.last_updated, list_keys_over(evse.uid, False))
        for connector in evse.connectors:
            tree[level_identity("CONNECTOR", evse.uid, connector.id)] = (connector.last_updated,
                                                                        list_keys_over(evse.uid, True))
    return tree


# `confirmed` entries beyond two per EVSE (its own, its Connector list's) before a prune runs: pruning drops only
# entries that decide nothing, so when it runs changes no outcome; run on every event it walked the tree each time.
PRUNE_OVER: Final = 16


def may_add_to_tree(event: DecodedEvent) -> bool:
    """Whether the push can bring an EVSE or Connector into the tree: a PUT at any level, a Location PATCH of
    `evses`, an EVSE PATCH of `connectors` (a PATCH of an object not stored is parked, it adds nothing)."""
    return event.operation == "PUT" or bool(lists_replaced(event))


def _drop_passed(state: LocationState, before: dict[str, tuple[datetime, tuple[str, ...]]]) -> None:
    """Drop the `confirmed` entries of the objects of `before` (the tree as a push that can lower their own
    `last_updated` finds it, `_tree`) whose own time reached them: a time confirmed by a duplicate counts as one an
    applied push set, which a newer push's time replaced. Kept, an entry would decide again once the push lists its
    object with an older own time (docs/pipeline.md "stale": compared with that time), or outlive the object's removal;
    dropped or not by a prune since its object's time passed it, it must decide the same (`_prune_confirmed`)."""
    confirmed = state.confirmed
    for ident, (own, _) in before.items():
        moment = confirmed.get(ident)
        if moment is not None and own >= moment:
            del confirmed[ident]


def _confirm_entered(state: LocationState, before: dict[str, tuple[datetime, tuple[str, ...]]],
                     location: Location) -> None:
    """An EVSE or Connector that enters the tree (not in `before`, `_tree`) dated before the last replacement of a
    list over it that did not hold it (a Location PUT listing a new or returning EVSE with its older own
    `last_updated`) keeps that moment: an older push for it was, in order, dropped with that list, so arriving later
    it is stale, before as after the object entered. (It also stands for the entry of its earlier removal, which
    `_prune_confirmed` drops.)"""
    for ident, (own, over) in _tree(location).items():
        if ident in before:
            continue
        replaced = ordering.newest(*(state.confirmed.get(key) for key in over))
        if replaced is not None and replaced > own:
            _confirm_at(state, ident, replaced)


def _prune_confirmed(state: LocationState, location: Location) -> None:
    """Drop the `confirmed` entries that decide nothing: an object's in the tree no newer than its own
    `last_updated` (one kept goes before that time can be lowered, `_drop_passed`), and an object's out of the tree
    (or an absent EVSE's Connector list) no newer than the lists over it, which its pushes are compared with too
    (`handle`). The outcome of every push stays what it was, and the entries stay as many as the tree's objects
    (and lists) with a newer confirmation: a hub whose EVSE uids change would otherwise add an entry per EVSE,
    Connector and Connector list for ever."""
    confirmed = state.confirmed
    tree = _tree(location)
    listed = {key for _, over in tree.values() for key in over}
    for key, moment in list(confirmed.items()):
        over = lists_over_key(key)
        if key in tree:
            drop = tree[key][0] >= moment
        elif key == level_identity("LOCATION"):
            drop = location.last_updated >= moment
        elif key in listed or not over:  # a list of the tree
            drop = False
        else:  # an EVSE's or Connector's out of the tree, or the Connector list of an EVSE out of it
            bound = ordering.newest(*(confirmed.get(k) for k in over))
            drop = bound is not None and bound >= moment
        if drop:
            del confirmed[key]


def _pair_evses(old: Sequence[EVSE], new: Sequence[EVSE]) -> tuple[list[tuple[EVSE, EVSE | None]], list[EVSE]]:
    """Each EVSE of the new tree with its stored version (None: new), and the stored EVSEs the tree lacks.

    EVSE and Connector events change one EVSE in place or append one, so the stored EVSEs are usually where
    they were, with the same uid: paired by position then, unchanged ones are the very same objects. Otherwise
    (a Location PUT or PATCH of `evses`) by uid, ignoring case.
    """
    if len(new) >= len(old) and all(a.uid == b.uid for a, b in zip(old, new, strict=False)):  # new may be longer
        return [(evse, old[i] if i < len(old) else None) for i, evse in enumerate(new)], []
    by_uid = {ci_normalize(e.uid): e for e in old}
    seen = {ci_normalize(e.uid) for e in new}
    return ([(evse, by_uid.get(ci_normalize(evse.uid))) for evse in new],
            [evse for uid, evse in by_uid.items() if uid not in seen])


def _missing_connectors(out: StageOutput, tree: dict[str, Any], evse_uid: str, before: dict[str, Any] | None,
                        present: set[str], event_id: str, version: int) -> list[str]:
    """Connectors an EVSE no longer lists keep their rows, marked not present; returns their identities."""
    missing = []
    for connector in (before or {}).get("connectors") or ():
        if ci_normalize(connector["id"]) not in present:
            out.batch.add("connectors", projection.CONNECTOR_COLUMNS,
                          projection.connector_row(tree, evse_uid, connector, present=False, event_id=event_id,
                                                   version=version))
            missing.append(level_identity("CONNECTOR", evse_uid, connector["id"]))
    return missing
