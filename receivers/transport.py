"""The OCPI transport layer, attached once to the app: envelope, status exceptions, ids and routing headers.

Every response, errors included (404, 405, malformed JSON, too large, unexpected exceptions), is an OCPI
envelope (`04-transport-format.md` §5) with the HTTP status the spec assigns (`05-status-codes.md`); the answer
to a HEAD is its GET's, status and headers, without the envelope (head_as_get).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import HTTPScope, Message, Scope, Send
from litestar.utils import normalize_path

from ocpi.canonical import to_ocpi_json
from ocpi.compat import CompatProfile, relax_datetime
from ocpi.datetime import (
    InvalidDateTime,
    format_datetime,
    parse_datetime,
)
from ocpi.decode import UNPARSABLE, Decoded, OcpiJsonError, OcpiValidationError, decode, unparsable_reason
from ocpi.identity import ci_equal, ci_normalize
from ocpi.status import OcpiStatus
from ocpi.types import CI_STRING_PATTERN, float_hook

T = TypeVar("T")

log = logging.getLogger(__name__)

JSON = "application/json"
MODULE_OPT = "ocpi_module"  # the route handler opt naming a handler's OCPI module (its router declares it)
# Configuration modules are not routed: routing headers SHALL NOT be used with them (04 §7).
CONFIGURATION_MODULES = frozenset({"versions", "credentials", "hubclientinfo"})


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
    """An OCPI error answered with an envelope: OCPI status code, HTTP status, message, optional debug data.

    Every status code of `05-status-codes.md` §4 has a typed subclass below (STATUS_EXCEPTIONS). HTTP
    statuses: 400 only for a body that is not JSON (and for broken routing headers, a transport matter), 401
    for authentication, 404 for what does not exist or is hidden from the caller, 405 for credentials misuse,
    413 for a body that is too large, 500 when we failed internally; everything else reached the OCPI layer
    and is HTTP 200 with the code in the envelope (clients read `status_code` whatever the HTTP status).
    """

    ocpi_status: int = OcpiStatus.CLIENT_ERROR
    http_status: int = 400

    def __init__(self, message: str, *, ocpi_status: int | None = None, http_status: int | None = None,
                 data: Any = msgspec.UNSET, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if ocpi_status is not None:
            self.ocpi_status = ocpi_status
        if http_status is not None:
            self.http_status = http_status
        self.data = data
        self.headers = headers


class ClientError(OcpiError):
    """2000: a generic client error (the request as a whole cannot be processed)."""

    ocpi_status = OcpiStatus.CLIENT_ERROR
    http_status = 400


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


class UnsupportedContentEncoding(OcpiError):
    """A body in a content coding (`Content-Encoding: gzip` ...): HTTP 415 with `Accept-Encoding: identity`
    (RFC 9110 §8.4, §15.5.16), OCPI 2001. We do not decode compressed bodies; read as JSON, such a body would be
    refused as malformed (misleading) or, if its label is wrong, read as something it says it is not."""

    ocpi_status = OcpiStatus.INVALID_PARAMETERS
    http_status = 415


class InvalidRoutingHeaders(OcpiError):
    """2001 with HTTP 400: OCPI-from-*/OCPI-to-* malformed, unpaired, missing where required, or naming a
    party the caller may not speak for / we do not host. The spec gives no code (digest ambiguity 17);
    headers are transport, so this is refused before the body is looked at."""

    ocpi_status = OcpiStatus.INVALID_PARAMETERS
    http_status = 400


class NotEnoughInformation(OcpiError):
    """2002: the request is valid but does not carry enough information (e.g. an authorization request)."""

    ocpi_status = OcpiStatus.NOT_ENOUGH_INFORMATION
    http_status = 200


class Unauthorized(OcpiError):
    """Missing or unknown token, or Token A outside versions/credentials: HTTP 401, with the challenge a 401 MUST
    carry (RFC 9110 §15.5.2): `WWW-Authenticate: Token`, OCPI's scheme (04 §2)."""

    ocpi_status = OcpiStatus.CLIENT_ERROR
    http_status = 401

    def __init__(self, message: str, *, ocpi_status: int | None = None, http_status: int | None = None,
                 data: Any = msgspec.UNSET, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, ocpi_status=ocpi_status, http_status=http_status, data=data,
                         headers={"WWW-Authenticate": "Token", **(headers or {})})


