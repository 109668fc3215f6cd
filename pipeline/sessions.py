"""Stage 1 for Sessions: one object's events, in order, through dedup → ordering/merge → lifecycle.

Plain functions over a state value; the agent supplies the state and writes the result (`pipeline.agents`).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from infra.codec import DecodedEvent
from ocpi.canonical import ci_spec, content_hash
from ocpi.identity import ci_normalize
from ocpi.model import Session
from pipeline import lifecycle, ordering, projection, wire
from pipeline.dedup import fingerprint, identity, is_duplicate
from pipeline.facts import relevant_change, session_fact
from pipeline.lifecycle import Transition
from pipeline.records import Anomaly, Outcome, Record
from pipeline.retention import Pseudonymizer, pseudonymise_fields
from pipeline.stage import (
    PARKED_MAX_BYTES,
    StageOutput,
    StageRules,
    expire_parked,
    foreign_issuer_detail,
    orphan_expired,
    overflowed,
    parked_record,
    parking_full,
    remember,
    replayed_orphan,
    replayed_overflow,
    seen_before,
    to_parked,
)
from pipeline.state import SessionState, TypedView
from pipeline.state_retention import keep_fact_token


def process_sessions(view: TypedView[SessionState], key: str, records: list[Record], rules: StageRules,
                     out: StageOutput) -> None:
    """Fold one Session's records (offset order) into its state."""
    state = view.get(key) or SessionState()
    stored_session = wire.StoredStruct(Session)
    for record in records:
        if record.offset <= state.offset:
            out.read_before(record, state.offset)  # folded in before a crash; its rows are in ClickHouse already
            continue
        state.offset = record.offset
        state.seen_at = ordering.newest(state.seen_at, record.received_at)
        if seen_before(state, record, out):
            continue
        expire_parked(state, record, rules, out)
        check_idle(state, record, rules, out)
        handle(state, stored_session, record, rules, out)
        remember(state, record.event.event_id)
    # Written even when every record was a replay: the state's changelog record may have died with the crash.
    view.set(key, state)


def check_idle(state: SessionState, record: Record, rules: StageRules, out: StageOutput) -> None:
    """An update that ends a gap longer than the idle time flags the gap (the sweep flags it earlier)."""
    if state.applied_at is not None and lifecycle.idle_since(state.status, state.applied_at, record.received_at,
                                                             rules.session_idle):
        out.anomaly(Anomaly.SESSION_IDLE, record.event, idle_detail(state.status, rules),
                    event_id=state.applied_event_id, observed_at=state.applied_at + rules.session_idle)


def idle_detail(status: str | None, rules: StageRules) -> str:
    return f"no update for more than {rules.session_idle} while {status}"


