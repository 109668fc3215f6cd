"""The OCPI push rules of the receiver interfaces, once: which object a URL takes, URL/body identity, and
the event an accepted push becomes. The module routers only name a Target and the URL's parts.

Rules (08 §3.3-3.4, 09 §3.3-3.4, 04 §4.4 and §6, digest 12 rules 4 and 7):
- The body decodes strictly (ocpi.decode) into the Target's model: the full object for PUT/POST, its Patch
  class for PATCH (a partial: any field may be absent, `last_updated` is required, null means unchanged).
  The partner's compatibility profile is applied and the relaxations used travel on the event.
- Identity: every identity field the body carries must equal the URL's part, compared as CiString
  (case-insensitively): Location country_code/party_id/id, EVSE uid, Connector id, Session
  country_code/party_id/id. A PATCH may leave them out; if it sets one, it must match.
- Level (Locations): a body carrying a field of another level of the Location → EVSE → Connector tree
  (an EVSE `status` at the Location URL, a Location at an EVSE URL ...) is refused. Without this an EVSE
  status PATCH sent to the Location URL would decode as an empty Location PATCH and be acknowledged while
  changing nothing. Fields of no level are ignored like any unknown field (valid 2.2.1, see ocpi.compat).
- The URL's ids (Location id, EVSE uid, Connector id, Session id) must be non-empty CiString(36): a PATCH need
  not repeat them in the body, so the URL is the only place they are checked. The owner's country_code/party_id
  must be non-empty CiString(2)/CiString(3): a Hub's broadcast may name any owner (04 §9), not only a role's.
- Every refusal is 2001 naming the field by its JSON path (a URL id by its `{name}`) and saying why
  (transport.InvalidParameters); a body that is not JSON is HTTP 400 first (05 §2), whatever its URL.
- The Kafka key is the owner object's identity (`CC/PID/ID` upper-cased): for an EVSE or Connector push the
  Location's, so every event of one Location stays in order on one partition; the event carries
  `evse_uid`/`connector_id` for the sub-object.

Not checked here, by design: whether the object (or, for an EVSE/Connector push, its Location) is already
known. Answering that synchronously would need a read of the current state on every push, and that state
lags Kafka: a Location PUT acknowledged a moment ago may not be projected yet, so a quick EVSE PATCH after it
would be refused wrongly. Every valid push is acknowledged once Kafka has it; Kafka keeps a Location's events
in order, and the pipeline parks or flags a sub-object push whose Location it does not hold (and a Session
PATCH for an unknown Session). A CPO that wants to check can GET the object: unknown objects answer 404.
The answer is HTTP 200 for every accepted PUT/PATCH (the spec's 201-if-created is a SHOULD that would need
the same read). CDRs are the exception (`receivers.cdrs`): a CDR is immutable, so a held one is never stale and
a CDR POST reads it to answer a second POST of its id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, TypeAlias

import msgspec
from litestar import Request
from litestar.di import NamedDependency
from litestar.params import FromPath

from ocpi.decode import UNPARSABLE, invalid_value
from ocpi.identity import ObjectKey, ci_equal
from ocpi.model import (
    CDR,
    EVSE,
    CiString2,
    CiString3,
    CiString36,
    Connector,
    ConnectorPatch,
    EVSEPatch,
    Location,
    LocationPatch,
    Session,
    SessionPatch,
)
from receivers.publishing import EventPublisher
from receivers.transport import InvalidParameters, decode_body, require_json, require_utf8

# Handler parameter types: a URL segment, and the app's EventPublisher (app.py provides it as `events`).
Segment: TypeAlias = FromPath[str]
Events: TypeAlias = NamedDependency[EventPublisher]


class PushUrl(NamedTuple):
    """The identity parts of a push URL: the owner object, and the sub-object for EVSE/Connector pushes."""

    country_code: str
    party_id: str
    object_id: str
    evse_uid: str | None = None
    connector_id: str | None = None

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.country_code, self.party_id, self.object_id)


@dataclass(frozen=True)
class Target:
    """What one receiver URL and method accept."""

    module: str  # topic selector: locations, sessions, cdrs
    operation: str  # PUT, PATCH, POST
    level: str  # LOCATION, EVSE, CONNECTOR, SESSION, CDR (the event's level)
    model: type[msgspec.Struct]
    identity: tuple[tuple[str, str], ...] = ()  # (body field, PushUrl field) that must agree
    url_hint: str = ""  # how the URL names the object, for messages
    foreign_fields: Mapping[str, str] = field(default_factory=dict)  # key of another level → that level
    url_ids: tuple[tuple[str, str], ...] = ()  # (PushUrl field, URL parameter name): each a CiString(36)

    @property
    def payload_type(self) -> str:
        """The Avro payload branch: the model's name (Location, EVSEPatch, CDR ...)."""
        return self.model.__name__