class NotFound(OcpiError):
    """An unknown object or endpoint: HTTP 404 (SHOULD for a GET of what does not exist)."""

    ocpi_status = OcpiStatus.CLIENT_ERROR
    http_status = 404


class ForeignParty(NotFound):
    """The URL's (or body's) owner is not a party the caller may act for: 404 hides it (04 §6.2), 2001."""

    ocpi_status = OcpiStatus.INVALID_PARAMETERS


class UnknownLocation(NotFound):
    """2003: the Location (or its EVSE/connector) is not known."""

    ocpi_status = OcpiStatus.UNKNOWN_LOCATION


class UnknownToken(NotFound):
    """2004: the (driver) Token is not known."""

    ocpi_status = OcpiStatus.UNKNOWN_TOKEN


class MethodNotAllowed(OcpiError):
    """HTTP 405: credentials misuse (POST when registered, PUT/DELETE when not: MUST), or OPTIONS."""

    ocpi_status = OcpiStatus.CLIENT_ERROR
    http_status = 405


class ServerError(OcpiError):
    """3000: we could not do it (e.g. the broker did not acknowledge); never a false success."""

    ocpi_status = OcpiStatus.SERVER_ERROR
    http_status = 500


class UnableToUseClientApi(OcpiError):
    """3001: during a credentials POST/PUT our calls to the client's versions/version details failed."""

    ocpi_status = OcpiStatus.UNABLE_TO_USE_CLIENT_API
    http_status = 200


class UnsupportedVersion(OcpiError):
    """3002: no version in common with the client (we speak 2.2.1)."""

    ocpi_status = OcpiStatus.UNSUPPORTED_VERSION
    http_status = 200


class NoMatchingEndpoints(OcpiError):
    """3003: the client lacks the endpoints we need (credentials, and one module in common)."""

    ocpi_status = OcpiStatus.NO_MATCHING_ENDPOINTS
    http_status = 200


class HubError(OcpiError):
    """4000: a generic Hub error. The 4xxx codes are a Hub's own routing failures; we define them so a
    deployment acting as a Hub (and our tests) raise them like every other code. HTTP 200: OCPI layer."""

    ocpi_status = OcpiStatus.HUB_ERROR
    http_status = 200


class UnknownReceiver(HubError):
    """4001: the OCPI-to-* address is unknown to the Hub."""

    ocpi_status = OcpiStatus.UNKNOWN_RECEIVER


class ForwardTimeout(HubError):
    """4002: forwarded, but the receiver did not answer in time."""

    ocpi_status = OcpiStatus.TIMEOUT_ON_FORWARDED_REQUEST


class ConnectionProblem(HubError):
    """4003: the receiving party is not connected."""

    ocpi_status = OcpiStatus.CONNECTION_PROBLEM


# The typed exception of every non-success status code; a test checks that the table covers OcpiStatus.
STATUS_EXCEPTIONS: dict[OcpiStatus, type[OcpiError]] = {
    OcpiStatus.CLIENT_ERROR: ClientError,
    OcpiStatus.INVALID_PARAMETERS: InvalidParameters,
    OcpiStatus.NOT_ENOUGH_INFORMATION: NotEnoughInformation,
    OcpiStatus.UNKNOWN_LOCATION: UnknownLocation,
    OcpiStatus.UNKNOWN_TOKEN: UnknownToken,
    OcpiStatus.SERVER_ERROR: ServerError,
    OcpiStatus.UNABLE_TO_USE_CLIENT_API: UnableToUseClientApi,
    OcpiStatus.UNSUPPORTED_VERSION: UnsupportedVersion,
    OcpiStatus.NO_MATCHING_ENDPOINTS: NoMatchingEndpoints,
    OcpiStatus.HUB_ERROR: HubError,
    OcpiStatus.UNKNOWN_RECEIVER: UnknownReceiver,
    OcpiStatus.TIMEOUT_ON_FORWARDED_REQUEST: ForwardTimeout,
    OcpiStatus.CONNECTION_PROBLEM: ConnectionProblem,
}


REJECTIONS_STATE_KEY = "rejections"  # app.state attribute of the receivers.rejections.RejectionRecorder


