"""Authentication (`Authorization: Token <base64>`) and party authorization, as one app-level Litestar guard.

Authentication (`04-transport-format.md` §2, `12-receiver-pitfalls.md` 1-2):
- missing, malformed or unknown token, or two different Authorization headers: HTTP 401 with an envelope;
- Token A only on versions and credentials (their routers opt in with `opt={"token_a": True}`); the Token A a
  registration spent is valid nowhere, but a credentials POST with it is answered 405 while the partner is
  registered (07 §2: the POST of a registered client);
- the raw, un-encoded token only for partners whose compatibility profile enables `RAW_TOKEN`;
- a suspended, unregistered or deleted partner is unknown (401).

Authorization on functional modules (every router with an `ocpi_module` other than versions/credentials):
routing headers are validated (transport.routing_headers) and checked against the caller, and the owner
named in the URL (`{country_code}/{party_id}`) must be a party the caller may act for. The rules:

1. Routing headers are required (all four) from a HUB partner and from a partner with more than one
   credentials role (04 §8.1); a single-role peer may leave them out (its party is implied by its token).
   When present, OCPI-to-* must name our own party (settings `OCPI_PARTY_*`), and OCPI-from-* must name one
   of the caller's credentials roles, except from a Hub, which relays for parties that are not in its
   roles (a Hub reports only itself, 07 §5); never our own party, from anyone. Broken routing headers: HTTP 400,
   2001.
2. The owner of the object (URL, or body for CDRs) must be one of the caller's credentials roles with the role
   CPO (Locations, Sessions and CDRs are a CPO's, 08/09/10 §1: a party the caller registered only as EMSP, NSP,
   NAP, SCSP, OTHER or HUB owns none, and may neither push nor read them), or, for a HUB partner, either
   a. the party named in OCPI-from-* (an addressed or open-routed request the Hub relays for its owner), or
   b. any party but the Hub's own (registered as HUB, it owns none) and ours, when OCPI-from-* names the Hub itself
      and the request is a broadcast push (PUT, PATCH or POST) of a module meant for everybody (locations, tariffs,
      tokens): 04 §9 keeps the original owner in the URL of a broadcast. Sessions and CDRs are never broadcast,
      and GET never is.
   Never our own party, from anyone (not even a partner that registered it as its CPO role). Otherwise: HTTP 404
   with 2001 (04 §6.2 allows 404 to hide what belongs to someone else).
Handlers then call `require_owner(request.state.partner, ...)` for owners they find in the body; for a Hub,
`request.state.partner` is a per-request RoutedPartner that knows what the headers authorised.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from infra.settings import Settings
from ocpi.identity import ci_equal
from receivers.registry import Partner, PartnerDirectory, RoutedPartner, TokenKind
from receivers.transport import (
    CONFIGURATION_MODULES,
    MODULE_OPT,
    ForeignParty,
    InvalidRoutingHeaders,
    MethodNotAllowed,
    Party,
    RoutingHeaders,
    Unauthorized,
    allowed_methods,
    ours_as_named,
    routing_headers,
    set_response_routing,
)

TOKEN_A_ALLOWED = "token_a"  # noqa: S105 - a handler opt name, not a secret
# 07 §2/§3: a credentials POST from a client that is already registered is answered 405, with the methods it may use.
ALREADY_REGISTERED = "already registered: this Token A has been used"
AS_REGISTERED = {"Allow": allowed_methods(["DELETE", "GET", "PUT"])}
BROADCAST_MODULES = frozenset({"locations", "tariffs", "tokens"})
_PUSH_METHODS = frozenset({"PUT", "PATCH", "POST"})


def parse_authorization(header: str | None) -> tuple[str | None, str]:
    """(decoded token or None if not valid Base64 UTF-8, raw header token) of `Token <value>`."""
    if not header:
        raise Unauthorized("missing Authorization header")
    scheme, _, value = header.partition(" ")
    raw = value.strip()
    if scheme.lower() != "token" or not raw or any(c.isspace() for c in raw):
        raise Unauthorized("Authorization header must be 'Token <base64 of the credentials token>'")
    try:
        decoded = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None, raw
    # The spec's own sample headers encode a trailing newline; tolerate exactly one when reading.
    return decoded.removesuffix("\n") or None, raw


async def _identify(directory: PartnerDirectory, header: str | None, *,
                    registration: bool = False) -> tuple[Partner, TokenKind, str]:
    """The partner, kind and token of the header; `registration` (a credentials POST): the Token A a registration
    spent is answered 405, as the POST of a registered client (07 §2), though it is valid nowhere."""
    decoded, raw = parse_authorization(header)
    candidates = [decoded] if decoded is not None else []
    if raw != decoded:
        candidates.append(raw)
    found = await directory.find(*candidates)
    if found is not None:
        token, partner, kind = found
        # The raw form only for partners that opted in: otherwise a leaked header value would be a token too.
        if token == decoded or partner.profile.raw_token:
            return partner, kind, token
    spent = directory.registered_by(*candidates) if registration else None
    if spent is not None and (spent[0] == decoded or spent[1].profile.raw_token):
        raise MethodNotAllowed(ALREADY_REGISTERED, headers=AS_REGISTERED)
    raise Unauthorized("unknown token")


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Guard: find the partner for the token; on functional modules, check routing headers and the owner.

    Sets `connection.state.partner` (the Partner, or a RoutedPartner for a Hub), `token_kind`, and `token`
    (the presented credentials token in clear, for this request only: credentials GET answers with it).
    """
    method: str = connection.scope["method"]  # type: ignore[typeddict-item]
    if method == "OPTIONS":
        # Litestar answers OPTIONS itself with an empty 204; OCPI has no OPTIONS, so keep to the envelope.
        raise MethodNotAllowed("OCPI endpoints do not support OPTIONS",
                               headers={"Allow": _allowed(connection, handler)})
    directory: PartnerDirectory = connection.app.state.partners
    given = set(connection.headers.getall("authorization", []))
    if len(given) > 1:
        # Not a list header (RFC 9110 §5.3): taking the first line made the verdict depend on the lines' order.
        raise Unauthorized("more than one Authorization header: send one, 'Token <base64 of the credentials token>'")
    registration = method == "POST" and handler.opt.get(MODULE_OPT) == "credentials"
    partner, kind, token = await _identify(directory, next(iter(given), None), registration=registration)
    if kind is TokenKind.A and not handler.opt.get(TOKEN_A_ALLOWED):
        raise Unauthorized("Token A is only valid on the versions and credentials modules")
    connection.state.partner = partner
    connection.state.token_kind = kind
    connection.state.token = token
    module = handler.opt.get(MODULE_OPT)
    if module and module not in CONFIGURATION_MODULES:
        ours = our_party(connection.app.state.settings)
        params = connection.path_params
        has_owner = "country_code" in params and "party_id" in params
        owner = (params["country_code"], params["party_id"]) if has_owner else None
        try:
            routing = routing_headers(connection.scope)
        except InvalidRoutingHeaders:
            # Broken headers name nobody to answer to: the answer is ours, to the caller's implied party (if any).
            set_response_routing(connection.scope, sender=ours, receiver=_implied(partner))
            raise
        connection.state.partner = authorize(partner, routing, ours=ours, module=module, method=method,
                                             owner=owner, scope=connection.scope)


