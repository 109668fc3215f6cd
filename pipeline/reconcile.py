"""Reconciliation of Sessions with CDRs, and credit CDR links (stage 2, per CPO party).

Matching (README, "Reconciliation"): a CDR is matched to a Session of the same CPO party by the strongest key it
carries, and only by that one:
1. its `session_id` = the Session's id; else, when it has none,
2. its `authorization_reference` (the eMSP's reference of the session); else
3. token (country_code, party_id, uid) + location id + start time within OCPI_RECONCILE_TIME_TOLERANCE.
One key per CDR makes the result independent of the order in which CDRs and sessions arrive (a CDR may come
before its session's last update, or before the session at all): a CDR that names a session is never given to
another one because that one happened to arrive first with a weaker match. A waiting CDR is indexed under its
key, and the session that arrives with that key takes it; among several candidates the one without a CDR and
with the nearest start wins. A match is final. A session may have several CDRs (an original, and a corrected one
after a credit); credit CDRs are not matched to sessions but linked to the CDR they credit.

Outcomes (one current row per subject in `reconciliation`, each also published to the reconciliation topic):
- a completed Session: AWAITING_CDR until OCPI_RECONCILE_CDR_GRACE after it completed, then MISSING_CDR (the
  deadline sweep), MATCHED once a CDR arrives; an INVALID session is NOT_BILLABLE (a CDR for it is an anomaly);
- a CDR: MATCHED, or MISMATCH when a delta exceeds its tolerance; AWAITING_SESSION until
  OCPI_RECONCILE_SESSION_GRACE, then NO_SESSION. A CDR without a session is *billed anyway* (the CDR is the
  billing record; CPOs without a Sessions module, reservation-only CDRs, never-pushed home chargers): the
  outcome only makes it visible. Credit CDRs get outcome CREDIT.
- Deltas are CDR minus Session: kWh, cost excl. VAT, start and end time (seconds). `late` marks a match made
  after the grace had passed (by event time, so reprocessing gives the same answer).

Every state change is deterministic in the facts' order per party; facts repeated by reprocessing carry a
version (sessions) or an id already seen (CDRs) and change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import msgspec

from infra.settings import PipelineSettings
from pipeline.facts import CdrFact, Fact, SessionFact
from pipeline.records import Anomaly, AnomalyRow
from pipeline.state import Codec, Overlay

SESSION_ID: Final = "SESSION_ID"
AUTHORIZATION_REFERENCE: Final = "AUTHORIZATION_REFERENCE"
TOKEN_LOCATION_START: Final = "TOKEN_LOCATION_START"  # noqa: S105 - a method name, not a secret

RECONCILIATION_COLUMNS = (
    "country_code", "party_id", "subject", "subject_id", "partner_id", "outcome", "method", "session_id",
    "cdr_ids", "session_kwh", "cdr_kwh", "delta_kwh", "session_cost_excl_vat", "cdr_cost_excl_vat",
    "delta_cost_excl_vat", "delta_start_s", "delta_end_s", "late", "due_at", "event_time", "version",
)
CREDIT_LINK_COLUMNS = (
    "country_code", "party_id", "credit_cdr_id", "credited_cdr_id", "partner_id", "status", "credit_cost_excl_vat",
    "credited_cost_excl_vat", "amount_matches", "received_at", "due_at", "version",
)

_MICRO: Final = Decimal("0.000001")


@dataclass(frozen=True)
class Rules:
    cdr_grace: timedelta
    session_grace: timedelta
    energy_tolerance: Decimal
    cost_tolerance: Decimal
    time_tolerance: timedelta

    @classmethod
    def from_settings(cls, pipeline: PipelineSettings) -> Rules:
        return cls(cdr_grace=timedelta(seconds=pipeline.cdr_grace_s),
                   session_grace=timedelta(seconds=pipeline.session_grace_s),
                   energy_tolerance=pipeline.energy_tolerance, cost_tolerance=pipeline.cost_tolerance,
                   time_tolerance=timedelta(seconds=pipeline.time_tolerance_s))


# --- state ----------------------------------------------------------------------------------------------------


class SessionRec(msgspec.Struct, kw_only=True):
    fact: SessionFact
    cdr_ids: list[str] = []
    method: str = ""
    late: bool = False
    seq: int = 0


class CdrRec(msgspec.Struct, kw_only=True):
    fact: CdrFact
    session_id: str | None = None
    method: str = ""
    late: bool = False
    seq: int = 0


class CreditRec(msgspec.Struct, kw_only=True):
    status: str
    seq: int = 0


class Ids(msgspec.Struct):
    ids: list[str]


_SESSIONS: Final = Codec(SessionRec)
_CDRS: Final = Codec(CdrRec)
_CREDITS: Final = Codec(CreditRec)
_IDS: Final = Codec(Ids)


@dataclass(frozen=True, slots=True)
class Deltas:
    kwh: Decimal
    cost_excl_vat: Decimal | None
    start_s: Decimal
    end_s: Decimal | None


def deltas(session: SessionFact, cdr: CdrFact) -> Deltas:
    """CDR minus Session."""
    cost = None if session.cost_excl_vat is None else cdr.cost_excl_vat - session.cost_excl_vat
    end = None if session.end is None else _seconds(cdr.end - session.end)
    return Deltas(kwh=cdr.total_energy - session.kwh, cost_excl_vat=cost,
                  start_s=_seconds(cdr.start - session.start), end_s=end)


def _seconds(delta: timedelta) -> Decimal:
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return (Decimal(micros) / 1_000_000).quantize(_MICRO)


def within_tolerance(d: Deltas, rules: Rules) -> bool:
    """A missing session cost or end is not a discrepancy (absent does not mean zero, 09 §4.1)."""
    limit = Decimal(rules.time_tolerance.total_seconds())
    return (abs(d.kwh) <= rules.energy_tolerance
            and (d.cost_excl_vat is None or abs(d.cost_excl_vat) <= rules.cost_tolerance)
            and abs(d.start_s) <= limit and (d.end_s is None or abs(d.end_s) <= limit))


# --- output ---------------------------------------------------------------------------------------------------


@dataclass
class PartyOutput:
    reconciliation: list[list[Any]] = field(default_factory=list)
    credit_links: list[list[Any]] = field(default_factory=list)
    anomalies: list[AnomalyRow] = field(default_factory=list)

    @property
    def results(self) -> list[dict[str, Any]]:
        """The reconciliation rows as mappings (the reconciliation topic's records)."""
        return [dict(zip(RECONCILIATION_COLUMNS, row, strict=True)) for row in self.reconciliation]


class PartyState:
    """Stage-2 state of one CPO party over a batch overlay; keys are `<kind>/<CC>/<PID>/<id>`."""

    def __init__(self, party: str, overlay: Overlay) -> None:
        self.party = party
        self.country_code, self.party_id = party.split("/", 1)
        self.overlay = overlay

    def _key(self, kind: str, ident: str) -> str:
        return f"{kind}/{self.party}/{ident}"

    def session(self, session_id: str) -> SessionRec | None:
        data = self.overlay.get(self._key("S", session_id))
        return None if data is None else _SESSIONS.decode(data)

    def put_session(self, rec: SessionRec) -> None:
        self.overlay.set(self._key("S", rec.fact.session_id), _SESSIONS.encode(rec))

    def cdr(self, cdr_id: str) -> CdrRec | None:
        data = self.overlay.get(self._key("C", cdr_id))
        return None if data is None else _CDRS.decode(data)

    def put_cdr(self, rec: CdrRec) -> None:
        self.overlay.set(self._key("C", rec.fact.cdr_id), _CDRS.encode(rec))

    def credit(self, cdr_id: str) -> CreditRec | None:
        data = self.overlay.get(self._key("L", cdr_id))
        return None if data is None else _CREDITS.decode(data)

    def put_credit(self, cdr_id: str, rec: CreditRec) -> None:
        self.overlay.set(self._key("L", cdr_id), _CREDITS.encode(rec))

    def ids(self, kind: str, ident: str) -> list[str]:
        data = self.overlay.get(self._key(kind, ident))
        return [] if data is None else _IDS.decode(data).ids

    def add_id(self, kind: str, ident: str, value: str) -> None:
        current = self.ids(kind, ident)
        if value not in current:
            self.overlay.set(self._key(kind, ident), _IDS.encode(Ids([*current, value])))

    def remove_id(self, kind: str, ident: str, value: str) -> None:
        current = self.ids(kind, ident)
        if value in current:
            rest = [v for v in current if v != value]
            self.overlay.set(self._key(kind, ident), _IDS.encode(Ids(rest)) if rest else None)


# Index kinds: sessions by authorization reference / token+location; CDRs waiting for a session by
# session id / authorization reference / token+location; credit CDRs waiting for the CDR they credit.
_S_BY_REF, _S_BY_TOKEN = "IA", "IT"
_W_BY_ID, _W_BY_REF, _W_BY_TOKEN = "WS", "WA", "WT"
_W_CREDIT = "WC"


def _token_key(token: str, location_id: str) -> str:
    return f"{token}/{location_id}"


# --- processing -----------------------------------------------------------------------------------------------


def process_party(state: PartyState, facts: list[Fact], rules: Rules, out: PartyOutput) -> None:
    for fact in facts:
        if isinstance(fact, SessionFact):
            on_session(state, fact, rules, out)
        else:
            on_cdr(state, fact, rules, out)


def on_session(state: PartyState, fact: SessionFact, rules: Rules, out: PartyOutput) -> None:
    rec = state.session(fact.session_id)
    if rec is not None and fact.version <= rec.fact.version:
        return  # seen already (reprocessing)
    old = rec.fact if rec is not None else None
    rec = rec or SessionRec(fact=fact)
    rec.fact = fact
    _reindex_session(state, old, fact)
    for cdr_id in rec.cdr_ids:  # already matched: its deltas follow the session's latest state
        cdr = state.cdr(cdr_id)
        if cdr is not None:
            _emit_cdr(state, cdr, fact, rules, out)
            state.put_cdr(cdr)
    for cdr, method in _waiting_cdrs(state, fact, rules):
        _attach(state, rec, cdr, method, rules, out, arrived=fact.received_at, waited_since=cdr.fact.received_at,
                grace=rules.session_grace)
    _emit_session(state, rec, rules, out)
    state.put_session(rec)


def on_cdr(state: PartyState, fact: CdrFact, rules: Rules, out: PartyOutput) -> None:
    if state.cdr(fact.cdr_id) is not None:
        return  # seen already (CDRs are immutable; stage 1 drops duplicates and conflicts)
    cdr = CdrRec(fact=fact)
    if fact.credit:
        _link_credit(state, cdr, rules, out)
        _emit_cdr(state, cdr, None, rules, out)
        state.put_cdr(cdr)
        return
    found = _find_session(state, fact, rules)
    if found is None:
        _wait_for_session(state, fact)
        _emit_cdr(state, cdr, None, rules, out)
        state.put_cdr(cdr)
    else:
        session, method = found
        deadline = session.fact.final_at + rules.cdr_grace if session.fact.final_at else None
        _attach(state, session, cdr, method, rules, out, arrived=fact.received_at, waited_since=None,
                grace=None, session_deadline=deadline)
        _emit_session(state, session, rules, out)
        state.put_session(session)
    for credit_id in state.ids(_W_CREDIT, fact.cdr_id):  # credits that came first
        credit = state.cdr(credit_id)
        if credit is not None:
            _link_credit(state, credit, rules, out, original=cdr)
    state.overlay.set(state._key(_W_CREDIT, fact.cdr_id), None)


def _reindex_session(state: PartyState, old: SessionFact | None, new: SessionFact) -> None:
    sid = new.session_id
    if old is None or old.authorization_reference != new.authorization_reference:
        if old is not None and old.authorization_reference:
            state.remove_id(_S_BY_REF, old.authorization_reference, sid)
        if new.authorization_reference:
            state.add_id(_S_BY_REF, new.authorization_reference, sid)
    if old is None or (old.token, old.location_id) != (new.token, new.location_id):
        if old is not None:
            state.remove_id(_S_BY_TOKEN, _token_key(old.token, old.location_id), sid)
        state.add_id(_S_BY_TOKEN, _token_key(new.token, new.location_id), sid)


def _closest(state: PartyState, session_ids: list[str], start: datetime, limit: timedelta | None,
             ) -> SessionRec | None:
    """The candidate session with the nearest start (unmatched ones first), within `limit` if given."""
    best: tuple[tuple[bool, timedelta, str], SessionRec] | None = None
    for sid in session_ids:
        rec = state.session(sid)
        if rec is None:
            continue
        gap = abs(rec.fact.start - start)
        if limit is not None and gap > limit:
            continue
        rank = (bool(rec.cdr_ids), gap, sid)
        if best is None or rank < best[0]:
            best = (rank, rec)
    return None if best is None else best[1]


def match_key(fact: CdrFact) -> tuple[str, str, str]:
    """(waiting-index kind, key value, method) of the one key a CDR is matched by."""
    if fact.session_id:
        return _W_BY_ID, fact.session_id, SESSION_ID
    if fact.authorization_reference:
        return _W_BY_REF, fact.authorization_reference, AUTHORIZATION_REFERENCE
    return _W_BY_TOKEN, _token_key(fact.token, fact.location_id), TOKEN_LOCATION_START


def _find_session(state: PartyState, fact: CdrFact, rules: Rules) -> tuple[SessionRec, str] | None:
    kind, key, method = match_key(fact)
    if kind == _W_BY_ID:
        rec = state.session(key)
    elif kind == _W_BY_REF:
        rec = _closest(state, state.ids(_S_BY_REF, key), fact.start, None)
    else:
        rec = _closest(state, state.ids(_S_BY_TOKEN, key), fact.start, rules.time_tolerance)
    return None if rec is None else (rec, method)


def _wait_for_session(state: PartyState, fact: CdrFact) -> None:
    kind, key, _method = match_key(fact)
    state.add_id(kind, key, fact.cdr_id)


def _stop_waiting(state: PartyState, fact: CdrFact) -> None:
    kind, key, _method = match_key(fact)
    state.remove_id(kind, key, fact.cdr_id)


def _waiting_cdrs(state: PartyState, session: SessionFact, rules: Rules) -> list[tuple[CdrRec, str]]:
    """Waiting CDRs whose key this session has (each CDR waits under its one key)."""
    found: dict[str, tuple[CdrRec, str]] = {}

    def take(ids: list[str], method: str, check_time: bool) -> None:
        for cdr_id in ids:
            if cdr_id in found:
                continue
            cdr = state.cdr(cdr_id)
            if cdr is None or cdr.session_id is not None:
                continue
            if check_time and abs(cdr.fact.start - session.start) > rules.time_tolerance:
                continue
            found[cdr_id] = (cdr, method)

    take(state.ids(_W_BY_ID, session.session_id), SESSION_ID, False)
    if session.authorization_reference:
        take(state.ids(_W_BY_REF, session.authorization_reference), AUTHORIZATION_REFERENCE, False)
    take(state.ids(_W_BY_TOKEN, _token_key(session.token, session.location_id)), TOKEN_LOCATION_START, True)
    return sorted(found.values(), key=lambda item: item[0].fact.cdr_id)


def _attach(state: PartyState, session: SessionRec, cdr: CdrRec, method: str, rules: Rules, out: PartyOutput,
            *, arrived: datetime, waited_since: datetime | None, grace: timedelta | None,
            session_deadline: datetime | None = None) -> None:
    cdr.session_id = session.fact.session_id
    cdr.method = method
    if waited_since is not None and grace is not None:
        cdr.late = arrived > waited_since + grace  # the session came after the CDR's grace
    _stop_waiting(state, cdr.fact)
    if cdr.fact.cdr_id not in session.cdr_ids:
        session.cdr_ids.append(cdr.fact.cdr_id)
    if not session.method:
        session.method = method
        if session_deadline is not None:
            session.late = arrived > session_deadline  # the CDR came after the session's grace
    if session.fact.status == "INVALID":
        out.anomalies.append(cdr_anomaly(state, cdr.fact, Anomaly.CDR_FOR_INVALID_SESSION,
                                         f"session {session.fact.session_id} is INVALID (not billable)", arrived))
    _emit_cdr(state, cdr, session.fact, rules, out)
    state.put_cdr(cdr)


def _emit_session(state: PartyState, rec: SessionRec, rules: Rules, out: PartyOutput) -> None:
    fact = rec.fact
    due: datetime | None = None
    if rec.cdr_ids:
        outcome = "MATCHED"
    elif fact.status == "INVALID":
        outcome = "NOT_BILLABLE"
    elif fact.status == "COMPLETED":
        outcome = "AWAITING_CDR"
        due = (fact.final_at or fact.received_at) + rules.cdr_grace
    else:
        return  # an open session without a CDR is not reconcilable yet
    cdr_kwh, cdr_cost = _cdr_totals(state, rec.cdr_ids)
    rec.seq += 1
    out.reconciliation.append([
        state.country_code, state.party_id, "SESSION", fact.session_id, fact.partner_id, outcome, rec.method,
        fact.session_id, list(rec.cdr_ids), fact.kwh, cdr_kwh,
        None if cdr_kwh is None else cdr_kwh - fact.kwh, fact.cost_excl_vat, cdr_cost,
        None if cdr_cost is None or fact.cost_excl_vat is None else cdr_cost - fact.cost_excl_vat,
        None, None, rec.late, due, fact.received_at, rec.seq * 2,
    ])


def _cdr_totals(state: PartyState, cdr_ids: list[str]) -> tuple[Decimal | None, Decimal | None]:
    if not cdr_ids:
        return None, None
    kwh, cost = Decimal(0), Decimal(0)
    for cdr_id in cdr_ids:
        cdr = state.cdr(cdr_id)
        if cdr is not None:
            kwh += cdr.fact.total_energy
            cost += cdr.fact.cost_excl_vat
    return kwh, cost


def _emit_cdr(state: PartyState, rec: CdrRec, session: SessionFact | None, rules: Rules, out: PartyOutput) -> None:
    fact = rec.fact
    due: datetime | None = None
    d: Deltas | None = None
    if fact.credit:
        outcome = "CREDIT"
    elif session is None:
        outcome = "AWAITING_SESSION"
        due = fact.received_at + rules.session_grace
    else:
        d = deltas(session, fact)
        outcome = "MATCHED" if within_tolerance(d, rules) else "MISMATCH"
    rec.seq += 1
    out.reconciliation.append([
        state.country_code, state.party_id, "CDR", fact.cdr_id, fact.partner_id, outcome, rec.method,
        rec.session_id if not fact.credit else None, [fact.cdr_id],
        None if session is None else session.kwh, fact.total_energy, None if d is None else d.kwh,
        None if session is None else session.cost_excl_vat, fact.cost_excl_vat,
        None if d is None else d.cost_excl_vat, None if d is None else d.start_s, None if d is None else d.end_s,
        rec.late, due, fact.received_at, rec.seq * 2,
    ])


def _link_credit(state: PartyState, credit: CdrRec, rules: Rules, out: PartyOutput,
                 original: CdrRec | None = None) -> None:
    fact = credit.fact
    ref = fact.credit_reference_id
    if ref is None:
        return  # recorded by stage 1 (CREDIT_WITHOUT_REFERENCE); nothing to link
    if original is None:
        original = state.cdr(ref)
    link = state.credit(fact.cdr_id) or CreditRec(status="")
    link.seq += 1
    if original is None:
        link.status = "AWAITING_ORIGINAL"
        state.add_id(_W_CREDIT, ref, fact.cdr_id)
        credited_cost, matches = None, None
    else:
        link.status = "LINKED"
        credited_cost = original.fact.cost_excl_vat
        matches = fact.cost_excl_vat == -credited_cost
        if not matches:
            out.anomalies.append(cdr_anomaly(
                state, fact, Anomaly.CREDIT_AMOUNT_MISMATCH,
                f"credit total_cost {fact.cost_excl_vat} does not negate {ref}'s {credited_cost}", fact.received_at))
    state.put_credit(fact.cdr_id, link)
    out.credit_links.append([
        state.country_code, state.party_id, fact.cdr_id, ref, fact.partner_id, link.status, fact.cost_excl_vat,
        credited_cost, matches, fact.received_at, fact.received_at + rules.session_grace, link.seq * 2,
    ])


def cdr_anomaly(state: PartyState, fact: CdrFact, kind: Anomaly, detail: str, observed_at: datetime) -> AnomalyRow:
    """An anomaly about a CDR found in stage 2 (keyed by the CDR id: stage 2 does not see raw event ids)."""
    return AnomalyRow(kind=kind, module="CDRS", country_code=state.country_code, party_id=state.party_id,
                      object_id=fact.cdr_id, sub_id="", event_id=fact.cdr_id, partner_id=fact.partner_id,
                      detail=detail, observed_at=observed_at)