def handle(state: SessionState, stored_session: wire.StoredStruct[Session], record: Record, rules: StageRules,
           out: StageOutput, *, retry: bool = False, parked_token: str | None = None) -> None:
    """Apply one record; a parked one is retried with `retry`, and the fact token the retention pass kept with it
    (`Parked.fact_token`)."""
    event = record.event
    if event.operation == "PATCH" and (replayed_orphan(record, state, rules.park_ttl)
                                       or replayed_overflow(record, state)):
        out.outcomes["REPLAYED_ORPHANED"] += 1  # its ORPHANED row (and source) stands
        return
    if event.operation == "PATCH" and state.object_json is None:
        if parking_full(state.parked, record, rules.park_max):
            out.outcome(record, Outcome.ORPHANED, "too many parked events for this Session")
            out.anomaly(Anomaly.PARK_OVERFLOW, event, f"more than {rules.park_max} events (or {PARKED_MAX_BYTES} "
                        "bytes) wait for the PUT")
            overflowed(state, event.event_id)
        else:
            state.parked.append(to_parked(record))
            out.outcome(record, Outcome.PARKED, "waiting for the Session PUT")
        return
    last_updated = event.payload["last_updated"]
    out.flag_future(record, last_updated, rules)
    if is_duplicate(state.last_identity, state.last_hash, event):
        # No new version; but the CPO confirmed this content at `last_updated` (see ordering: stale).
        state.confirmed = ordering.newest(state.confirmed, last_updated)
        out.outcome(record, Outcome.DUPLICATE)
        return
    stored = ordering.newest(state.last_updated, state.confirmed)
    # A parked event is retried in its original place, right after the PUT it waited for (also when both are
    # replayed copies, a state restored by a replay): not a copy sent again after what followed it.
    if ordering.is_stale(stored, last_updated, replayed_earlier=not retry and ordering.replayed_earlier(
            event, record.received_at, state.applied_at)):
        detail = f"last_updated {last_updated.isoformat()} is older than the stored {stored}"
        out.outcome(record, Outcome.STALE, detail)
        out.anomaly(Anomaly.STALE_UPDATE, event, detail)
        return
    merged: Session | None = None  # a PUT's Session is its payload: no Struct to keep
    if event.operation == "PUT":
        session = event.payload
        document = wire.ocpi_json(session)
    else:
        assert state.object_json is not None
        try:
            merged, document = ordering.merge_session_patch(stored_session, state.object_json, event.payload)
        except ordering.InvalidMerge as exc:
            out.outcome(record, Outcome.INVALID, exc.reason)
            out.anomaly(Anomaly.INVALID_MERGE, event, exc.reason)
            return
        session = wire.builtins(merged)
    if state.object_json is not None and _as_stored(
            stored_session.of(state.object_json), merged or wire.to_struct(session, Session),
            merged is None or state.status in lifecycle.FINAL, out.pseudonym):
        # A Session pushed again as it is: a PATCH of last_updated alone (a CPO's sign of life) or of the values it
        # holds, a PUT of the Session its PATCHes made (a periodic sync), a final Session's status confirmed or its
        # whole object again. No change and no version; like a duplicate (the same content hash, which leaves out
        # `last_updated`: `ocpi.canonical`), it confirms the content at `last_updated`.
        state.confirmed = ordering.newest(state.confirmed, last_updated)
        out.outcome(record, Outcome.DUPLICATE, "the Session as stored, but for last_updated")
        return
    status = session["status"]
    transition = lifecycle.classify(state.status, status)
    if lifecycle.is_anomaly(transition):
        kind = Anomaly.UPDATE_AFTER_FINAL if transition is Transition.UPDATE_AFTER_FINAL else Anomaly.ILLEGAL_TRANSITION
        out.anomaly(kind, event, f"{state.status} -> {status}: {transition.value}")
    if not lifecycle.is_applied(transition):
        out.outcome(record, Outcome.REJECTED, f"{state.status} -> {status} leaves a final state")
        return
    _flag_foreign_token(state, stored_session, session, event, rules, out)
    apply(state, record, session, document, transition, out, parked_token)
    if merged is not None:
        stored_session.keep(document, merged)
    out.outcome(record, Outcome.APPLIED, transition.value)
    if state.parked and not retry:
        # Those whose wait was over by the PUT's stamp waited in vain; a push stamped past their deadline that landed
        # before it left them parked (`StageRules.arrival_margin`).
        pending, expired = ordering.split_expired(state.parked, record.received_at, rules.park_ttl)
        state.parked = []
        orphan_expired(state, expired, rules.park_ttl, out)
        with out.retrying_parked():  # a replayed copy parked wrote a PARKED row: its outcome replaces it
            for parked in pending:
                handle(state, stored_session, parked_record(parked), rules, out, retry=True,
                       parked_token=parked.fact_token)


def _flag_foreign_token(state: SessionState, stored_session: wire.StoredStruct[Session], session: dict[str, Any],
                        event: DecodedEvent, rules: StageRules, out: StageOutput) -> None:
    """A Session of a token none of `OCPI_TOKEN_PARTIES` issued (`StageRules.foreign_issuer`): another eMSP's driver's
    data sent to us, flagged when the Session comes, and again only when an update brings another issuer's token."""
    issuer = rules.foreign_issuer(session["cdr_token"])
    if issuer is None:
        return
    stored = stored_session.of(state.object_json)
    if stored is not None and (ci_normalize(stored.cdr_token.country_code),
                               ci_normalize(stored.cdr_token.party_id)) == issuer:
        return
    out.anomaly(Anomaly.SESSION_OF_ANOTHER_EMSP, event, foreign_issuer_detail(issuer))


