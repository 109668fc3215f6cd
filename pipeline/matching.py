"""Which Session a CDR belongs to: the key cascade and its waiting indexes (stage 2, per CPO party).

The rule is told in `pipeline.reconcile`; this is how it is kept independent of arrival order.

A *key group* is one authorization reference, or one token + location: its sessions (indexes `IA`, `IT`) and the
CDRs that carry the key and may still be (re)matched by it (waiting indexes `WA`, `WT`; `WS` by session id).
The matches of a group are a function of the group alone: its CDRs in order of start (then id) each take the
nearest session, preferring one that no other CDR holds (by a stronger match, by a settled match of this key,
or earlier in this order), then one not INVALID. A fact changes records and indexes, then every group it touched
is matched again: first the authorization-reference groups, then the token groups (a token match yields to any
stronger one, so it is decided last). So after each fact the matches are what this function gives for the facts
seen so far, whatever their order. A CDR that moves has its row written again, and so have the sessions it left and
joined.

A CDR naming a session that is not known waits under that session id alone until its grace has ended; it is
queued by that hour (`QF`), and the first fact of the party after the hour gives it its weaker keys (`expire_named`).
Until then it takes part in no group: a backlog of CDRs ahead of their sessions costs nothing per fact.

A credited CDR (a credit CDR linked to it, `pipeline.reconcile`) is cancelled: it leaves matching for good
(`withdraw`), frees its session and keeps no index entry, as if it had never come; the groups it was in are
matched again. So credits keep every arrival order ending with the same matches.

Which index entries a CDR keeps (`_wanted_keys`): none once credited or matched by session id (final); otherwise
every key stronger than its match (an upgrade may come) and its own key while not *settled* (a nearer or freer
session of the same key may come); a waiting CDR keeps all its keys. A CDR settles once its
OCPI_RECONCILE_SESSION_GRACE has passed by the event time of the fact being processed; then it keeps only the
stronger keys (a waiting one: its strongest), so lists stay as short as the CDRs of one grace, and a session a CDR
names still takes it, late.
Entries of a settled CDR are dropped when its group is next matched.
"""

from __future__ import annotations

import bisect
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

from pipeline.facts import CdrFact, SessionFact

if TYPE_CHECKING:
    from pipeline.reconcile import CdrRec, PartyState, Rules, SessionRec

SESSION_ID: Final = "SESSION_ID"
AUTHORIZATION_REFERENCE: Final = "AUTHORIZATION_REFERENCE"
TOKEN_LOCATION_START: Final = "TOKEN_LOCATION_START"  # noqa: S105 - a method name, not a secret

_STRENGTH: Final = {SESSION_ID: 0, AUTHORIZATION_REFERENCE: 1, TOKEN_LOCATION_START: 2}
# Index kinds: sessions by authorization reference / token+location; CDRs by the keys they wait under.
_S_BY_REF, _S_BY_TOKEN = "IA", "IT"
_WAITING: Final = {SESSION_ID: "WS", AUTHORIZATION_REFERENCE: "WA", TOKEN_LOCATION_START: "WT"}
_FALLBACK: Final = "QF"  # CDRs naming an unknown session, by the hour their grace ends
# The sessions of one authorization reference, and the CDRs waiting under one key, that an index keeps: the latest
# this many. A key shared by more is no identifier (a CPO sending one constant reference or session id), and its
# list, rewritten on every add and held in one state value, grew with every session for the billing retention
# (1,000 a day: past the 16 MB a state record may hold within a year). Token keys are split per hour anyway.
INDEX_MOST: Final = 1000

Key = tuple[str, str]  # (method, key value)


# Token groups are per hour of start: a token may be shared by every ad-hoc session of a charging hub, and a
# group is matched again as a whole whenever one of its facts changes, so an unbounded group (a backlog of CDRs
# ahead of their sessions) would cost quadratic time. A CDR is in the group of its start's hour; a session in the
# group of every hour within the time tolerance of its start, so each pair within the tolerance shares a group.
# Known limit: a session in two hours' groups is contested by both, and a provisional token match made in one
# counts as held in the other. So two CDRs of one token and location, with neither session id nor authorization
# reference, starting on either side of an hour boundary within the tolerance of the same sessions, may end on
# each other's session depending on arrival order (both MATCHED; the pairing differs). Matching the linked hours
# together would undo what the buckets are for.
TOKEN_BUCKET: Final = timedelta(hours=1)