def authorize(partner: Partner, routing: RoutingHeaders, *, ours: Party, module: str, method: str,
              owner: Party | None, scope: Any = None) -> Partner:
    """The module docstring's rules 1 and 2; returns the Partner (a RoutedPartner for a Hub) to act as."""
    sender, receiver = routing.sender, routing.receiver
    if scope is not None:
        # The answer goes back to the sender, from us: the parties named in the request, or implied by the
        # connection when a single-party peer left the headers out. Decided before the headers are judged, so that
        # refusing them does not echo them as if they were true: the answer is from us, not from a party the
        # request named but we do not host, and to the caller, not to a party it may not speak for.
        implied = _implied(partner)
        to_us = ours_as_named(ours, receiver)
        back = sender if sender is not None and not _same(sender, ours) and (partner.is_hub or partner.owns(*sender)) \
            else implied
        set_response_routing(scope, sender=to_us, receiver=back)
    if partner.is_hub or len(partner.roles) > 1:
        missing = [name for name, side in (("OCPI-from-*", sender), ("OCPI-to-*", receiver)) if side is None]
        if missing:
            why = "a Hub" if partner.is_hub else "a platform with several parties"
            raise InvalidRoutingHeaders(f"{' and '.join(missing)} headers are required from {why} (04 §8.1)")
    if receiver is not None and not _same(receiver, ours):
        raise InvalidRoutingHeaders(f"OCPI-to-* names {receiver[0]}/{receiver[1]}; this platform hosts "
                                    f"{ours[0]}/{ours[1]}")
    if sender is not None and _same(sender, ours):
        # A request to us is never from us (04 §8.2: from-* is the requesting party). A Hub is trusted for the parties
        # it relays for, but not for ours: it would push objects in our own party's name.
        raise InvalidRoutingHeaders(f"OCPI-from-* names {sender[0]}/{sender[1]}, the party this platform hosts: a "
                                    "request to us is not from us")
    if sender is not None and not partner.is_hub and not partner.owns(*sender):
        raise InvalidRoutingHeaders(f"OCPI-from-* names {sender[0]}/{sender[1]}, which is not one of this "
                                    "partner's credentials roles")

    acting: Partner = partner
    if partner.is_hub and sender is not None:
        hub_itself = partner.owns(*sender)
        broadcast = hub_itself and module in BROADCAST_MODULES and method in _PUSH_METHODS
        acting = RoutedPartner.of(partner, routed_parties=[] if hub_itself else [sender], broadcast=broadcast)
    if owner is not None:
        require_owner(acting, *owner, ours=ours)
    return acting


def require_owner(partner: Partner, country_code: str, party_id: str, *, ours: Party | None = None) -> None:
    """The object's owner must be a party the caller may act for as its CPO, and not `ours` (our own party: we own
    nothing we receive, not through a Hub's broadcast, which may name any owner behind it, 04 §9, nor from a partner
    that registered our party as its CPO role, which the handshake does not refuse); otherwise it is hidden (404,
    2001)."""
    if ours is not None and _same((country_code, party_id), ours):
        raise ForeignParty(f"party {country_code}/{party_id} is the party this platform hosts: nothing pushed to or "
                           "read from us is owned by it")
    if not partner.may_own(country_code, party_id):
        raise ForeignParty(partner.not_owner_reason(country_code, party_id))


def our_party(settings: Settings) -> Party:
    return settings.party.country_code, settings.party.party_id


def _implied(partner: Partner) -> Party | None:
    """The party a single-party peer speaks for without routing headers (04 §8.1); None for several."""
    only = partner.roles[0] if len(partner.roles) == 1 else None
    return (only.country_code, only.party_id) if only is not None else None


def _same(a: Party, b: Party) -> bool:
    return ci_equal(a[0], b[0]) and ci_equal(a[1], b[1])


def _allowed(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> str:
    """The methods of the route an OPTIONS request matched (Litestar's own OPTIONS handler has its path)."""
    methods: set[str] = set()
    for route in connection.app.routes:
        if route.path in handler.paths:
            methods.update(getattr(route, "methods", ()))
    return allowed_methods(methods)
