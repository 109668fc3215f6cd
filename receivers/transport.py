"""The OCPI transport layer, attached once to the app: envelope, status exceptions, ids and routing headers.

Every response, errors included (404, 405, malformed JSON, too large, unexpected exceptions), is an OCPI
envelope (`04-transport-format.md` §5) with the HTTP status the spec assigns (`05-status-codes.md`).
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import Message, Scope

from ocpi.compat import CompatProfile
from ocpi.datetime import format_datetime
from ocpi.decode import Decoded, OcpiJsonError, OcpiValidationError, decode
from ocpi.status import OcpiStatus

T = TypeVar("T")

log = logging.getLogger(__name__)

JSON = "application/json"


class OcpiEnvelope(msgspec.Struct, omit_defaults=True):
    """The OCPI response envelope; `data` and `status_message` are left out when unset."""

    status_code: int
    timestamp: str
    status_message: str | msgspec.UnsetType = msgspec.UNSET
    data: Any = msgspec.UNSET


_encoder = msgspec.json.Encoder(decimal_format="number")


def envelope_bytes(status: int, *, message: str | None = None, data: Any = msgspec.UNSET) -> bytes:
    return _encoder.encode(OcpiEnvelope(
        status_code=int(status),
        timestamp=format_datetime(datetime.now(UTC)),
        status_message=message if message is not None else msgspec.UNSET,
        data=data,
    ))


def ocpi_response(data: Any = msgspec.UNSET, *, status: int = OcpiStatus.SUCCESS, http_status: int = 200,
                  message: str | None = None, headers: dict[str, str] | None = None) -> Response[bytes]:
    """An OCPI envelope response (push answers leave `data` out, per the d2 note)."""
    return Response(envelope_bytes(status, message=message, data=data), status_code=http_status,
                    media_type=JSON, headers=headers)


class OcpiError(Exception):
    """An OCPI error answered with an envelope: OCPI status code, HTTP status, message, optional debug data."""

    ocpi_status: int = OcpiStatus.CLIENT_ERROR
    http_status: int = 400

    def __init__(self, message: str, *, ocpi_status: int | None = None, http_status: int | None = None,
                 data: Any = msgspec.UNSET) -> None:
        super().__init__(message)
        self.message = message
        if ocpi_status is not None:
            self.ocpi_status = ocpi_status
        if http_status is not None:
            self.http_status = http_status
        self.data = data


class InvalidParameters(OcpiError):
    """2001: a field is missing or invalid; the message names it by JSON path.

    HTTP 200: the JSON was parsed and reached the OCPI layer, where the spec forbids an HTTP error
    (`05-status-codes.md` §2; 400 is kept for bodies that are not JSON). Clients read `status_code`.
    """

    ocpi_status = OcpiStatus.INVALID_PARAMETERS
    http_status = 200


class MalformedJson(OcpiError):
    """The body is not JSON: HTTP 400 (MUST), OCPI 2001."""

    ocpi_status = OcpiStatus.INVALID_PARAMETERS
    http_status = 400


class Unauthorized(OcpiError):
    """Missing or unknown token, or Token A outside versions/credentials: HTTP 401."""

    ocpi_status = OcpiStatus.CLIENT_ERROR
    http_status = 401


class NotFound(OcpiError):
    """An unknown object, or a party the caller does not own (404 hides it)."""

    ocpi_status = OcpiStatus.CLIENT_ERROR
    http_status = 404


class UnknownLocation(NotFound):
    ocpi_status = OcpiStatus.UNKNOWN_LOCATION


class MethodNotAllowed(OcpiError):
    """Credentials misuse (POST when registered, PUT/DELETE when not): HTTP 405 (MUST)."""

    ocpi_status = OcpiStatus.CLIENT_ERROR
    http_status = 405


class ServerError(OcpiError):
    """3000: we could not do it (e.g. the broker did not acknowledge); never a false success."""

    ocpi_status = OcpiStatus.SERVER_ERROR
    http_status = 500


def handle_ocpi_error(request: Request[Any, Any, Any], exc: OcpiError) -> Response[bytes]:
    return ocpi_response(exc.data, status=exc.ocpi_status, http_status=exc.http_status, message=exc.message)


_HTTP_TO_OCPI = {400: OcpiStatus.INVALID_PARAMETERS, 413: OcpiStatus.INVALID_PARAMETERS}


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Framework errors (unknown path, wrong method, body too large ...) as envelopes, same HTTP status."""
    status = exc.status_code
    ocpi_status = _HTTP_TO_OCPI.get(status, OcpiStatus.SERVER_ERROR if status >= 500 else OcpiStatus.CLIENT_ERROR)
    messages = {404: f"no OCPI endpoint at {request.url.path}",
                405: f"method {request.method} is not supported on {request.url.path}",
                413: "request body too large"}
    headers = {"Allow": exc.headers["Allow"]} if exc.headers and "Allow" in exc.headers else None
    return ocpi_response(status=ocpi_status, http_status=status, message=messages.get(status, exc.detail),
                         headers=headers)


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Anything else: logged with its traceback, answered 3000 without one."""
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return ocpi_response(status=OcpiStatus.SERVER_ERROR, http_status=500, message="internal server error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    OcpiError: handle_ocpi_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}


# --- X-Request-ID / X-Correlation-ID and routing headers -------------------------------------------------

_ID_STATE_KEY = "ocpi_ids"
_ROUTING_STATE_KEY = "ocpi_routing"
_MAX_ID_LENGTH = 255


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _usable_id(value: str | None) -> bool:
    return bool(value) and len(value) <= _MAX_ID_LENGTH and value.isprintable()  # type: ignore[arg-type]


def message_ids(scope: Scope) -> tuple[str, str]:
    """(X-Request-ID, X-Correlation-ID) of this request; generated when absent (the spec gives no error)."""
    state = scope.setdefault("state", {})
    ids = state.get(_ID_STATE_KEY)
    if ids is None:
        request_id = _header(scope, b"x-request-id")
        correlation_id = _header(scope, b"x-correlation-id")
        ids = (request_id if _usable_id(request_id) else str(uuid.uuid4()),
               correlation_id if _usable_id(correlation_id) else str(uuid.uuid4()))
        state[_ID_STATE_KEY] = ids
    return ids  # type: ignore[no-any-return]


class RoutingHeaders(msgspec.Struct, frozen=True):
    from_country_code: str | None = None
    from_party_id: str | None = None
    to_country_code: str | None = None
    to_party_id: str | None = None

    @property
    def present(self) -> bool:
        return any((self.from_country_code, self.from_party_id, self.to_country_code, self.to_party_id))


_COUNTRY = re.compile(r"^[A-Za-z]{2}$")
_PARTY = re.compile(r"^[A-Za-z0-9]{3}$")
_ROUTING_NAMES = (("from_country_code", b"ocpi-from-country-code", _COUNTRY),
                  ("from_party_id", b"ocpi-from-party-id", _PARTY),
                  ("to_country_code", b"ocpi-to-country-code", _COUNTRY),
                  ("to_party_id", b"ocpi-to-party-id", _PARTY))


def routing_headers(scope: Scope) -> RoutingHeaders:
    """The request's OCPI-from/to-* headers, validated (CiString(2) country, CiString(3) party); 2001 if bad."""
    values: dict[str, str] = {}
    for attr, name, pattern in _ROUTING_NAMES:
        raw = _header(scope, name)
        if raw is None:
            continue
        if not pattern.match(raw):
            raise InvalidParameters(f"header {name.decode()} is not a valid {'country code' if pattern is _COUNTRY else 'party id'}: {raw!r}")
        values[attr] = raw
    if ("from_country_code" in values) != ("from_party_id" in values) or \
            ("to_country_code" in values) != ("to_party_id" in values):
        raise InvalidParameters("routing headers come in pairs: OCPI-*-country-code with OCPI-*-party-id")
    routing = RoutingHeaders(**values)
    scope.setdefault("state", {})[_ROUTING_STATE_KEY] = routing
    return routing


