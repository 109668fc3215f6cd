"""CDRs receiver interface (`10-cdrs.md` §3): POST of a final CDR, answered with its `Location` URL, and GET
at that URL.

CDRs are not pushed as client-owned objects: the POST URL has no owner, so the owner is read from the body
and must be one of the caller's parties. The URL we return is ours to choose (10 §3.1):
`/ocpi/emsp/2.2.1/cdrs/{country_code}/{party_id}/{cdr_id}`, so the GET is owner-checked like every other
client-owned URL. A second POST of a known CDR is acknowledged like the first once Kafka has it; what it
means (a retry, or a conflicting body under the same id) is the pipeline's policy, which never overwrites a
stored CDR (CDRs are immutable).
"""

from __future__ import annotations

from typing import Any, TypeAlias

from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency

from infra.settings import Settings
from ocpi.identity import ObjectKey
from ocpi.model import CDR
from receivers.auth import require_owner
from receivers.paths import path_segment
from receivers.pushes import CDR_POST, Events, Segment
from receivers.state import Stored
from receivers.transport import ForeignParty, NotFound, decode_body, ocpi_response

PATH = "/ocpi/emsp/2.2.1/cdrs"
Configured: TypeAlias = NamedDependency[Settings]  # the app's Settings (app.py provides it as `settings`)


def cdr_url(settings: Settings, key: ObjectKey) -> str:
    """Where the CPO can GET the CDR back: our choice of structure, owner and id included, each one segment."""
    parts = "/".join(path_segment(part) for part in (key.country_code, key.party_id, key.object_id))
    return f"{settings.http.base_url}{PATH}/{parts}"


@post("/", status_code=201)
async def post_cdr(request: Request[Any, Any, Any], events: Events, settings: Configured) -> Response[bytes]:
    """A new CDR; the owner is read from the body (no owner in the POST URL) and must be the caller's."""
    partner = request.state.partner
    decoded = decode_body(await request.body(), CDR, partner.profile)
    cdr = decoded.value
    try:
        require_owner(partner, cdr.country_code, cdr.party_id)
    except ForeignParty as exc:  # the owner came from the body: name its fields
        raise ForeignParty(f"$.country_code, $.party_id: {exc.message}",
                           data={"path": "$.party_id", "reason": exc.message}) from None
    key = ObjectKey(cdr.country_code, cdr.party_id, cdr.id)
    await events.publish_push(request, module=CDR_POST.module, operation=CDR_POST.operation,
                              level=CDR_POST.level, key=key, decoded=decoded, payload_type=CDR_POST.payload_type)
    return ocpi_response(http_status=201, headers={"Location": cdr_url(settings, key)})


@get("/{country_code:str}/{party_id:str}/{cdr_id:str}")
async def get_cdr(country_code: Segment, party_id: Segment, cdr_id: Segment, stored: Stored) -> Response[bytes]:
    """The CDR as we hold it, at the URL our POST answer named; 404 with 2000 when we hold none."""
    key = ObjectKey(country_code, party_id, cdr_id)
    cdr = await stored.cdr(key)
    if cdr is None:
        raise NotFound(f"CDR {key} is not known here")
    return ocpi_response(cdr)


router = Router(path=PATH, route_handlers=[post_cdr, get_cdr], opt={"ocpi_module": "cdrs"})
