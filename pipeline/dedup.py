"""Deduplication: an event equal to the last applied one is dropped (and counted as DUPLICATE).

Equal means the same object identity (level, EVSE uid, Connector id; the Kafka key fixes the rest) and the same
`content_hash` — which the receivers compute without any `last_updated` (`ocpi.canonical`). That covers a
partner's retry, the tail of a FIFO resend after an outage (earlier resent events are older than the stored
state, hence STALE, see `ordering`), and a re-push that only bumps `last_updated`: none of them may create a new
version of the object.

Only the *last applied* event counts: a PUT that restores an earlier content after a PATCH changed it is a real
change, not a duplicate.
"""

from __future__ import annotations

from infra.codec import DecodedEvent
from ocpi.identity import ci_normalize


def identity(event: DecodedEvent) -> str:
    """The event's object identity within its Kafka key: `LEVEL|EVSE|CONNECTOR` (CiString, upper-cased)."""
    return f"{event.level}|{ci_normalize(event.evse_uid or '')}|{ci_normalize(event.connector_id or '')}"


def is_duplicate(last_identity: str, last_hash: str, event: DecodedEvent) -> bool:
    """Whether `event` repeats the last applied event (same identity, same content)."""
    return bool(last_hash) and event.content_hash == last_hash and identity(event) == last_identity
