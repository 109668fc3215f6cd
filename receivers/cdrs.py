"""CDRs receiver interface (`10-cdrs.md` §3): POST of a final CDR, answered with its `Location` URL, and GET
at that URL.

CDRs are not pushed as client-owned objects: the POST URL has no owner, so the owner is read from the body
and must be one of the caller's parties. The URL we return is ours to choose (10 §3.1):
`/ocpi/emsp/2.2.1/cdrs/{country_code}/{party_id}/{cdr_id}`, so the GET is owner-checked like every other
client-owned URL.

A second POST of a CDR id (the spec is silent; `05-status-codes.md` §5 gives our policy): CDRs are immutable, so
the CDR held under the id is read (`StateReader.cdr_for_push`) and compared as OCPI compares CDRs
(`ocpi.canonical.cdr_content_hash`). The same CDR is answered 1000 with HTTP 200 (idempotent: a retry whose
first answer was lost); another CDR under a held id is refused with 2001 on `$.id`, so the CPO learns that its
correction was not taken and sends a credit CDR instead (10 §1.1). Both are published all the same once Kafka
has them: the pipeline, which never overwrites a stored CDR, counts the DUPLICATE or records the CONFLICT
(anomaly `CDR_CONFLICT`) with the body, as it does for a second POST that arrives before the first is stored
(the store lags Kafka: that one is answered as new, 201). When the held CDR's personal identifiers are
pseudonymised already (after `OCPI_RETENTION_PSEUDONYMISE_DAYS`) they cannot be compared: a CDR that differs
elsewhere is refused, one that does not is answered 1000 and left to the pipeline, which compares content hashes
kept from the first POST. A store that cannot be read in time (`receivers.state`) leaves the answer 201.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any, TypeAlias

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency

from infra.pseudonyms import is_pseudonym
from infra.settings import Settings
from ocpi.canonical import cdr_content_hash, to_builtins
from ocpi.decode import decode_stored
from ocpi.errors import OcpiError
from ocpi.identity import ObjectKey
from ocpi.model import CDR
from receivers.auth import our_party, require_owner
from receivers.paths import path_segment
from receivers.pushes import CDR_POST, Events, Segment
from receivers.state import Stored
from receivers.transport import ForeignParty, InvalidParameters, NotFound, decode_body, ocpi_response

PATH = "/ocpi/emsp/2.2.1/cdrs"
Configured: TypeAlias = NamedDependency[Settings]  # the app's Settings (app.py provides it as `settings`)


def cdr_url(settings: Settings, key: ObjectKey) -> str:
    """Where the CPO can GET the CDR back: our choice of structure, owner and id included, each one segment."""
    parts = "/".join(path_segment(part) for part in (key.country_code, key.party_id, key.object_id))
    return f"{settings.http.base_url}{PATH}/{parts}"


class Held(enum.Enum):
    """What a POSTed CDR is to the CDR held under its id (module docstring)."""

    NOTHING = "nothing held, or the store not read"
    SAME = "the same CDR"
    UNDECIDED = "the same but for personal identifiers the held one has as pseudonyms"
    OTHER = "another CDR"


def judge(held: msgspec.Raw | None, posted: CDR) -> Held:
    if held is None:
        return Held.NOTHING
    try:
        stored = to_builtins(decode_stored(held, CDR))
    except OcpiError:
        return Held.UNDECIDED  # held, but not readable as a CDR of today's model: the pipeline judges
    incoming = to_builtins(posted)
    if cdr_content_hash(stored) == cdr_content_hash(incoming):
        return Held.SAME
    if _without_pseudonymised(stored, incoming) and cdr_content_hash(stored) == cdr_content_hash(incoming):
        return Held.UNDECIDED
    return Held.OTHER


def _without_pseudonymised(stored: Any, incoming: Any) -> bool:
    """Leave out of both trees every member the stored one holds as a pseudonym; whether there was one."""
    found = False
    if isinstance(stored, dict) and isinstance(incoming, dict):
        for name, value in list(stored.items()):
            if isinstance(value, str) and is_pseudonym(value):
                del stored[name]
                incoming.pop(name, None)
                found = True
            else:
                found = _without_pseudonymised(value, incoming.get(name)) or found
    elif isinstance(stored, list) and isinstance(incoming, list):
        for stored_item, incoming_item in zip(stored, incoming, strict=False):
            found = _without_pseudonymised(stored_item, incoming_item) or found
    return found


@post("/", status_code=201)
async def post_cdr(request: Request[Any, Any, Any], events: Events, settings: Configured,
                   stored: Stored) -> Response[bytes]:
    """A CDR; the owner is read from the body (no owner in the POST URL) and must be the caller's. A second POST of a
    held id is answered by what it is to the held CDR (module docstring)."""
    partner = request.state.partner
    decoded = decode_body(await request.body(), CDR, partner.profile)
    cdr = decoded.value
    try:
        require_owner(partner, cdr.country_code, cdr.party_id, ours=our_party(settings))
    except ForeignParty as exc:  # the owner came from the body: name its fields
        raise ForeignParty(f"$.country_code, $.party_id: {exc.message}",
                           data={"path": "$.party_id", "reason": exc.message}) from None
    key = ObjectKey(cdr.country_code, cdr.party_id, cdr.id)
    held, _event = await asyncio.gather(
        stored.cdr_for_push(key),
        events.publish_push(request, module=CDR_POST.module, operation=CDR_POST.operation, level=CDR_POST.level,
                            key=key, decoded=decoded, payload_type=CDR_POST.payload_type))
    verdict = judge(held, cdr)
    location = {"Location": cdr_url(settings, key)}
    if verdict is Held.OTHER:
        reason = ("another CDR is held under this id; CDRs are immutable (10 §1): the held one stands. Correct it "
                  "with a credit CDR and, if needed, a new CDR under a new id")
        raise InvalidParameters(f"$.id: {reason}", data={"path": "$.id", "reason": reason}, headers=location)
    return ocpi_response(http_status=201 if verdict is Held.NOTHING else 200, headers=location)


@get("/{country_code:str}/{party_id:str}/{cdr_id:str}")
async def get_cdr(country_code: Segment, party_id: Segment, cdr_id: Segment, stored: Stored) -> Response[bytes]:
    """The CDR as we hold it, at the URL our POST answer named; 404 with 2000 when we hold none."""
    key = ObjectKey(country_code, party_id, cdr_id)
    cdr = await stored.cdr(key)
    if cdr is None:
        raise NotFound(f"CDR {key} is not known here")
    return ocpi_response(cdr)


router = Router(path=PATH, route_handlers=[post_cdr, get_cdr], opt={"ocpi_module": "cdrs"})
