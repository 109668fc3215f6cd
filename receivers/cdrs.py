"""CDRs receiver interface (`10-cdrs.md` §3): POST of a final CDR, answered with its `Location` URL."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from litestar import Request, Response, Router, post

from infra.settings import Settings
from ocpi.identity import ObjectKey
from ocpi.model import CDR
from receivers.auth import require_owner
from receivers.publishing import EventPublisher
from receivers.transport import decode_body, ocpi_response

PATH = "/ocpi/emsp/2.2.1/cdrs"


def cdr_url(settings: Settings, key: ObjectKey) -> str:
    """Where the CPO can GET the CDR back: our choice of structure, owner and id included."""
    parts = "/".join(quote(part, safe="") for part in (key.country_code, key.party_id, key.object_id))
    return f"{settings.http.base_url}{PATH}/{parts}"


@post("/", status_code=201)
async def post_cdr(request: Request[Any, Any, Any], events: EventPublisher, settings: Settings) -> Response[bytes]:
    """A new CDR; the owner is read from the body (no owner in the POST URL) and must be the caller's."""
    partner = request.state.partner
    decoded = decode_body(await request.body(), CDR, partner.profile)
    cdr = decoded.value
    require_owner(partner, cdr.country_code, cdr.party_id)
    key = ObjectKey(cdr.country_code, cdr.party_id, cdr.id)
    await events.publish_push(request, module="cdrs", operation="POST", level="CDR", key=key, decoded=decoded,
                              payload_type="CDR")
    return ocpi_response(http_status=201, headers={"Location": cdr_url(settings, key)})


router = Router(path=PATH, route_handlers=[post_cdr], opt={"ocpi_module": "cdrs"})
