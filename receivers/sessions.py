"""Sessions receiver interface (`09-sessions.md` §3): PUT and PATCH of client-owned Sessions."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, Router, patch, put

from ocpi.identity import ObjectKey
from ocpi.model import Session, SessionPatch
from receivers.auth import require_owner
from receivers.publishing import EventPublisher, body_identity_mismatch
from receivers.transport import InvalidParameters, decode_body, ocpi_response

_URL = "/{country_code:str}/{party_id:str}/{session_id:str}"


@put(_URL)
async def put_session(request: Request[Any, Any, Any], country_code: str, party_id: str, session_id: str,
                      events: EventPublisher) -> Response[bytes]:
    """A new or replacing Session: the full object, its identity equal to the URL's."""
    partner = request.state.partner
    require_owner(partner, country_code, party_id)
    decoded = decode_body(await request.body(), Session, partner.profile)
    mismatch = body_identity_mismatch(decoded.value, country_code=country_code, party_id=party_id, id=session_id)
    if mismatch:
        raise InvalidParameters(mismatch)
    await events.publish_push(request, module="sessions", operation="PUT", level="SESSION",
                              key=ObjectKey(country_code, party_id, session_id), decoded=decoded,
                              payload_type="Session")
    return ocpi_response()


@patch(_URL)
async def patch_session(request: Request[Any, Any, Any], country_code: str, party_id: str, session_id: str,
                        events: EventPublisher) -> Response[bytes]:
    """A partial Session: only changed fields, `last_updated` required, `charging_periods` appended later."""
    partner = request.state.partner
    require_owner(partner, country_code, party_id)
    decoded = decode_body(await request.body(), SessionPatch, partner.profile)
    mismatch = body_identity_mismatch(decoded.value, country_code=country_code, party_id=party_id, id=session_id)
    if mismatch:
        raise InvalidParameters(mismatch)
    await events.publish_push(request, module="sessions", operation="PATCH", level="SESSION",
                              key=ObjectKey(country_code, party_id, session_id), decoded=decoded,
                              payload_type="SessionPatch")
    return ocpi_response()


router = Router(path="/ocpi/emsp/2.2.1/sessions", route_handlers=[put_session, patch_session],
                opt={"ocpi_module": "sessions"})