def note_rejection(request: Request[Any, Any, Any], *, ocpi_status: int, http_status: int, message: str,
                   data: Any = None) -> None:
    """Every error answer passes here: the app's rejection recorder (if any) keeps the refused pushes.

    Fire-and-forget (the recorder only queues), so the answer is neither delayed nor changed.
    """
    recorder = getattr(request.app.state, REJECTIONS_STATE_KEY, None)
    if recorder is not None:
        recorder.observe(request, ocpi_status=int(ocpi_status), http_status=http_status, message=message,
                         data=data)


def handle_ocpi_error(request: Request[Any, Any, Any], exc: OcpiError) -> Response[bytes]:
    note_rejection(request, ocpi_status=exc.ocpi_status, http_status=exc.http_status, message=exc.message,
                   data=exc.data)
    return ocpi_response(exc.data, status=exc.ocpi_status, http_status=exc.http_status, message=exc.message,
                         headers=exc.headers)


def request_path(request: Request[Any, Any, Any]) -> str:
    """The routed path of a request, for messages, logs and rejection records. Not `request.url.path`: building
    `request.url` parses the Host header, and raises ValueError on a port that is no port (`Host: h:99999`),
    which granian passes on as sent; an error answer must not depend on it."""
    scope = request.scope
    return str(scope.get("root_path", "")) + scope["path"]