def _as_stored(stored: Session | None, incoming: Session, thorough: bool, pseudonym: Pseudonymizer) -> bool:
    """A PATCH to an open Session is compared by value (cheap: every charging update takes this); a PUT, or any push
    to a final Session, also by content hash: CiStrings in any case, a period's dimensions in any order, and the
    personal identifiers as their pseudonyms."""
    return same_but_last_updated(stored, incoming) or (thorough and as_stored(stored, incoming, pseudonym))


def same_but_last_updated(stored: Session | None, incoming: Session) -> bool:
    """Whether `incoming` (a PATCH merged, or a PUT) leaves the stored Session as it was but for `last_updated`
    (field by field, numbers by value: 5 and 5.000 kWh are one amount)."""
    return stored is not None and msgspec.structs.replace(incoming, last_updated=stored.last_updated) == stored


def as_stored(stored: Session | None, incoming: Session, pseudonym: Pseudonymizer) -> bool:
    """Whether `incoming` leaves the stored Session as it is but for `last_updated`: the same content hash, as OCPI
    compares it, CiString values in any case (02 §9, as `ocpi.canonical.cdr_content_hash` for a CDR), and the personal
    identifiers as their pseudonyms: the state retention pass rewrites the stored object's
    (`pipeline.state_retention`), and the same Session pushed again brings them in clear."""
    if stored is None or _differs_plainly(stored, incoming):
        return False
    if content_hash(stored) == content_hash(incoming):
        return True
    return _compared(stored, pseudonym) == _compared(incoming, pseudonym)


def _differs_plainly(stored: Session, incoming: Session) -> bool:
    """A difference no spelling explains (status, kWh by value, the number of periods, `[]` as absent): the answer
    without the four content hashes, for the usual PUT of a charging Session, its kWh grown."""
    return stored.status != incoming.status or stored.kwh != incoming.kwh or \
        len(stored.charging_periods or ()) != len(incoming.charging_periods or ())


_SESSION_CI: Final = ci_spec(Session)


def _compared(session: Session, pseudonym: Pseudonymizer) -> str:
    data: dict[str, Any] = wire.builtins(session)
    pseudonymise_fields(data, pseudonym)
    return content_hash(data, ci=_SESSION_CI)


def apply(state: SessionState, record: Record, session: dict, document: bytes, transition: Transition,
          out: StageOutput, parked_token: str | None = None) -> None:
    event = record.event
    # A parked PATCH is applied when its PUT arrives, after it: the state dates from then, not from its own
    # (earlier) receipt, or the idle clock and `final_at` would start early.
    applied_at = record.received_at if state.applied_at is None else max(state.applied_at, record.received_at)
    version = projection.next_version(state.version, session["last_updated"])
    # One row per Session and batch, its last version (the earlier ones would be superseded by it): the row
    # carries the whole Session, and a backlog of a long session's PATCHes must not write it once per PATCH.
    row = projection.session_row(event, session, document, version, applied_at)
    out.batch.put("sessions", projection.SESSION_COLUMNS, ("sessions", row[0], row[1], row[2]), row)
    if state.status != session["status"]:
        out.batch.add("session_status_history", projection.SESSION_HISTORY_COLUMNS,
                      projection.session_history_row(event, session, state.status, transition.value, version))
    if state.object_json is None:  # its first event (a state from before `created_at` keeps None: not known)
        state.created_at = applied_at
    if session["status"] in lifecycle.FINAL and state.final_at is None:
        state.final_at = applied_at  # leaving a final state is rejected, so this is set once
    fact = keep_fact_token(state.fact, session_fact(session, partner_id=event.partner_id, version=version,
                                                    received_at=applied_at, final_at=state.final_at,
                                                    pseudonym=out.pseudonym), session, parked_token)
    if relevant_change(state.fact, fact):
        out.fact(event, fact)
        state.fact = fact
    state.object_json = document
    state.status = session["status"]
    state.last_updated = session["last_updated"]
    state.last_identity = identity(event)
    state.last_hash = fingerprint(event)
    state.version = version
    state.applied_event_id = event.event_id
    remember(state, event.event_id)
    state.applied_at = applied_at