async def echo_headers(message: Message, scope: Scope) -> None:
    """before_send hook: echo the message ids on every response, swap routing headers on functional modules."""
    if message["type"] != "http.response.start":
        return
    request_id, correlation_id = message_ids(scope)
    headers = list(message.get("headers", []))
    headers.append((b"x-request-id", request_id.encode("latin-1")))
    headers.append((b"x-correlation-id", correlation_id.encode("latin-1")))
    routing: RoutingHeaders | None = scope.get("state", {}).get(_ROUTING_STATE_KEY)
    if routing is not None and routing.present:
        # The answer goes back to whoever sent it: to := request's from, from := request's to.
        for name, value in ((b"ocpi-to-country-code", routing.from_country_code),
                            (b"ocpi-to-party-id", routing.from_party_id),
                            (b"ocpi-from-country-code", routing.to_country_code),
                            (b"ocpi-from-party-id", routing.to_party_id)):
            if value:
                headers.append((name, value.encode("latin-1")))
    message["headers"] = headers


# --- request bodies ---------------------------------------------------------------------------------------

def decode_body(body: bytes, model: type[T], profile: CompatProfile | None) -> Decoded[T]:
    """Decode and validate a push body: not JSON → HTTP 400; invalid → 2001 naming the field's JSON path."""
    try:
        return decode(body, model, profile=profile)
    except OcpiJsonError as exc:
        raise MalformedJson(f"body is not valid JSON: {exc}") from None
    except OcpiValidationError as exc:
        raise InvalidParameters(f"{exc.path}: {exc.reason}", data={"path": exc.path, "reason": exc.reason}) from None