# Litestar's 500 when the client disconnects while it reads the body (litestar.connection.Request.stream).
_CLIENT_DISCONNECTED = "client disconnected prematurely"
_HTTP_TO_OCPI = {400: OcpiStatus.INVALID_PARAMETERS, 413: OcpiStatus.INVALID_PARAMETERS}


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Framework errors (unknown path, wrong method, body too large ...) as envelopes, same HTTP status."""
    status = exc.status_code
    if status >= 500 and exc.detail == _CLIENT_DISCONNECTED:
        # The partner gave up mid-body (its timeout, a dropped connection): nobody reads this answer, but the
        # rejection record and the log must not call it our internal error.
        message = "the client disconnected before its request body was complete"
        log.warning("%s %s: %s", request.method, request_path(request), message)
        note_rejection(request, ocpi_status=OcpiStatus.CLIENT_ERROR, http_status=400, message=message)
        return ocpi_response(status=OcpiStatus.CLIENT_ERROR, http_status=400, message=message)
    fallback = OcpiStatus.SERVER_ERROR if status >= 500 else OcpiStatus.CLIENT_ERROR
    ocpi_status = _HTTP_TO_OCPI.get(status, fallback)
    path = request_path(request)
    messages = {404: f"no OCPI endpoint at {path}",
                405: f"method {request.method} is not supported on {path}",
                413: "request body too large"}
    message = messages.get(status) or ("internal server error" if status >= 500 else exc.detail)
    if status >= 500:
        log.error("framework error %s on %s %s: %s", status, request.method, path, exc.detail)
    # Litestar names the header `allow` (lower case); 405 MUST carry it (RFC 9110).
    allow = next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"), None)
    if allow:
        # Litestar lists its automatic OPTIONS handler, which the guard refuses (OCPI has no OPTIONS).
        methods = sorted({m.strip() for m in allow.split(",")} - {"", "OPTIONS"})
        if status == 405 and methods:
            # No handler was matched, so nothing tells the response which module it answers for: ask the route.
            _note_module(request.scope, _route_module(request, methods))
        allow = allowed_methods(methods)
    note_rejection(request, ocpi_status=ocpi_status, http_status=status, message=message)
    return ocpi_response(status=ocpi_status, http_status=status, message=message,
                         headers={"Allow": allow} if allow else None)


def _route_module(request: Request[Any, Any, Any], methods: list[str]) -> str | None:
    """The OCPI module of the route at this request's path, found through one of the methods it has."""
    for method in methods:
        try:
            handler = request.app.asgi_router.handle_routing(path=normalize_path(request.scope["path"]),
                                                             method=method)[1]
        except (NotFoundException, MethodNotAllowedException):
            continue
        module = handler.opt.get(MODULE_OPT)
        return module if isinstance(module, str) else None
    return None


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Anything else: logged with its traceback, answered 3000 without one."""
    log.exception("unexpected error on %s %s", request.method, request_path(request))
    note_rejection(request, ocpi_status=OcpiStatus.SERVER_ERROR, http_status=500, message="internal server error")
    return ocpi_response(status=OcpiStatus.SERVER_ERROR, http_status=500, message="internal server error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    OcpiError: handle_ocpi_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}


async def refuse_content_coding(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """App guard (after authentication): a request whose `Content-Encoding` names any coding but `identity` is
    refused (UnsupportedContentEncoding), whatever the module; its body is never read. Async though it awaits
    nothing: Litestar runs a sync guard in a thread of the pool, which GETs waiting on a store that does not answer
    may all hold (receivers.state), and every push waited for one."""
    codings = {coding.strip().lower() for value in connection.headers.getall("content-encoding", [])
               for coding in value.split(",")} - {"", "identity"}
    if codings:
        raise UnsupportedContentEncoding(
            f"Content-Encoding {', '.join(sorted(codings))} is not supported: send the body uncompressed",
            headers={"Accept-Encoding": "identity"})


# --- HEAD ------------------------------------------------------------------------------------------------

def head_as_get(scope: HTTPScope, send: Send) -> Send:
    """A HEAD request, answered as its GET without the content (RFC 9110 §9.1: a general-purpose server MUST
    support HEAD wherever it supports GET; §9.3.2: the same status and header fields, Content-Length included).

    The request is routed, authenticated and answered as a GET (OCPI's GETs only read); the returned `send` drops
    every body chunk but an empty last one. Litestar has no HEAD beside GET: a HEAD was a 405 everywhere, and its
    envelope went out as content, which a HEAD answer must not have."""
    scope["method"] = "GET"

    async def send_without_content(message: Message) -> None:
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(message)

    return send_without_content


def allowed_methods(methods: Iterable[str]) -> str:
    """An Allow header value: the methods, with HEAD wherever GET is (head_as_get), without OPTIONS (refused)."""
    names = {method.strip().upper() for method in methods} - {"", "OPTIONS"}
    if "GET" in names:
        names.add("HEAD")
    return ", ".join(sorted(names))


# --- X-Request-ID / X-Correlation-ID and routing headers -------------------------------------------------

_ID_STATE_KEY = "ocpi_ids"
_ROUTING_STATE_KEY = "ocpi_routing"
_RESPONSE_ROUTING_STATE_KEY = "ocpi_response_routing"
_MODULE_STATE_KEY = "ocpi_module"  # the module of a response Litestar gave without a handler (405)
_MAX_ID_LENGTH = 255


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


# What a header value may hold (RFC 9110 §5.5: visible ASCII, space, tab, and obs-text, the bytes beyond ASCII, as the
# latin-1 text they decode to): such an id is echoed byte for byte (04 §11: the same value). `str.isprintable`
# refused a tab and the bytes 0x80-0xA0 and 0xAD, which many UTF-8 characters hold (`€` is E2 82 AC).
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]+")


def _usable_id(value: str | None) -> bool:
    return value is not None and 0 < len(value) <= _MAX_ID_LENGTH and _FIELD_VALUE.fullmatch(value) is not None


def message_ids(scope: Scope) -> tuple[str, str]:
    """(X-Request-ID, X-Correlation-ID) of this request; generated when absent (the spec gives no error)."""
    state = scope.setdefault("state", {})
    ids: tuple[str, str] | None = state.get(_ID_STATE_KEY)
    if ids is None:
        request_id = _header(scope, b"x-request-id")
        correlation_id = _header(scope, b"x-correlation-id")
        ids = (request_id if request_id is not None and _usable_id(request_id) else str(uuid.uuid4()),
               correlation_id if correlation_id is not None and _usable_id(correlation_id)
               else str(uuid.uuid4()))
        state[_ID_STATE_KEY] = ids
    return ids


Party = tuple[str, str]  # (country_code, party_id)


class RoutingHeaders(msgspec.Struct, frozen=True):
    from_country_code: str | None = None
    from_party_id: str | None = None
    to_country_code: str | None = None
    to_party_id: str | None = None

    @property
    def present(self) -> bool:
        return any((self.from_country_code, self.from_party_id, self.to_country_code, self.to_party_id))

    @property
    def sender(self) -> Party | None:
        if self.from_country_code and self.from_party_id:
            return self.from_country_code, self.from_party_id
        return None

    @property
    def receiver(self) -> Party | None:
        if self.to_country_code and self.to_party_id:
            return self.to_country_code, self.to_party_id
        return None


# The headers are CiString(2) and CiString(3) (04 §8), the types of CredentialsRole.country_code/party_id, so
# they can name every party a partner may register (the CiString pattern, at most that long; never empty).
COUNTRY_CODE_VALUE = re.compile(CI_STRING_PATTERN.replace("]*", "]{1,2}"))
PARTY_ID_VALUE = re.compile(CI_STRING_PATTERN.replace("]*", "]{1,3}"))
_ROUTING_NAMES = (("from_country_code", b"ocpi-from-country-code", COUNTRY_CODE_VALUE),
                  ("from_party_id", b"ocpi-from-party-id", PARTY_ID_VALUE),
                  ("to_country_code", b"ocpi-to-country-code", COUNTRY_CODE_VALUE),
                  ("to_party_id", b"ocpi-to-party-id", PARTY_ID_VALUE))


def routing_headers(scope: Scope) -> RoutingHeaders:
    """The request's OCPI-from/to-* headers, validated: country code CiString(2), party id CiString(3) (printable
    ASCII, not empty), each side complete or absent, each header one value (repeated lines must agree). Broken
    headers raise InvalidRoutingHeaders."""
    values: dict[str, str] = {}
    for attr, name, pattern in _ROUTING_NAMES:
        given = [value.decode("latin-1") for key, value in scope.get("headers", ()) if key.lower() == name]
        if not given:
            continue
        if len({ci_normalize(value) for value in given}) > 1:
            # Two parties at once (granian passes repeated lines apart): taking the first made the answer depend
            # on the order of the lines. The same value repeated says one thing.
            raise InvalidRoutingHeaders(f"header {name.decode()} is given more than once with different values: "
                                        f"{', '.join(repr(value[:40]) for value in given[:4])}")
        raw = given[0]
        if not pattern.match(raw):
            what = "country code (CiString(2))" if pattern is COUNTRY_CODE_VALUE else "party id (CiString(3))"
            raise InvalidRoutingHeaders(f"header {name.decode()} is not a valid {what}: {raw[:40]!r}")
        values[attr] = raw
    if ("from_country_code" in values) != ("from_party_id" in values) or \
            ("to_country_code" in values) != ("to_party_id" in values):
        raise InvalidRoutingHeaders("routing headers come in pairs: OCPI-*-country-code with OCPI-*-party-id")
    routing = RoutingHeaders(**values)
    scope.setdefault("state", {})[_ROUTING_STATE_KEY] = routing
    return routing


def set_response_routing(scope: Scope, *, sender: Party | None, receiver: Party | None) -> None:
    """The routing headers of this request's response (set by the guard once it knows who answers whom)."""
    scope.setdefault("state", {})[_RESPONSE_ROUTING_STATE_KEY] = (sender, receiver)