# --- the Location tree's levels ---------------------------------------------------------------------------

_LEVEL_FIELDS: Final = {
    "Location": frozenset(Location.__struct_fields__),
    "EVSE": frozenset(EVSE.__struct_fields__),
    "Connector": frozenset(Connector.__struct_fields__),
}


def _foreign_fields(level: str) -> dict[str, str]:
    """Top-level keys that belong to other levels of the Location tree but not to `level`."""
    own = _LEVEL_FIELDS[level]
    foreign: dict[str, list[str]] = {}
    for other, fields in _LEVEL_FIELDS.items():
        if other == level:
            continue
        for name in sorted(fields - own):
            foreign.setdefault(name, []).append(other)
    return {name: " and ".join(levels) for name, levels in foreign.items()}


_LOCATION_URL = ".../{country_code}/{party_id}/{location_id}"
_EVSE_URL = _LOCATION_URL + "/{evse_uid}"
_CONNECTOR_URL = _EVSE_URL + "/{connector_id}"
_OWNER_IDENTITY: Final = (("country_code", "country_code"), ("party_id", "party_id"), ("id", "object_id"))


_LOCATION_IDS: Final = (("object_id", "location_id"),)
_EVSE_IDS: Final = (*_LOCATION_IDS, ("evse_uid", "evse_uid"))
_CONNECTOR_IDS: Final = (*_EVSE_IDS, ("connector_id", "connector_id"))
_SESSION_IDS: Final = (("object_id", "session_id"),)


def _location_targets(operation: str) -> tuple[Target, Target, Target]:
    patch = operation == "PATCH"
    return (
        Target("locations", operation, "LOCATION", LocationPatch if patch else Location, _OWNER_IDENTITY,
               _LOCATION_URL, _foreign_fields("Location"), _LOCATION_IDS),
        Target("locations", operation, "EVSE", EVSEPatch if patch else EVSE, (("uid", "evse_uid"),),
               _EVSE_URL, _foreign_fields("EVSE"), _EVSE_IDS),
        Target("locations", operation, "CONNECTOR", ConnectorPatch if patch else Connector,
               (("id", "connector_id"),), _CONNECTOR_URL, _foreign_fields("Connector"), _CONNECTOR_IDS),
    )


LOCATION_PUT, EVSE_PUT, CONNECTOR_PUT = _location_targets("PUT")
LOCATION_PATCH, EVSE_PATCH, CONNECTOR_PATCH = _location_targets("PATCH")
SESSION_PUT: Final = Target("sessions", "PUT", "SESSION", Session, _OWNER_IDENTITY,
                            ".../{country_code}/{party_id}/{session_id}", url_ids=_SESSION_IDS)
SESSION_PATCH: Final = Target("sessions", "PATCH", "SESSION", SessionPatch, _OWNER_IDENTITY,
                              ".../{country_code}/{party_id}/{session_id}", url_ids=_SESSION_IDS)
CDR_POST: Final = Target("cdrs", "POST", "CDR", CDR)

_LEVEL_NOUNS: Final = {"LOCATION": ("a", "Location"), "EVSE": ("an", "EVSE"), "CONNECTOR": ("a", "Connector")}


