"""Sessions receiver interface (`09-sessions.md` §3): PUT, PATCH and GET of client-owned Sessions.

`/ocpi/emsp/2.2.1/sessions/{country_code}/{party_id}/{session_id}`. The push rules (identity, PATCH as a
partial with `last_updated`) are receivers.pushes'; whether a PATCH's Session is known, whether a push is
stale or a retry, and the append rule of `charging_periods` are the pipeline's (it holds the state).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, Router, get, patch, put

from ocpi.identity import ObjectKey
from receivers.pushes import SESSION_PATCH, SESSION_PUT, Events, PushUrl, Segment, accept_push
from receivers.state import Stored
from receivers.transport import NotFound, ocpi_response

PATH = "/ocpi/emsp/2.2.1/sessions"
_URL = "/{country_code:str}/{party_id:str}/{session_id:str}"


@put(_URL)
async def put_session(request: Request[Any, Any, Any], country_code: Segment, party_id: Segment,
                      session_id: Segment, events: Events) -> Response[bytes]:
    """A new or replacing Session: the full object, its identity equal to the URL's."""
    await accept_push(request, events, SESSION_PUT, PushUrl(country_code, party_id, session_id))
    return ocpi_response()


@patch(_URL)
async def patch_session(request: Request[Any, Any, Any], country_code: Segment, party_id: Segment,
                        session_id: Segment, events: Events) -> Response[bytes]:
    """A partial Session: only changed fields, `last_updated` required, `charging_periods` appended later."""
    await accept_push(request, events, SESSION_PATCH, PushUrl(country_code, party_id, session_id))
    return ocpi_response()


@get(_URL)
async def get_session(country_code: Segment, party_id: Segment, session_id: Segment,
                      stored: Stored) -> Response[bytes]:
    """The Session as we hold it (the owner checks its copy); 404 with 2000 when we hold none."""
    key = ObjectKey(country_code, party_id, session_id)
    session = await stored.session(key)
    if session is None:
        raise NotFound(f"Session {key} is not known here")
    return ocpi_response(session)


router = Router(path=PATH, route_handlers=[put_session, patch_session, get_session],
                opt={"ocpi_module": "sessions"})
