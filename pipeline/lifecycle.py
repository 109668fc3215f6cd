"""Session lifecycle (09 §1): which status changes are legal, and what the stored state does otherwise.

The spec gives no formal state machine (digest ambiguity #9). Our rule, documented in README ("Session
lifecycle"):

- Ranks: PENDING and RESERVATION (not started) < ACTIVE < COMPLETED and INVALID (final).
- LEGAL: the first status of a new session (any); the same status again; a move to a higher rank from a
  non-final status (PENDING → ACTIVE, RESERVATION → COMPLETED, ACTIVE → INVALID, ...).
- Leaving a final state (COMPLETED → ACTIVE, INVALID → COMPLETED, COMPLETED → INVALID) is REJECTED: recorded
  as ILLEGAL_TRANSITION and not applied — "no more modifications will be made" to a final session, and
  billing must not see a finished session reopen.
- Any other move (backwards or sideways between non-final states: ACTIVE → PENDING, PENDING → RESERVATION)
  is ILLEGAL but APPLIED: the CPO owns the object and its latest state is the truth; the anomaly is recorded.
- A change of a final session that keeps its status (e.g. a late `total_cost` PATCH) is applied and recorded
  as UPDATE_AFTER_FINAL.
  A push that leaves it as stored but for `last_updated` is no change: a DUPLICATE (`pipeline.sessions.as_stored`:
  CiStrings in any case, personal identifiers compared as their pseudonyms, as the state may hold them).
"""

from __future__ import annotations

import enum
from datetime import datetime, timedelta

FINAL = frozenset({"COMPLETED", "INVALID"})
OPEN = frozenset({"PENDING", "ACTIVE"})  # the states in which a session can be idle
_RANK = {"PENDING": 0, "RESERVATION": 0, "ACTIVE": 1, "COMPLETED": 2, "INVALID": 2}


class Transition(enum.StrEnum):
    INITIAL = "INITIAL"
    LEGAL = "LEGAL"
    ILLEGAL = "ILLEGAL"  # applied, recorded
    REJECTED = "REJECTED"  # not applied, recorded
    UPDATE_AFTER_FINAL = "UPDATE_AFTER_FINAL"  # applied, recorded


def classify(previous: str | None, new: str) -> Transition:
    """The transition `previous` → `new` (previous None: a new session)."""
    if previous is None:
        return Transition.INITIAL
    if previous in FINAL:
        return Transition.UPDATE_AFTER_FINAL if new == previous else Transition.REJECTED
    if new == previous or _RANK[new] > _RANK[previous]:
        return Transition.LEGAL
    return Transition.ILLEGAL


def is_applied(transition: Transition) -> bool:
    return transition is not Transition.REJECTED


def is_anomaly(transition: Transition) -> bool:
    return transition in (Transition.ILLEGAL, Transition.REJECTED, Transition.UPDATE_AFTER_FINAL)


def idle_since(status: str | None, last_event_at: datetime | None, now: datetime, idle_after: timedelta) -> bool:
    """Whether a session in `status`, last updated (received) at `last_event_at`, is idle at `now`."""
    return status in OPEN and last_event_at is not None and now - last_event_at > idle_after