# --- the checks -------------------------------------------------------------------------------------------

_top_level: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])


def _refuse(path: str, reason: str) -> InvalidParameters:
    return InvalidParameters(f"{path}: {reason}", data={"path": path, "reason": reason})


def check_level(body: bytes, target: Target) -> None:
    """Refuse a body that carries a field of another level of the Location tree (module docstring)."""
    if not target.foreign_fields:
        return
    try:
        keys = _top_level.decode(body)
    except UNPARSABLE:
        # Not a JSON object, or nested deeper than the parser goes: decoding reports it properly (400, or 2001
        # naming the type).
        return
    for name, raw in keys.items():
        other = target.foreign_fields.get(name)
        if other is not None and bytes(raw) != b"null":  # null carries nothing (OCPI: null = absent)
            require_utf8(body)  # `Raw` values are not read: a body that is no JSON is a 400 first
            article, noun = _LEVEL_NOUNS[target.level]
            raise _refuse(f"$.{name}", f"a field of {other}, not of {noun}: a {target.operation} at "
                                       f"{target.url_hint} carries {article} {noun}")


# The owner's segments of a push URL and their types (08 §3.1, 09 §3.1): a party's country code and party id.
_OWNER_SEGMENTS: Final = (("country_code", CiString2), ("party_id", CiString3))


def check_url_ids(target: Target, url: PushUrl) -> None:
    """Every id in the URL must be a valid CiString(36) (08 §3.1, 09 §3.1), the type of the object's id: a PATCH
    need not repeat it in the body, so without this an id no object can have (too long, not ASCII, a control
    character, or an empty segment: `LOC1//1`) would be acknowledged. The owner's `country_code`/`party_id` must
    be a CiString(2)/CiString(3) likewise: the guard has them be one of the caller's parties, but a Hub's broadcast
    may name any owner (04 §9)."""
    if not target.url_ids:
        return
    for name, kind in _OWNER_SEGMENTS:
        value = getattr(url, name)
        if value == "":
            raise _refuse(f"{{{name}}}", f"the URL's {name} is empty: a push URL names the object's owner")
        if (reason := invalid_value(value, kind)) is not None:
            raise _refuse(f"{{{name}}}", f"the URL's {name}: {reason}")
    for url_field, name in target.url_ids:
        value = getattr(url, url_field)
        if value == "":
            raise _refuse(f"{{{name}}}", f"the URL's {name} is empty: a push URL names its object by its id")
        if value is not None and (reason := invalid_value(value, CiString36)) is not None:
            raise _refuse(f"{{{name}}}", f"the URL's {name}: {reason}")


def check_identity(value: Any, target: Target, url: PushUrl) -> None:
    """Every identity field the body sets must equal the URL's part, case-insensitively."""
    for body_field, url_field in target.identity:
        body_value = getattr(value, body_field)
        if body_value is None or body_value is msgspec.UNSET:
            continue  # a PATCH leaves identity out (a full object always has it: decoding required it)
        url_value = getattr(url, url_field)
        if not ci_equal(body_value, url_value):
            raise _refuse(f"$.{body_field}", f"{body_value!r} differs from {url_value!r} in the URL "
                                             f"({target.url_hint}): a push must address the object it carries")


async def accept_push(request: Request[Any, Any, Any], events: EventPublisher, target: Target,
                      url: PushUrl) -> None:
    """Validate a PUT/PATCH at `url` against `target` and publish it; raises the OCPI error otherwise."""
    body = await request.body()
    try:
        check_url_ids(target, url)
    except InvalidParameters:
        require_json(body)  # a body that is no JSON is a 400 first, whatever it addresses
        raise
    check_level(body, target)
    decoded = decode_body(body, target.model, request.state.partner.profile)
    check_identity(decoded.value, target, url)
    await events.publish_push(request, module=target.module, operation=target.operation, level=target.level,
                              key=url.key, decoded=decoded, payload_type=target.payload_type,
                              evse_uid=url.evse_uid, connector_id=url.connector_id)
