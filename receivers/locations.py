"""Locations receiver interface (`08-locations.md` §3): PUT, PATCH and GET of client-owned Locations, EVSEs
and Connectors.

`/ocpi/emsp/2.2.1/locations/{country_code}/{party_id}/{location_id}[/{evse_uid}[/{connector_id}]]`; the URL's
depth chooses the object: a Location, an EVSE of it, or a Connector of one of its EVSEs. The push rules
(identity, level, PATCH as a partial, Kafka key = the Location's identity) are receivers.pushes'.

Sub-object pushes for a Location we do not hold are acknowledged once Kafka has them: the receiver does not
read state to decide (see receivers.pushes for why); the pipeline parks or flags them. Parent `last_updated`
propagation (08 §3.3) is the pipeline's merge (ocpi.patch). GET answers what the pipeline stored; an unknown
Location, EVSE or Connector is HTTP 404 with 2003 (Unknown Location).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, Router, get, patch, put

from receivers.pushes import (
    CONNECTOR_PATCH,
    CONNECTOR_PUT,
    EVSE_PATCH,
    EVSE_PUT,
    LOCATION_PATCH,
    LOCATION_PUT,
    Events,
    PushUrl,
    Segment,
    accept_push,
)
from receivers.state import StateReader, Stored, connector_of, evse_of
from receivers.transport import UnknownLocation, ocpi_response

PATH = "/ocpi/emsp/2.2.1/locations"
_LOCATION = "/{country_code:str}/{party_id:str}/{location_id:str}"
_EVSE = _LOCATION + "/{evse_uid:str}"
_CONNECTOR = _EVSE + "/{connector_id:str}"


@put(_LOCATION)
async def put_location(request: Request[Any, Any, Any], country_code: Segment, party_id: Segment,
                       location_id: Segment, events: Events) -> Response[bytes]:
    """A new or replacing Location, EVSEs and Connectors included."""
    await accept_push(request, events, LOCATION_PUT, PushUrl(country_code, party_id, location_id))
    return ocpi_response()


@put(_EVSE)
async def put_evse(request: Request[Any, Any, Any], country_code: Segment, party_id: Segment,
                   location_id: Segment, evse_uid: Segment, events: Events) -> Response[bytes]:
    """A new or replacing EVSE of the Location (an unknown uid adds it)."""
    await accept_push(request, events, EVSE_PUT, PushUrl(country_code, party_id, location_id, evse_uid))
    return ocpi_response()


@put(_CONNECTOR)
async def put_connector(request: Request[Any, Any, Any], country_code: Segment, party_id: Segment,
                        location_id: Segment, evse_uid: Segment, connector_id: Segment,
                        events: Events) -> Response[bytes]:
    """A new or replacing Connector of the EVSE."""
    url = PushUrl(country_code, party_id, location_id, evse_uid, connector_id)
    await accept_push(request, events, CONNECTOR_PUT, url)
    return ocpi_response()


@patch(_LOCATION)
async def patch_location(request: Request[Any, Any, Any], country_code: Segment, party_id: Segment,
                         location_id: Segment, events: Events) -> Response[bytes]:
    """Changed Location fields (fields replace, `evses` included), `last_updated` required."""
    await accept_push(request, events, LOCATION_PATCH, PushUrl(country_code, party_id, location_id))
    return ocpi_response()


@patch(_EVSE)
async def patch_evse(request: Request[Any, Any, Any], country_code: Segment, party_id: Segment,
                     location_id: Segment, evse_uid: Segment, events: Events) -> Response[bytes]:
    """Changed EVSE fields, typically `status`; `last_updated` required."""
    await accept_push(request, events, EVSE_PATCH, PushUrl(country_code, party_id, location_id, evse_uid))
    return ocpi_response()


@patch(_CONNECTOR)
async def patch_connector(request: Request[Any, Any, Any], country_code: Segment, party_id: Segment,
                          location_id: Segment, evse_uid: Segment, connector_id: Segment,
                          events: Events) -> Response[bytes]:
    """Changed Connector fields, e.g. `tariff_ids`; `last_updated` required."""
    url = PushUrl(country_code, party_id, location_id, evse_uid, connector_id)
    await accept_push(request, events, CONNECTOR_PATCH, url)
    return ocpi_response()


async def _stored_location(stored: StateReader, url: PushUrl) -> msgspec.Raw:
    location = await stored.location(url.key)
    if location is None:
        raise UnknownLocation(f"Location {url.key} is not known here")
    return location


async def _stored_evse(stored: StateReader, url: PushUrl) -> msgspec.Raw:
    assert url.evse_uid is not None
    evse = evse_of(await _stored_location(stored, url), url.evse_uid)
    if evse is None:
        raise UnknownLocation(f"Location {url.key} has no EVSE {url.evse_uid!r} here")
    return evse


@get(_LOCATION)
async def get_location(country_code: Segment, party_id: Segment, location_id: Segment,
                       stored: Stored) -> Response[bytes]:
    """The Location as we hold it, EVSEs and Connectors included."""
    return ocpi_response(await _stored_location(stored, PushUrl(country_code, party_id, location_id)))


@get(_EVSE)
async def get_evse(country_code: Segment, party_id: Segment, location_id: Segment, evse_uid: Segment,
                   stored: Stored) -> Response[bytes]:
    """One EVSE of a Location we hold."""
    return ocpi_response(await _stored_evse(stored, PushUrl(country_code, party_id, location_id, evse_uid)))


@get(_CONNECTOR)
async def get_connector(country_code: Segment, party_id: Segment, location_id: Segment, evse_uid: Segment,
                        connector_id: Segment, stored: Stored) -> Response[bytes]:
    """One Connector of an EVSE of a Location we hold."""
    url = PushUrl(country_code, party_id, location_id, evse_uid, connector_id)
    connector = connector_of(await _stored_evse(stored, url), connector_id)
    if connector is None:
        raise UnknownLocation(f"EVSE {evse_uid!r} of Location {url.key} has no Connector {connector_id!r} here")
    return ocpi_response(connector)


router = Router(path=PATH, route_handlers=[put_location, put_evse, put_connector, patch_location, patch_evse,
                                           patch_connector, get_location, get_evse, get_connector],
                opt={"ocpi_module": "locations"})