def _hour(moment: datetime) -> int:
    return int(moment.timestamp() // TOKEN_BUCKET.total_seconds())


def token_key(token: str, location_id: str, hour: int) -> str:
    return f"{token}/{location_id}/{hour}"


def old_token_key(token: str, location_id: str) -> str:
    """The key a version before the hour buckets (30bd9ac) indexed a token group under, sessions (`IT`) and waiting
    CDRs (`WT`) alike: token and location, no hour. A state written then keeps such entries until their records'
    billing retention, so a group reads that key too (`Matching._match_group`, `_pending`), taking only what is of
    its own token and location: with a `/` in a location, another location's key of today reads the same."""
    return f"{token}/{location_id}"


def _old_key_of(token_group: str) -> str:
    """`old_token_key` of a token group's key (`token_key` without the hour)."""
    return token_group.rsplit("/", 1)[0]


def cdr_token_key(fact: CdrFact) -> str:
    return token_key(fact.token, fact.location_id, _hour(fact.start))


def session_token_keys(session: SessionFact, tolerance: timedelta) -> list[str]:
    return [token_key(session.token, session.location_id, hour)
            for hour in range(_hour(session.start - tolerance), _hour(session.start + tolerance) + 1)]


def strongest_method(methods: list[str]) -> str:
    return min(methods, key=_STRENGTH.__getitem__, default="")


def cdr_keys(fact: CdrFact) -> list[Key]:
    """The keys a CDR carries, strongest first (every CDR has a token and a location)."""
    keys = []
    if fact.session_id:
        keys.append((SESSION_ID, fact.session_id))
    if fact.authorization_reference:
        keys.append((AUTHORIZATION_REFERENCE, fact.authorization_reference))
    keys.append((TOKEN_LOCATION_START, cdr_token_key(fact)))
    return keys


def _wanted_keys(cdr: CdrRec) -> list[Key]:
    """The waiting-index entries a CDR keeps in its current state (module docstring)."""
    if cdr.credited_by is not None:
        return []
    keys = cdr_keys(cdr.fact)
    if not cdr.method:
        if cdr.fact.session_id:  # it names its session: waits for it alone, then (settled) for any key
            return keys if cdr.settled else keys[:1]
        return keys[:1] if cdr.settled else keys
    level = _STRENGTH[cdr.method]
    return [k for k in keys if _STRENGTH[k[0]] < level or (_STRENGTH[k[0]] == level > 0 and not cdr.settled)]


def _still_matches(cdr: CdrRec, session: SessionFact, rules: Rules) -> bool:
    """Whether a session, changed, still has the key its CDR was matched by."""
    fact = cdr.fact
    if cdr.method == AUTHORIZATION_REFERENCE:
        return session.authorization_reference == fact.authorization_reference
    if cdr.method == TOKEN_LOCATION_START:
        return ((session.token, session.location_id) == (fact.token, fact.location_id)
                and abs(session.start - fact.start) <= rules.time_tolerance)
    return True


def _closest(sessions: list[SessionRec], start: datetime, rules: Rules, method: str, taken: set[str], *,
             full: bool = False) -> SessionRec | None:
    """The session with the nearest start, free ones first, then ones not INVALID (token matches, and matches by a
    `full` index: within the time tolerance). A weaker key's nearest start is a guess: a failed attempt (INVALID,
    never billed) just before the charge the CDR bills shares its token and often its reference."""
    best: tuple[tuple[bool, bool, timedelta, str], SessionRec] | None = None
    for rec in sessions:
        gap = abs(rec.fact.start - start)
        if (method == TOKEN_LOCATION_START or full) and gap > rules.time_tolerance:
            continue
        sid = rec.fact.session_id
        rank = (sid in taken, rec.fact.status == "INVALID", gap, sid)
        if best is None or rank < best[0]:
            best = (rank, rec)
    return None if best is None else best[1]


class Matching:
    """The matching work of one fact: records read once and written back at the end, the key groups it touched,
    and the subjects whose reconciliation rows change."""

    def __init__(self, state: PartyState, rules: Rules, now: datetime) -> None:
        self.state = state
        self.rules = rules
        self.now = now  # event time of the fact: decides lateness and settling
        self._sessions: dict[str, SessionRec | None] = {}
        self._cdrs: dict[str, CdrRec | None] = {}
        self._written: set[tuple[str, str]] = set()
        self._ref_groups: set[str] = set()
        self._token_groups: set[str] = set()
        self.changed_sessions: set[str] = set()
        self.changed_cdrs: set[str] = set()

    # --- records ----------------------------------------------------------------------------------------------

    def session(self, session_id: str) -> SessionRec | None:
        if session_id not in self._sessions:
            self._sessions[session_id] = self.state.session(session_id)
        return self._sessions[session_id]

    def cdr(self, cdr_id: str) -> CdrRec | None:
        if cdr_id not in self._cdrs:
            self._cdrs[cdr_id] = self.state.cdr(cdr_id)
        return self._cdrs[cdr_id]

    def cdrs_of(self, session: SessionRec) -> list[CdrRec]:
        """The CDRs that hold `session`. A crash that restored part of a batch's state may leave it listing a CDR
        whose own record moved on (to another session, or out of matching by a credit): that one is not its CDR."""
        sid = session.fact.session_id
        return [c for c in map(self.cdr, session.cdr_ids) if c is not None and c.session_id == sid]

    def _session_changed(self, rec: SessionRec) -> None:
        self.changed_sessions.add(rec.fact.session_id)
        self._written.add(("S", rec.fact.session_id))

    def _cdr_changed(self, rec: CdrRec, *, row: bool = True) -> None:
        if row:
            self.changed_cdrs.add(rec.fact.cdr_id)
        self._written.add(("C", rec.fact.cdr_id))

    def write(self) -> None:
        """Write back every record this fact changed (after the rows were emitted: emitting bumps `seq`)."""
        for kind, ident in sorted(self._written):
            if kind == "S":
                session = self._sessions[ident]
                if session is not None:
                    self.state.put_session(session)
            else:
                cdr = self._cdrs[ident]
                if cdr is not None:
                    self.state.put_cdr(cdr)

    # --- facts ------------------------------------------------------------------------------------------------

    def session_arrived(self, rec: SessionRec, old: SessionFact | None) -> None:
        """`rec` holds the new fact already; `old` is the fact it replaced."""
        new = rec.fact
        self._sessions[new.session_id] = rec
        self._session_changed(rec)
        self._reindex_session(old, new)
        self._touch(old)
        self._touch(new)
        for cdr in self.cdrs_of(rec):
            self._cdr_changed(cdr)  # its deltas follow the session's latest state
            if not _still_matches(cdr, new, self.rules):
                self._assign(cdr, None, "")
        for named in map(self.cdr, self.state.ids(_WAITING[SESSION_ID], new.session_id)):
            if named is not None:
                self._assign(named, rec, SESSION_ID)

    def cdr_arrived(self, rec: CdrRec) -> None:
        fact = rec.fact
        self._cdrs[fact.cdr_id] = rec
        self._cdr_changed(rec)
        named = self.session(fact.session_id) if fact.session_id else None
        if named is not None:
            self._assign(rec, named, SESSION_ID, indexed=False)
            return
        self._reindex_cdr(rec, [])
        if fact.session_id:
            self._enqueue_fallback(rec)  # its session may still come: the weaker keys wait for its grace
        else:
            self._touch_cdr(fact)

    def withdraw(self, rec: CdrRec, credit_id: str) -> None:
        """`rec` is credited by `credit_id`: it leaves its session and every waiting index for good, and the groups
        it was in are matched again (the session it freed may suit another CDR)."""
        self._cdrs[rec.fact.cdr_id] = rec
        before = _wanted_keys(rec)
        if rec.session_id is not None:
            left = self.session(rec.session_id)
            if left is not None and rec.fact.cdr_id in left.cdr_ids:
                left.cdr_ids.remove(rec.fact.cdr_id)
                left.late = left.late and bool(left.cdr_ids)
                self._session_changed(left)
                self._touch(left.fact)
            self._touch_cdr(rec.fact)
        rec.credited_by = credit_id
        rec.session_id, rec.method, rec.late = None, "", False
        self._reindex_cdr(rec, before)
        self._cdr_changed(rec)

    def expire_named(self) -> None:
        """CDRs naming a session that did not come within their grace fall back to their weaker keys.

        They are queued by the hour their grace ends; each fact gives the CDRs of the hours completed before its
        event time their fallback (so within an hour after the grace), and each queued hour is read once.
        """
        due = _hour(self.now)
        cursor = self.state.fallback_cursor()
        if cursor is not None and cursor >= due - 1:
            return
        if cursor is not None:
            for hour in range(cursor + 1, due):
                for cdr_id in self.state.ids(_FALLBACK, str(hour)):
                    cdr = self.cdr(cdr_id)
                    if cdr is not None and not cdr.method and not cdr.settled and cdr.credited_by is None:
                        self._fall_back(cdr)
                self.state.drop_ids(_FALLBACK, str(hour))
        self.state.set_fallback_cursor(due - 1)

    def _enqueue_fallback(self, cdr: CdrRec) -> None:
        hour = _hour(cdr.fact.received_at + self.rules.session_grace)
        cursor = self.state.fallback_cursor()
        if cursor is not None and hour <= cursor:
            self._fall_back(cdr)  # its grace ended in an hour already given its fallbacks (event times vary)
        else:
            self.state.add_id(_FALLBACK, str(hour), cdr.fact.cdr_id)

    def _fall_back(self, cdr: CdrRec) -> None:
        before = _wanted_keys(cdr)
        cdr.settled = True
        self._reindex_cdr(cdr, before)
        self._cdr_changed(cdr, row=False)
        self._touch_cdr(cdr.fact)

    def settle(self) -> None:
        """Match the touched key groups again, stronger keys first.

        Matching a reference group changes what token groups read (which sessions are held, which CDRs wait
        under a token), never what another reference group reads, and a token group changes nothing another
        group reads: so each touched group is matched once.
        """
        for ref in sorted(self._ref_groups):
            self._match_group(AUTHORIZATION_REFERENCE, ref)
        for key in sorted(self._token_groups):
            self._match_group(TOKEN_LOCATION_START, key)

    # --- groups -----------------------------------------------------------------------------------------------

    def _touch(self, session: SessionFact | None) -> None:
        if session is not None:
            if session.authorization_reference:
                self._ref_groups.add(session.authorization_reference)
            self._token_groups.update(session_token_keys(session, self.rules.time_tolerance))

    def _touch_cdr(self, fact: CdrFact) -> None:
        if fact.authorization_reference:
            self._ref_groups.add(fact.authorization_reference)
        self._token_groups.add(cdr_token_key(fact))

    def _match_group(self, method: str, key: str) -> None:
        pending = self._pending(method, key)
        if not pending:
            return
        index = _S_BY_REF if method == AUTHORIZATION_REFERENCE else _S_BY_TOKEN
        listed = self.state.ids(index, key)
        sessions = [s for s in map(self.session, listed) if s is not None]
        if method == TOKEN_LOCATION_START:
            old_key = _old_key_of(key)
            old = [s for s in map(self.session, self.state.ids(index, old_key)) if s is not None and
                   s.fact.session_id not in listed]
            sessions = [s for s in sessions + old if old_token_key(s.fact.token, s.fact.location_id) == old_key]
        # A full index (INDEX_MOST) is no identifier: it lacks older sessions of the key, and the nearest start
        # among the ones it lists may be hours from a CDR's own session (a late CDR); within the tolerance only.
        full = len(listed) >= INDEX_MOST
        pending_ids = {c.fact.cdr_id for c in pending}
        taken = {s.fact.session_id for s in sessions if self._held(s, method, pending_ids)}
        for cdr in sorted(pending, key=lambda c: (c.fact.start, c.fact.cdr_id)):
            best = _closest(sessions, cdr.fact.start, self.rules, method, taken, full=full)
            if best is not None:
                taken.add(best.fact.session_id)
                self._assign(cdr, best, method)
            elif cdr.method == method:
                self._assign(cdr, None, "")  # the key's sessions are gone or changed: it falls back

    def _held(self, session: SessionRec, method: str, pending_ids: set[str]) -> bool:
        """Whether a CDR this group does not reassign holds the session by a match at least as strong."""
        level = _STRENGTH[method]
        return any(c.fact.cdr_id not in pending_ids and _STRENGTH.get(c.method, len(_STRENGTH)) <= level
                   for c in self.cdrs_of(session))

    def _pending(self, method: str, key: str) -> list[CdrRec]:
        """The CDRs waiting or provisionally matched under one key; settles those past their grace."""
        found = []
        listed = self.state.ids(_WAITING[method], key)
        if method == TOKEN_LOCATION_START:
            listed = listed + [i for i in self.state.ids(_WAITING[method], _old_key_of(key)) if i not in listed]
        for cdr_id in listed:
            cdr = self.cdr(cdr_id)
            if cdr is None:
                continue
            if not cdr.settled and self.now > cdr.fact.received_at + self.rules.session_grace:
                before = _wanted_keys(cdr)
                cdr.settled = True
                self._reindex_cdr(cdr, before)
                self._cdr_changed(cdr, row=False)
            if (method, key) in _wanted_keys(cdr):
                found.append(cdr)
        return found

    # --- moves ------------------------------------------------------------------------------------------------

    def _assign(self, cdr: CdrRec, session: SessionRec | None, method: str, *, indexed: bool = True) -> None:
        """Match `cdr` to `session` by `method`, or make it wait again (None, "")."""
        old_id, new_id = cdr.session_id, None if session is None else session.fact.session_id
        if (old_id, cdr.method) == (new_id, method):
            return
        before = _wanted_keys(cdr) if indexed else []
        cdr_id = cdr.fact.cdr_id
        if old_id is not None and old_id != new_id:
            left = self.session(old_id)
            if left is not None and cdr_id in left.cdr_ids:
                left.cdr_ids.remove(cdr_id)
                left.late = left.late and bool(left.cdr_ids)
                self._session_changed(left)
                self._touch(left.fact)  # it is free now: CDRs of its keys may prefer it
        if session is not None:
            if new_id != old_id:
                if not session.cdr_ids:
                    deadline = session.fact.final_at
                    session.late = deadline is not None and self.now > deadline + self.rules.cdr_grace
                if cdr_id not in session.cdr_ids:  # listed already when a crash restored the session, not the CDR
                    bisect.insort(session.cdr_ids, cdr_id)  # a set, in one order whatever the arrival order
                cdr.late = self.now > cdr.fact.received_at + self.rules.session_grace
            self._session_changed(session)
            self._touch(session.fact)
        else:
            cdr.late = False
            self._touch_cdr(cdr.fact)
        cdr.session_id, cdr.method = new_id, method
        cdr.settled = cdr.settled or method == SESSION_ID or self.now > cdr.fact.received_at + self.rules.session_grace
        self._reindex_cdr(cdr, before)
        self._cdr_changed(cdr)

    def _reindex_cdr(self, cdr: CdrRec, before: list[Key]) -> None:
        after = _wanted_keys(cdr)
        for method, key in before:
            if (method, key) not in after:
                self.state.remove_id(_WAITING[method], key, cdr.fact.cdr_id)
        for method, key in after:
            if (method, key) not in before:
                self.state.add_id(_WAITING[method], key, cdr.fact.cdr_id, most=INDEX_MOST)

    def _reindex_session(self, old: SessionFact | None, new: SessionFact) -> None:
        sid = new.session_id
        if old is None or old.authorization_reference != new.authorization_reference:
            if old is not None and old.authorization_reference:
                self.state.remove_id(_S_BY_REF, old.authorization_reference, sid)
            if new.authorization_reference:
                self.state.add_id(_S_BY_REF, new.authorization_reference, sid, most=INDEX_MOST)
        tolerance = self.rules.time_tolerance
        old_keys = [] if old is None else session_token_keys(old, tolerance)
        new_keys = session_token_keys(new, tolerance)
        for key in old_keys:
            if key not in new_keys:
                self.state.remove_id(_S_BY_TOKEN, key, sid)
        for key in new_keys:
            if key not in old_keys:
                self.state.add_id(_S_BY_TOKEN, key, sid)


# --- retention ----------------------------------------------------------------------------------------------------


def unindex_session(state: PartyState, session: SessionFact, rules: Rules) -> None:
    """Drop a session from the indexes it is listed in (its record is being deleted: `pipeline.party_retention`)."""
    sid = session.session_id
    if session.authorization_reference:
        state.remove_id(_S_BY_REF, session.authorization_reference, sid)
    for key in session_token_keys(session, rules.time_tolerance):
        state.remove_id(_S_BY_TOKEN, key, sid)
    state.remove_id(_S_BY_TOKEN, old_token_key(session.token, session.location_id), sid)


def unindex_cdr(state: PartyState, cdr: CdrFact, rules: Rules) -> None:
    """Drop a CDR from every waiting index and queue it may be listed in (its record is being deleted)."""
    for method, key in cdr_keys(cdr):
        state.remove_id(_WAITING[method], key, cdr.cdr_id)
    state.remove_id(_WAITING[TOKEN_LOCATION_START], old_token_key(cdr.token, cdr.location_id), cdr.cdr_id)
    state.remove_id(_FALLBACK, str(_hour(cdr.received_at + rules.session_grace)), cdr.cdr_id)
