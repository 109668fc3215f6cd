"""Deduplication: an event equal to the last applied one is dropped (and counted as DUPLICATE).

Equal means the same object identity (level, EVSE uid, Connector id; the Kafka key fixes the rest) and the same
`content_hash` — which the receivers compute without any `last_updated` (`ocpi.canonical`). That covers a
partner's retry, the tail of a FIFO resend after an outage (earlier resent events are older than the stored
state, hence STALE, see `ordering`), and a re-push that only bumps `last_updated`: none of them may create a new
version of the object.

Only the *last applied* event counts: a PUT that restores an earlier content after a PATCH changed it is a real
change, not a duplicate. Nor is a PUT whose body hashes like the PATCH applied before it (a CPO that sends whole
objects as PATCHes): the PATCH was merged (a Session's `charging_periods` appended), the PUT replaces, so their
results differ although their bodies do not. The operation is part of what is compared (`fingerprint`); the other
way round, a PATCH with the body of the PUT before it, changes nothing and is a duplicate.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import msgspec
import msgspec.inspect as mi

from infra.codec import DecodedEvent
from ocpi import model
from ocpi.canonical import content_hash
from ocpi.identity import ci_normalize
from pipeline import wire


def identity(event: DecodedEvent) -> str:
    """The event's object identity within its Kafka key: `LEVEL|EVSE|CONNECTOR` (CiString, upper-cased)."""
    return level_identity(event.level, event.evse_uid, event.connector_id)


# Cached: a pure function of three short strings, asked for the same event's identity several times as it is
# applied (dedup, staleness, own-time tracking, the state), and for the same Location's "LOCATION||" all the time.
@functools.lru_cache(maxsize=4096)
def level_identity(level: str, evse_uid: str | None = None, connector_id: str | None = None) -> str:
    """`LEVEL|EVSE|CONNECTOR` of an object of the Location tree (see `identity`).

    A CiString may hold `|` (any printable ASCII), so each part escapes `%` and `|`: EVSE `A|B` with Connector
    `C` and EVSE `A` with Connector `B|C` are different objects. Ids without either character keep the identity
    they always had (states written before still match)."""
    return f"{level}|{_part(evse_uid)}|{_part(connector_id)}"


def _part(value: str | None) -> str:
    text = ci_normalize(value or "")
    if "%" in text or "|" in text:
        text = text.replace("%", "%25").replace("|", "%7C")
    return text


# `LocationState.confirmed` keys of the Location tree's lists, at levels no object has (never an object's identity):
# when a push last replaced the Location's EVSEs (and with them each listed EVSE's Connectors), and an EVSE's
# Connectors.
_EVSE_LIST = "EVSES||"


def _connector_list(evse_uid: str | None) -> str:
    return f"CONNECTORS|{_part(evse_uid)}|"


def list_keys_over(evse_uid: str | None, connector: bool) -> tuple[str, ...]:
    """The lists (`confirmed` keys) that hold an EVSE (`connector` False) or one of its Connectors."""
    return (_EVSE_LIST, _connector_list(evse_uid)) if connector else (_EVSE_LIST,)


def lists_over_key(key: str) -> tuple[str, ...]:
    """The lists (`confirmed` keys) over the object of a `confirmed` key: an EVSE's and a Connector list's, the
    Location's EVSEs; a Connector's, those and its EVSE's Connectors; none over the Location or the EVSE list."""
    level, evse_part, _ = key.split("|", 2)
    if level == "CONNECTOR":
        return (_EVSE_LIST, f"CONNECTORS|{evse_part}|")  # the part is escaped already (`_connector_list`)
    return (_EVSE_LIST,) if level in ("EVSE", "CONNECTORS") else ()


def lists_replaced(event: DecodedEvent) -> tuple[str, ...]:
    """The lists of the tree a push replaces whole (`confirmed` keys): the Location's EVSEs by a Location PUT or a
    PATCH of `evses`, an EVSE's Connectors by an EVSE PUT or a PATCH of `connectors`. An EVSE or Connector such a
    push does not list is not in the CPO's tree at its `last_updated`, whether or not we ever held it."""
    if event.level == "LOCATION" and (event.operation == "PUT" or "evses" in event.payload):
        return (_EVSE_LIST,)
    if event.level == "EVSE" and (event.operation == "PUT" or "connectors" in event.payload):
        return (_connector_list(event.evse_uid),)
    return ()


