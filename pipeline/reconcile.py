"""Reconciliation of Sessions with CDRs, and credit CDR links (stage 2, per CPO party).

Matching (docs/pipeline.md, "reconciliation"): a non-credit CDR is matched to a Session of the same CPO party by the
first of its keys that finds one:
1. SESSION_ID: the session whose id is the CDR's `session_id`;
2. AUTHORIZATION_REFERENCE: the sessions with its `authorization_reference` (the eMSP's reference of the session);
3. TOKEN_LOCATION_START: the sessions with its token (country_code, party_id, uid) and location whose start is
   within OCPI_RECONCILE_TIME_TOLERANCE of the CDR's.
Among several sessions of a key the nearest start wins, sessions no other CDR holds first, then sessions not INVALID
(CDRs of one key choose in order of start, then id). A CDR that names a session waits for that one alone during its
OCPI_RECONCILE_SESSION_GRACE (it usually follows its session closely, and its weaker keys would hand it to another
charge of the same card meanwhile); if the session has not come by then, the CDR falls back to its weaker keys
within the hour after its grace ended (`pipeline.matching`). A CDR may come before its session, or before the
session's last update, so a match by session id is final and any other is provisional: the CDR stays indexed as
waiting under each stronger key it carries, and a session that arrives or changes with such a key takes it over. The
CDR then moves: its row is written again with the new session, method and deltas, and so is the session it left
(back to AWAITING_CDR, MISSING_CDR past its CDR grace, or with its remaining CDRs' totals). A nearer or free session
of the CDR's own key takes it over the same way. So for the same facts every arrival order ends with the same
matches (`pipeline.matching` tells how). This holds within a CDR's OCPI_RECONCILE_SESSION_GRACE: after it the CDR is
settled, its match is no longer moved within its own key, and only a stronger key still takes it (a waiting CDR: its
strongest key), which keeps the state small.
A session may have several CDRs (an original, and a corrected one after a credit); credit CDRs are not matched to
sessions but linked to the CDR they credit (`_link_credit`). A CDR a credit is linked to is cancelled: it leaves
matching (`Matching.withdraw`) and its session's totals, and the session's row is written again; a session left
without a CDR that counts is AWAITING_CDR again (so the CDR grace and the MISSING_CDR sweep apply), or MISSING_CDR
when that grace has passed already. Credited CDRs are left out rather than netted with their credits, so a session's
totals are those of the CDRs that count, whatever the credit's amount (a credit that does not cancel its original in
billing, by cost or energy, is flagged CREDIT_AMOUNT_MISMATCH). Of several credits for one CDR the earliest
received (then the lowest id) is LINKED, in every arrival order; every other one is DUPLICATE_CREDIT (anomaly), and
billing leaves its line out (view `billable_lines`, migration 0016). A credit that names a credit CDR (itself too)
is CREDIT_OF_CREDIT (anomaly), links nothing, and is left out of billing too (0018).

Outcomes (one current row per subject in `reconciliation`, each also published to the reconciliation topic):
- a completed Session: AWAITING_CDR until OCPI_RECONCILE_CDR_GRACE after it completed, then MISSING_CDR (the
  deadline sweep; a row written after that deadline by event time, when the session changes or loses its CDR, is
  MISSING_CDR at once, never AWAITING_CDR again: `_past`), MATCHED while it has a CDR; an INVALID session is
  NOT_BILLABLE, with or without a CDR (a CDR for it is an anomaly; the row still shows what its CDRs bill);
  an open session has no row until it has a CDR, and AWAITING_CDR without a due time if it loses it;
- a CDR: MATCHED, or MISMATCH when a delta exceeds its tolerance; AWAITING_SESSION until
  OCPI_RECONCILE_SESSION_GRACE, then NO_SESSION (at once when it loses its session after that grace: `_past`). A CDR
  without a session is *billed anyway* (the CDR is the billing record; CPOs without a Sessions module,
  reservation-only CDRs, never-pushed home chargers): the outcome only makes it visible. Credit CDRs get
  outcome CREDIT; a CDR a credit cancels, CREDITED (no session).
- A CDR held by an INVALID session is an anomaly (CDR_FOR_INVALID_SESSION, keyed by the CDR), whichever came
  first: the CDR, or the session's move to INVALID.
- Deltas are CDR minus Session: kWh, cost excl. VAT, start and end time (seconds). `late` marks a match made
  after the grace had passed (by event time, so reprocessing gives the same answer): for a CDR, its current
  session was found after its session grace; for a session, its first CDR came after its CDR grace.
- `version` is 2 x the subject's sequence (`next_seq`): the event time of the fact that caused the row, in
  microseconds, and always above the subject's previous one, so it grows with every row of a subject. Event time,
  not a count of rows: after a rebuild the swapped-in rows come from a worker that saw the party's facts in
  another order (so another count), and the live worker's next row, caused by a later fact, must still supersede
  them; and the rebuild's rows of the gap, written while the live worker goes on, must not supersede its newer
  ones. A deadline sweep writes 2 x sequence + 1: above the row it promotes, below the next real change.

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
from ocpi.identity import owner_from_key_part
from pipeline.facts import CdrFact, Fact, SessionFact
from pipeline.matching import Matching, strongest_method
from pipeline.projection import version_of
from pipeline.records import Anomaly, AnomalyRow
from pipeline.state import Codec, Overlay

RECONCILIATION_COLUMNS = (
    "country_code", "party_id", "subject", "subject_id", "partner_id", "currency", "outcome", "method", "session_id",
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
    settled: bool = False  # matched by session id, or its session grace has passed (`pipeline.matching`)
    credited_by: str | None = None  # the credit CDR LINKED to it: it is cancelled, out of matching and totals


class CreditRec(msgspec.Struct, kw_only=True):
    status: str
    seq: int = 0


class Ids(msgspec.Struct):
    ids: list[str]


_SESSIONS: Final = Codec(SessionRec)
_CDRS: Final = Codec(CdrRec)
_CREDITS: Final = Codec(CreditRec)
_IDS: Final = Codec(Ids)


def decode_session(data: bytes) -> SessionRec:
    return _SESSIONS.decode(data)


def decode_cdr(data: bytes) -> CdrRec:
    return _CDRS.decode(data)


@dataclass(frozen=True, slots=True)
class Deltas:
    kwh: Decimal
    cost_excl_vat: Decimal | None
    start_s: Decimal
    end_s: Decimal | None


def deltas(session: SessionFact, cdr: CdrFact) -> Deltas:
    """CDR minus Session; no cost delta when the session gives no cost, or a cost in another currency."""
    cost = (None if session.cost_excl_vat is None or session.currency != cdr.currency
            else cdr.cost_excl_vat - session.cost_excl_vat)
    end = None if session.end is None else _seconds(cdr.end - session.end)
    return Deltas(kwh=cdr.total_energy - session.kwh, cost_excl_vat=cost,
                  start_s=_seconds(cdr.start - session.start), end_s=end)


def _seconds(delta: timedelta) -> Decimal:
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return (Decimal(micros) / 1_000_000).quantize(_MICRO)


def within_tolerance(d: Deltas, rules: Rules) -> bool:
    """A missing session cost or end is not a discrepancy (absent does not mean zero, 09 §4.1)."""
    limit = _seconds(rules.time_tolerance)  # exact: a float's Decimal (0.3 -> 0.29999...) would cut the limit short
    return (abs(d.kwh) <= rules.energy_tolerance
            and (d.cost_excl_vat is None or abs(d.cost_excl_vat) <= rules.cost_tolerance)
            and abs(d.start_s) <= limit and (d.end_s is None or abs(d.end_s) <= limit))


# --- output ---------------------------------------------------------------------------------------------------


@dataclass
class PartyOutput:
    reconciliation: list[list[Any]] = field(default_factory=list)
    credit_links: list[list[Any]] = field(default_factory=list)
    anomalies: list[AnomalyRow] = field(default_factory=list)

    def merge(self, other: PartyOutput) -> None:
        self.reconciliation.extend(other.reconciliation)
        self.credit_links.extend(other.credit_links)
        self.anomalies.extend(other.anomalies)

    @property
    def results(self) -> list[dict[str, Any]]:
        """The reconciliation rows as mappings (the reconciliation topic's records)."""
        return [dict(zip(RECONCILIATION_COLUMNS, row, strict=True)) for row in self.reconciliation]


class PartyState:
    """Stage-2 state of one CPO party over a batch overlay; keys are `<kind>/<CC>/<PID>/<id>`."""

    def __init__(self, party: str, overlay: Overlay) -> None:
        self.party = party
        country_code, party_id = party.split("/", 1)  # `party_key`: a `/` in either part is escaped
        self.country_code, self.party_id = owner_from_key_part(country_code), owner_from_key_part(party_id)
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

    def delete_session(self, session_id: str) -> None:
        self.overlay.set(self._key("S", session_id), None)

    def delete_cdr(self, cdr_id: str) -> None:
        """The CDR's record and, for a credit CDR, its link."""
        self.overlay.set(self._key("C", cdr_id), None)
        self.overlay.set(self._key("L", cdr_id), None)

    def credit(self, cdr_id: str) -> CreditRec | None:
        data = self.overlay.get(self._key("L", cdr_id))
        return None if data is None else _CREDITS.decode(data)

    def put_credit(self, cdr_id: str, rec: CreditRec) -> None:
        self.overlay.set(self._key("L", cdr_id), _CREDITS.encode(rec))

    def fallback_cursor(self) -> int | None:
        """The last hour (`pipeline.matching`) whose named CDRs have been given their fallback."""
        found = self.ids("QC", "")
        return int(found[0]) if found else None

    def set_fallback_cursor(self, hour: int) -> None:
        self.overlay.set(self._key("QC", ""), _IDS.encode(Ids([str(hour)])))

    def ids(self, kind: str, ident: str) -> list[str]:
        data = self.overlay.get(self._key(kind, ident))
        return [] if data is None else _IDS.decode(data).ids

    def add_id(self, kind: str, ident: str, value: str, *, most: int | None = None) -> None:
        """Add `value` to the list; with `most`, only the latest `most` are kept (`matching.INDEX_MOST`)."""
        current = self.ids(kind, ident)
        if value not in current:
            kept = [*current, value]
            self.overlay.set(self._key(kind, ident), _IDS.encode(Ids(kept if most is None else kept[-most:])))

    def drop_ids(self, kind: str, ident: str) -> None:
        self.overlay.set(self._key(kind, ident), None)

    def remove_id(self, kind: str, ident: str, value: str) -> None:
        current = self.ids(kind, ident)
        if value in current:
            rest = [v for v in current if v != value]
            self.overlay.set(self._key(kind, ident), _IDS.encode(Ids(rest)) if rest else None)


_W_CREDIT: Final = "WC"  # index of credit CDRs waiting for the CDR they credit

LINKED: Final = "LINKED"
DUPLICATE_CREDIT: Final = "DUPLICATE_CREDIT"
CREDIT_OF_CREDIT: Final = "CREDIT_OF_CREDIT"  # it names a credit CDR: OCPI credits a CDR, never a credit


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
    work = Matching(state, rules, fact.received_at)
    work.expire_named()
    work.session_arrived(rec, old)
    work.settle()
    _emit_changes(state, work, rules, out)


def on_cdr(state: PartyState, fact: CdrFact, rules: Rules, out: PartyOutput) -> None:
    if state.cdr(fact.cdr_id) is not None:
        return  # seen already (CDRs are immutable; stage 1 drops duplicates and conflicts)
    cdr = CdrRec(fact=fact)
    # Credits that came first, earliest first: the first to link is the one that counts (`_claim`).
    waiting = sorted((c for c in map(state.cdr, state.ids(_W_CREDIT, fact.cdr_id)) if c is not None),
                     key=lambda c: _credit_order(c.fact))
    # Every fact moves the party's event time on, a credit's too: CDRs naming a session that did not come within
    # their grace fall back to their weaker keys (were it a credit, a party whose last fact it is would leave them).
    work = Matching(state, rules, fact.received_at)
    work.expire_named()
    if not fact.credit and not waiting:  # a CDR credited already never takes part in matching: its link writes it
        work.cdr_arrived(cdr)
    work.settle()
    _emit_changes(state, work, rules, out)
    if fact.credit:
        _link_credit(state, cdr, rules, out, fact.received_at)
        _emit_cdr(state, cdr, None, rules, out, fact.received_at)
        state.put_cdr(cdr)
    for credit in waiting:
        _link_credit(state, credit, rules, out, fact.received_at, original=cdr)
    state.overlay.set(state._key(_W_CREDIT, fact.cdr_id), None)


def _emit_changes(state: PartyState, work: Matching, rules: Rules, out: PartyOutput) -> None:
    """One row per subject the fact changed (CDRs, then sessions, each in id order), then the records."""
    for cdr_id in sorted(work.changed_cdrs):
        cdr = work.cdr(cdr_id)
        if cdr is not None:
            session = None if cdr.session_id is None else work.session(cdr.session_id)
            _emit_cdr(state, cdr, None if session is None else session.fact, rules, out, work.now)
    for session_id in sorted(work.changed_sessions):
        session = work.session(session_id)
        if session is not None:
            cdrs = work.cdrs_of(session)
            _emit_session(state, session, cdrs, rules, out, work.now)
            if session.fact.status == "INVALID":
                out.anomalies.extend(_invalid_session_anomaly(state, session.fact, cdr.fact) for cdr in cdrs)
    work.write()


def _invalid_session_anomaly(state: PartyState, session: SessionFact, cdr: CdrFact) -> AnomalyRow:
    """Raised whichever came first, the CDR or the session's move to INVALID, and again on later changes of the
    session: keyed by the CDR and dated when both were known, so every order writes the same row."""
    observed = max(cdr.received_at, session.final_at or session.received_at)
    return cdr_anomaly(state, cdr, Anomaly.CDR_FOR_INVALID_SESSION,
                       f"session {session.session_id} is INVALID (not billable)", observed)


def _emit_session(state: PartyState, rec: SessionRec, cdrs: list[CdrRec], rules: Rules, out: PartyOutput,
                  now: datetime) -> None:
    fact = rec.fact
    due: datetime | None = None
    rec.method = strongest_method([c.method for c in cdrs])
    cdr_kwh = sum((c.fact.total_energy for c in cdrs), Decimal(0)) if cdrs else None
    # Costs in another currency than the session's are not summed with it (the CDR rows say MISMATCH).
    comparable = bool(cdrs) and all(c.fact.currency == fact.currency for c in cdrs)
    cdr_cost = sum((c.fact.cost_excl_vat for c in cdrs), Decimal(0)) if comparable else None
    delta_kwh = None if cdr_kwh is None else cdr_kwh - fact.kwh
    delta_cost = None if cdr_cost is None or fact.cost_excl_vat is None else cdr_cost - fact.cost_excl_vat
    if fact.status == "INVALID":
        # Declared invalid, will not be billed (09 §1): whatever CDRs bill it (their totals are shown), it is no
        # match; such a CDR is the anomaly CDR_FOR_INVALID_SESSION.
        outcome = "NOT_BILLABLE"
    elif cdrs:
        # What its CDRs bill, together, against the session: two CDRs billing one session twice (each MATCHED on
        # its own) leave the session's totals off by a whole charge.
        agree = (comparable and delta_kwh is not None and abs(delta_kwh) <= rules.energy_tolerance
                 and (delta_cost is None or abs(delta_cost) <= rules.cost_tolerance))
        outcome = "MATCHED" if agree else "MISMATCH"
    elif fact.status == "COMPLETED":
        due = (fact.final_at or fact.received_at) + rules.cdr_grace
        # A row written after the deadline (an update of the session, the loss of its CDR) is the sweep's outcome
        # at once: AWAITING_CDR again would undo the MISSING_CDR the sweep wrote until its next run.
        outcome = "MISSING_CDR" if _past(due, now, rec.seq) else "AWAITING_CDR"
    elif rec.seq:
        outcome = "AWAITING_CDR"  # an open session that lost its CDR: its MATCHED row must go; no deadline yet
    else:
        return  # an open session without a CDR is not reconcilable yet
    rec.seq = next_seq(rec.seq, now)
    out.reconciliation.append([
        state.country_code, state.party_id, "SESSION", fact.session_id, fact.partner_id, fact.currency, outcome,
        rec.method, fact.session_id, [c.fact.cdr_id for c in cdrs], fact.kwh, cdr_kwh, delta_kwh,
        fact.cost_excl_vat, cdr_cost, delta_cost, None, None, rec.late, due, fact.received_at, rec.seq * 2,
    ])


def _emit_cdr(state: PartyState, rec: CdrRec, session: SessionFact | None, rules: Rules, out: PartyOutput,
              now: datetime) -> None:
    fact = rec.fact
    due: datetime | None = None
    d: Deltas | None = None
    if fact.credit:
        outcome = "CREDIT"
    elif rec.credited_by is not None:
        outcome = "CREDITED"  # cancelled by a credit CDR: matched to no session (`Matching.withdraw`)
    elif session is None:
        due = fact.received_at + rules.session_grace
        # Left by its session after its grace (the session changed its key): NO_SESSION, as the sweep makes it.
        outcome = "NO_SESSION" if _past(due, now, rec.seq) else "AWAITING_SESSION"
    else:
        d = deltas(session, fact)
        # Amounts in two currencies cannot be compared: a CDR billed in another currency than its session is off.
        same_currency = session.currency == fact.currency
        outcome = "MATCHED" if same_currency and within_tolerance(d, rules) else "MISMATCH"
    rec.seq = next_seq(rec.seq, now)
    out.reconciliation.append([
        state.country_code, state.party_id, "CDR", fact.cdr_id, fact.partner_id, fact.currency, outcome, rec.method,
        rec.session_id if not fact.credit else None, [fact.cdr_id],
        None if session is None else session.kwh, fact.total_energy, None if d is None else d.kwh,
        None if session is None else session.cost_excl_vat, fact.cost_excl_vat,
        None if d is None else d.cost_excl_vat, None if d is None else d.start_s, None if d is None else d.end_s,
        rec.late, due, fact.received_at, rec.seq * 2,
    ])


def _past(deadline: datetime, now: datetime, seq: int) -> bool:
    """Whether a subject's deadline has passed: by the event time of the fact writing its row, or of an earlier row
    of it (`seq`, its event time in microseconds). A party's facts reach stage 2 out of event-time order (their
    stage-1 partitions differ), and a waiting outcome must not come back once its deadline had passed."""
    return now > deadline or seq > version_of(deadline)


def _link_credit(state: PartyState, credit: CdrRec, rules: Rules, out: PartyOutput, now: datetime,
                 original: CdrRec | None = None) -> None:
    """Link a credit CDR to the CDR it credits, or make it wait for it; `now` is the event time of the fact."""
    fact = credit.fact
    ref = fact.credit_reference_id
    if ref is None:
        return  # recorded by stage 1 (CREDIT_WITHOUT_REFERENCE); nothing to link
    if original is None:
        # A credit that names itself names a credit CDR (its record is not stored yet when it first links).
        original = credit if ref == fact.cdr_id else state.cdr(ref)
    link = state.credit(fact.cdr_id) or CreditRec(status="")
    if original is None:
        link.status = "AWAITING_ORIGINAL"
        state.add_id(_W_CREDIT, ref, fact.cdr_id)
        _write_link(state, fact, link, None, rules, out, now)
        return
    due = fact.received_at + rules.session_grace
    if original.fact.received_at > due:
        # It was received after the grace (event time, so in either order of the two): the row the deadline sweep
        # writes for it, whether or not one ran between.
        out.anomalies.append(cdr_anomaly(state, fact, Anomaly.CREDIT_UNKNOWN_REFERENCE,
                                         unknown_reference_detail(ref, rules.session_grace), due))
    if original.fact.credit:
        # Undoing a credit is a new CDR, not a credit of the credit: linked, the first CDR would be refunded twice.
        link.status = CREDIT_OF_CREDIT
        out.anomalies.append(cdr_anomaly(state, fact, Anomaly.CREDIT_OF_CREDIT,
                                         f"{ref} is a credit CDR itself: this credit is not billed", fact.received_at))
        _write_link(state, fact, link, original.fact, rules, out, now)
        return
    if not negates(fact, original.fact):
        out.anomalies.append(cdr_anomaly(
            state, fact, Anomaly.CREDIT_AMOUNT_MISMATCH,
            f"credit of {_amounts(fact)} does not cancel {ref}'s {_amounts(original.fact)}", fact.received_at))
    link.status = _claim(state, original, credit, rules, out, now)
    _write_link(state, fact, link, original.fact, rules, out, now)


def unknown_reference_detail(ref: str, grace: timedelta) -> str:
    """The detail of CREDIT_UNKNOWN_REFERENCE, the same whether the deadline sweep or the late original writes it."""
    return f"credited CDR {ref} did not arrive within {grace}"


def negates(credit: CdrFact, original: CdrFact) -> bool:
    """Whether a credit cancels its original in billing: its total_cost is the original's negated (10 §1.1), in the
    original's currency (billing nets per currency, so an amount in another one cancels nothing), and its energy is
    the original's ("all other data as in the original"; billing counts a credit's energy as -|value|, so a CPO that
    negates it cancels as well). Both values of the Price: billing nets incl. VAT too, so one given on one side only,
    or not negated, leaves a difference billed. A fact written before incl. VAT travelled (UNSET) does not say it:
    compared excl. VAT only. Its home_charging_compensation is the original's too: billing counts each line by its own
    flag (charging or compensation), so a credit with another one moves the amount between the two; a fact written
    before the flag travelled (UNSET) does not say it."""
    if credit.currency != original.currency or credit.cost_excl_vat != -original.cost_excl_vat or \
            abs(credit.total_energy) != original.total_energy:
        return False
    if msgspec.UNSET not in (credit.home_charging_compensation, original.home_charging_compensation) and \
            credit.home_charging_compensation != original.home_charging_compensation:
        return False
    credit_incl, original_incl = credit.cost_incl_vat, original.cost_incl_vat
    if credit_incl is msgspec.UNSET or original_incl is msgspec.UNSET:
        return True
    if credit_incl is None or original_incl is None:
        return credit_incl is original_incl
    return credit_incl == -original_incl


def _amounts(fact: CdrFact) -> str:
    incl = fact.cost_incl_vat
    return f"{fact.cost_excl_vat} {fact.currency}" + ("" if incl is None or incl is msgspec.UNSET else
                                                       f" ({incl} incl. VAT)") + f", {fact.total_energy} kWh" + (
        ", home charging compensation" if fact.home_charging_compensation is True else "")


def _credit_order(fact: CdrFact) -> tuple[datetime, str]:
    return fact.received_at, fact.cdr_id


def _claim(state: PartyState, original: CdrRec, credit: CdrRec, rules: Rules, out: PartyOutput,
           now: datetime) -> str:
    """LINKED if `credit` is the credit that counts for `original`, else DUPLICATE_CREDIT.

    The earliest credit (received, then id) counts, whatever the arrival order: a later one is a duplicate, and an
    earlier one that arrives after takes the link over from the one it displaces. So every order ends with the same
    links, and every credit but the earliest gets one DUPLICATE_CREDIT anomaly (at its arrival or its demotion).
    """
    holder_id = original.credited_by
    if holder_id is None:  # the first credit: the original is cancelled
        work = Matching(state, rules, now)
        work.withdraw(original, credit.fact.cdr_id)
        work.settle()
        _emit_changes(state, work, rules, out)
        return LINKED
    if holder_id == credit.fact.cdr_id:
        return LINKED
    holder = state.cdr(holder_id)
    if holder is not None and _credit_order(credit.fact) < _credit_order(holder.fact):
        original.credited_by = credit.fact.cdr_id
        state.put_cdr(original)
        link = state.credit(holder_id) or CreditRec(status="")
        link.status = DUPLICATE_CREDIT
        out.anomalies.append(_duplicate_anomaly(state, holder.fact))
        _write_link(state, holder.fact, link, original.fact, rules, out, now)
        return LINKED
    out.anomalies.append(_duplicate_anomaly(state, credit.fact))
    return DUPLICATE_CREDIT


def _duplicate_anomaly(state: PartyState, credit: CdrFact) -> AnomalyRow:
    return cdr_anomaly(state, credit, Anomaly.DUPLICATE_CREDIT,
                       f"{credit.credit_reference_id} is credited by an earlier credit CDR already: this one is not "
                       "billed", credit.received_at)


def _write_link(state: PartyState, fact: CdrFact, link: CreditRec, original: CdrFact | None, rules: Rules,
                out: PartyOutput, now: datetime) -> None:
    link.seq = next_seq(link.seq, now)
    state.put_credit(fact.cdr_id, link)
    # A link written without its original (AWAITING_ORIGINAL) is one below the version a resolved row of the same
    # event time has: a state that lacks the original (restored from the raw window only, the original older) must
    # not replace the LINKED or DUPLICATE_CREDIT row a state that knew it wrote (a duplicate billed again). Every
    # later row of the link is still above it (next_seq), and so is the sweep's UNKNOWN_REFERENCE (version + 1).
    credited_cost = None if original is None else original.cost_excl_vat
    matches = None if original is None else negates(fact, original)
    out.credit_links.append([
        state.country_code, state.party_id, fact.cdr_id, fact.credit_reference_id, fact.partner_id, link.status,
        fact.cost_excl_vat, credited_cost, matches, fact.received_at, fact.received_at + rules.session_grace,
        link.seq * 2 - (1 if original is None else 0),
    ])


def next_seq(previous: int, now: datetime) -> int:
    """A subject's next row sequence (its `version` / 2): the fact's event time in microseconds, above `previous`."""
    return max(previous + 1, version_of(now))


def cdr_anomaly(state: PartyState, fact: CdrFact, kind: Anomaly, detail: str, observed_at: datetime) -> AnomalyRow:
    """An anomaly about a CDR found in stage 2 (keyed by the CDR id: stage 2 does not see raw event ids)."""
    return AnomalyRow(kind=kind, module="CDRS", country_code=state.country_code, party_id=state.party_id,
                      object_id=fact.cdr_id, sub_id="", event_id=fact.cdr_id, partner_id=fact.partner_id,
                      detail=detail, observed_at=observed_at)


def unindex_credit(state: PartyState, credit: CdrFact) -> None:
    """Drop a credit CDR from the credits waiting for their original (its record is being deleted)."""
    if credit.credit and credit.credit_reference_id:
        state.remove_id(_W_CREDIT, credit.credit_reference_id, credit.cdr_id)
