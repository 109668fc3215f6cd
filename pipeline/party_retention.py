"""Billing retention in the stage-2 state (`party-state`): sessions, CDRs and credit links past
OCPI_RETENTION_BILLING_YEARS are deleted with the id lists' entries that point at them.

The records refer to each other (`pipeline.reconcile`): a session lists its CDRs, a CDR names its session and the
credit that cancelled it, a credit names the CDR it credits. Deleting one alone would change what stage 2
computes for the others that stay (a session's totals, a late credit's link), so records leave by *component*:
the records reachable from one over those references, both ways, all of which must have been received (the event
time of their latest fact, the `event_time` or `received_at` of their ClickHouse rows, whose TTL counts from it)
before `retention.billing_cutoff`. One record received since keeps its whole component. A record a reference
names but that is gone (deleted earlier, or never came) does not hold a component back.

Only one reference is stored one way: a CDR does not list the credits that name it besides the one linked to it
(a DUPLICATE_CREDIT, a CREDIT_OF_CREDIT). So a pass first surveys the partition's credit links (`L/`, one per
credit that names a CDR: few) into `Referrers`, and a component follows those too. A credit that arrives between
the survey and the decision on its original (naming a CDR received years ago, within the seconds of an hourly
pass) is not followed: the original may leave while that credit keeps the link it was given, which bills it as
it would bill a credit whose original never came (negative on its own).

With each record its index entries go (`matching.unindex_session`, `unindex_cdr`, `reconcile.unindex_credit`):
the sessions by authorization reference and by token, location and hour, the CDRs waiting by session id,
reference and token, the credits waiting for their original, and the fallback queue, computed with the current
OCPI_RECONCILE_TIME_TOLERANCE and OCPI_RECONCILE_SESSION_GRACE. An entry listed under a value either had before a
change of those settings stays in its list; every reader skips an id whose record is gone, so it changes nothing.
The fallback cursor (`QC`) and the lists that stay non-empty stay.

After expiry a fact for a deleted record is handled as a first one: a CDR naming an expired session waits for it
and ends NO_SESSION, a credit for an expired CDR AWAITING_ORIGINAL then UNKNOWN_REFERENCE; their originals' rows
are gone from ClickHouse by then too. Idempotent: a deleted record is not listed again, and a kept one is decided
the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pipeline.matching import unindex_cdr, unindex_session
from pipeline.reconcile import CdrRec, PartyState, Rules, SessionRec, decode_cdr, decode_session, unindex_credit
from pipeline.state import Overlay, Reader

Record = SessionRec | CdrRec
_KINDS = ("S", "C")  # the records a component is found from; id lists and links follow them
Referrers = dict[str, list[str]]  # "<CC>/<PID>/<cdr id>" → the credit CDRs that name it


def survey_referrers(entries: Iterable[tuple[bytes, bytes]], read: Reader, found: Referrers) -> None:
    """Add to `found` the credits of `entries`' credit links, under the CDR each names (read from its record)."""
    for raw_key, _ in entries:
        if not raw_key.startswith(b"L/"):
            continue
        _, party, credit_id = _split(raw_key.decode())
        credit = PartyState(party, Overlay(read)).cdr(credit_id)
        if credit is not None and credit.fact.credit_reference_id:
            found.setdefault(f"{party}/{credit.fact.credit_reference_id}", []).append(credit_id)


def expire_party_state(entries: Iterable[tuple[bytes, bytes]], read: Reader, cutoff: datetime, referrers: Referrers,
                       rules: Rules) -> tuple[dict[str, bytes | None], int]:
    """The changes (None: delete) that remove every component of `entries`' sessions and CDRs received entirely
    before `cutoff`, and the number of session and CDR records deleted.

    `entries` are (key, value) of a snapshot and only pick candidates: each record is read again through `read`
    (the table as it is now), so a record changed since the snapshot is decided on its current value.
    `referrers`: the partition's survey (`survey_referrers`).
    """
    overlay = Overlay(read)
    deleted = 0
    for raw_key, snapshot in entries:
        kind, party, ident = _split(raw_key.decode())
        if kind not in _KINDS or _received(kind, snapshot) >= cutoff:
            continue
        state = PartyState(party, overlay)
        component = _component(state, kind, ident, cutoff, referrers)
        for rec in component or ():
            _delete(state, rec, rules)
        deleted += len(component or ())
    return overlay.changes, deleted


def _split(key: str) -> tuple[str, str, str]:
    """`<kind>/<CC>/<PID>/<id>` → (kind, "CC/PID", id); ids may hold `/`."""
    parts = key.split("/", 3)
    if len(parts) < 4:
        return "", "", ""  # not a record key (`PartyState._key`): never a candidate
    kind, country_code, party_id, ident = parts
    return kind, f"{country_code}/{party_id}", ident


def _received(kind: str, value: bytes) -> datetime:
    return decode_session(value).fact.received_at if kind == "S" else decode_cdr(value).fact.received_at


def _component(state: PartyState, kind: str, ident: str, cutoff: datetime, referrers: Referrers,
               ) -> list[Record] | None:
    """The records reachable from one, or None when any of them was received at or after `cutoff`."""
    found: list[Record] = []
    seen: set[tuple[str, str]] = set()
    todo = [(kind, ident)]
    while todo:
        step = todo.pop()
        if step in seen:
            continue
        seen.add(step)
        rec: Record | None = state.session(step[1]) if step[0] == "S" else state.cdr(step[1])
        if rec is None:
            continue  # gone already, or never came
        if rec.fact.received_at >= cutoff:
            return None
        found.append(rec)
        if isinstance(rec, SessionRec):
            todo.extend(("C", cdr_id) for cdr_id in rec.cdr_ids)
            continue
        if rec.session_id is not None:
            todo.append(("S", rec.session_id))
        if rec.credited_by is not None:
            todo.append(("C", rec.credited_by))
        if rec.fact.credit and rec.fact.credit_reference_id:
            todo.append(("C", rec.fact.credit_reference_id))
        todo.extend(("C", credit_id) for credit_id in referrers.get(f"{state.party}/{step[1]}", ()))
    return found


def _delete(state: PartyState, rec: Record, rules: Rules) -> None:
    if isinstance(rec, SessionRec):
        unindex_session(state, rec.fact, rules)
        state.delete_session(rec.fact.session_id)
    else:
        unindex_cdr(state, rec.fact, rules)
        unindex_credit(state, rec.fact)
        state.delete_cdr(rec.fact.cdr_id)