def lists_over(event: DecodedEvent) -> tuple[str, ...]:
    """The lists (`confirmed` keys) that hold the object of an EVSE or Connector push: a newer replacement of one
    that did not list it makes an older push for it stale."""
    if event.level in ("EVSE", "CONNECTOR"):
        return list_keys_over(event.evse_uid, event.level == "CONNECTOR")
    return ()


def confirmations(event: DecodedEvent) -> Iterator[tuple[str, str | None, str | None, datetime]]:
    """(identity, EVSE uid, Connector id, last_updated) of every Location-tree object a duplicate confirms: its
    own object, and the EVSEs and Connectors its payload carries (a Location PUT, or PATCH of `evses`; an EVSE
    PUT, or PATCH of `connectors`), each with the `last_updated` it carries. A re-push that bumps the timestamps
    confirms the whole tree it holds then, so an older push for one of its EVSEs or Connectors is stale too.
    An EVSE or Connector push confirms its parents at its `last_updated` as well: applied, it would have raised
    theirs (08 §3), so an older Location (or EVSE) PUT arriving after the duplicate is stale, as it is in order."""
    payload = event.payload
    moment = payload["last_updated"]
    yield identity(event), event.evse_uid, event.connector_id, moment
    if event.level == "CONNECTOR":
        yield level_identity("EVSE", event.evse_uid), event.evse_uid, None, moment
    if event.level != "LOCATION":
        yield level_identity("LOCATION"), None, None, moment
    if event.level == "LOCATION":
        for evse in payload.get("evses") or ():
            yield level_identity("EVSE", evse["uid"]), evse["uid"], None, evse["last_updated"]
            yield from _connector_confirmations(evse["uid"], evse)
    elif event.level == "EVSE":
        yield from _connector_confirmations(event.evse_uid, payload)


def _connector_confirmations(uid: str | None, evse: dict[str, Any],
                             ) -> Iterator[tuple[str, str | None, str | None, datetime]]:
    for connector in evse.get("connectors") or ():
        yield level_identity("CONNECTOR", uid, connector["id"]), uid, connector["id"], connector["last_updated"]


def fingerprint(event: DecodedEvent) -> str:
    """What dedup compares besides the identity: the content hash, marked for a PATCH (a PATCH and a PUT with the
    same body are different changes). A PUT's is its content hash as it always was, so states written before keep
    recognising retries of their last PUT."""
    return f"PATCH:{event.content_hash}" if event.operation == "PATCH" else event.content_hash


def is_duplicate(last_identity: str, last_hash: str, event: DecodedEvent) -> bool:
    """Whether `event` repeats the last applied event (same identity, operation and content); `last_hash` is the
    `fingerprint` of the last applied event. A PATCH with the body of the PUT applied last repeats it too: merged
    onto what that PUT stored it changes nothing (its fields equal the stored ones, its identical periods are
    skipped), so a bumped `last_updated` on it makes no new version. The PUT's hash is that of the full object,
    whose documented defaults are filled in (a Location's `charging_when_closed`) and whose `[]` mean absent; the
    PATCH's that of what it sets, where `[]` is content: so the PATCH is read as the full object too (`_as_put`)."""
    if not last_hash or identity(event) != last_identity:
        return False
    if fingerprint(event) == last_hash:
        return True
    if event.operation != "PATCH" or last_hash.startswith("PATCH:"):
        return False
    return event.content_hash == last_hash or _as_put(event) == last_hash


def _as_put(event: DecodedEvent) -> str | None:
    """The content hash of a PATCH's body read as the full object (as a PUT of that body would hash), or None
    when it is no full object (it lacks a required field)."""
    full = _FULL.get(event.payload_type)
    if full is None or not full[1] <= event.payload.keys():
        return None
    try:
        return content_hash(wire.to_struct(event.payload, full[0]))
    except msgspec.ValidationError:
        return None


def _full(name: str) -> tuple[type[Any], frozenset[str]]:
    """The full model of a `{name}Patch`, and its required fields."""
    info = mi.type_info(getattr(model, name))
    assert isinstance(info, mi.StructType)
    return info.cls, frozenset(field.encode_name for field in info.fields if field.required)


_FULL: dict[str, tuple[type[Any], frozenset[str]]] = {
    f"{name}Patch": _full(name) for name in ("Location", "EVSE", "Connector", "Session")}