def _note_module(scope: Scope, module: str | None) -> None:
    scope.setdefault("state", {})[_MODULE_STATE_KEY] = module


def _functional_module(scope: Scope) -> bool:
    """Whether this request addressed a functional (routed) module: its handler's, or the 405 route's."""
    handler = scope.get("route_handler")
    module = handler.opt.get(MODULE_OPT) if handler is not None else scope.get("state", {}).get(_MODULE_STATE_KEY)
    return bool(module) and module not in CONFIGURATION_MODULES


def _response_routing(scope: Scope) -> tuple[Party | None, Party | None]:
    state = scope.get("state", {})
    decided = state.get(_RESPONSE_ROUTING_STATE_KEY)
    if decided is not None:
        return decided
    routing: RoutingHeaders | None = state.get(_ROUTING_STATE_KEY)
    if routing is None and _functional_module(scope):
        # Answered before the guard read them (401, OPTIONS, a method the route does not have): a functional
        # module's response still carries them (04 §8.1), swapped; broken ones cannot be echoed.
        try:
            routing = routing_headers(scope)
        except InvalidRoutingHeaders:
            return None, None
    if routing is None or not routing.present:
        return None, None
    # The answer goes back to whoever sent it (to := request's from) and is ours (04 §8.2): from := us, whatever
    # party the request's OCPI-to-* named (not checked yet) or if it named none (open routing).
    party = scope["litestar_app"].state.settings.party
    return ours_as_named((party.country_code, party.party_id), routing.receiver), routing.sender


def ours_as_named(ours: Party, named: Party | None) -> Party:
    """The party we host (`ours`) as the sender of an answer: spelled as the request's OCPI-to-* (`named`) spells
    it when that names us, ours otherwise (04 §8.2: the answer is ours, whatever party the request named)."""
    if named is not None and ci_equal(named[0], ours[0]) and ci_equal(named[1], ours[1]):
        return named
    return ours


async def echo_headers(message: Message, scope: Scope) -> None:
    """before_send hook: echo the message ids on every response; routing headers on functional modules."""
    if message["type"] != "http.response.start":
        return
    request_id, correlation_id = message_ids(scope)
    headers = list(message.get("headers", []))
    headers.append((b"x-request-id", request_id.encode("latin-1")))
    headers.append((b"x-correlation-id", correlation_id.encode("latin-1")))
    sender, receiver = _response_routing(scope)
    for (country_name, party_name), party in (((b"ocpi-from-country-code", b"ocpi-from-party-id"), sender),
                                              ((b"ocpi-to-country-code", b"ocpi-to-party-id"), receiver)):
        if party is not None:
            headers.append((country_name, party[0].encode("latin-1")))
            headers.append((party_name, party[1].encode("latin-1")))
    message["headers"] = headers


# --- request bodies and values ----------------------------------------------------------------------------

def require_utf8(body: bytes) -> None:
    """A body that is not UTF-8 is not JSON (RFC 8259 §8.1): MalformedJson, HTTP 400. The decoders read the UTF-8 of
    the strings they decode only: bytes that are no UTF-8 in a field they skip (an unknown field, a `Raw` value)
    passed unread, and such a body was answered as JSON (1000, or a 2001 naming another field)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJson(f"body is not valid JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None


_JSON_TREE = msgspec.json.Decoder(float_hook=float_hook)  # untyped: syntax only, numbers exact


def require_json(body: bytes) -> None:
    """A body that is not JSON: MalformedJson, HTTP 400 (MUST, 05 §2). For a refusal found before the body is decoded
    (an id in the URL): the transport layer ends once the body is parsed (05 §1), so that 2001 (HTTP 200, the OCPI
    layer) may only answer a body that is JSON."""
    require_utf8(body)
    try:
        _JSON_TREE.decode(body)
    except msgspec.ValidationError:  # JSON, with a number beyond any range: the decoders say so (2001)
        return
    except UNPARSABLE as exc:
        raise MalformedJson(f"body is not valid JSON: {unparsable_reason(exc)}") from None


def decode_body(body: bytes, model: type[T], profile: CompatProfile | None) -> Decoded[T]:
    """Decode and validate a push body: not JSON → HTTP 400; invalid → 2001 naming the field's JSON path."""
    require_utf8(body)
    try:
        return decode(body, model, profile=profile)
    except OcpiJsonError as exc:
        raise MalformedJson(f"body is not valid JSON: {exc}") from None
    except OcpiValidationError as exc:
        raise InvalidParameters(f"{exc.path}: {exc.reason}",
                                data={"path": exc.path, "reason": exc.reason}) from None


def parse_timestamp(value: str, profile: CompatProfile | None = None, *, what: str = "timestamp") -> datetime:
    """An OCPI DateTime from a header, query parameter or envelope: UTC, `Z` optional.

    The partner's DateTime relaxations apply as they do in bodies (`ocpi.compat`): a numeric offset (even
    `+00:00`, invalid in 2.2.1) under DATETIME_OFFSET, normalised to UTC; a fraction too long for 25 characters
    under DATETIME_EXCESS_PRECISION, truncated. Anything else raises InvalidParameters (2001).
    """
    fixed, _ = relax_datetime(value, profile.relaxations if profile is not None else frozenset())
    try:
        return parse_datetime(fixed)
    except InvalidDateTime as exc:
        raise InvalidParameters(f"{what}: {exc.reason}: {value[:40]!r}") from None


def ocpi_data(value: Any) -> msgspec.Raw:
    """An OCPI object as envelope `data` in wire form: DateTimes with Z, exact numbers, nulls left out."""
    return msgspec.Raw(to_ocpi_json(value))
