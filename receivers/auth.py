"""Authentication (`Authorization: Token <base64>`) and owner authorization, as one Litestar guard.

Rules (`04-transport-format.md` §2, `12-receiver-pitfalls.md` 1-2, 7):
- missing or unknown token: HTTP 401 with an envelope;
- Token A only on versions and credentials (handlers opt in with `opt={"token_a": True}`);
- the raw, un-encoded token only for partners whose compatibility profile enables `raw_token`;
- a suspended or unregistered partner is unknown.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from receivers.registry import Partner, PartnerDirectory, PartnerStatus, TokenKind
from receivers.transport import NotFound, Unauthorized

TOKEN_A_ALLOWED = "token_a"


def parse_authorization(header: str | None) -> tuple[str | None, str]:
    """(decoded token or None if not valid Base64, raw header token) of `Token <value>`."""
    if not header:
        raise Unauthorized("missing Authorization header")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "token" or not value or " " in value.strip():
        raise Unauthorized("Authorization header must be 'Token <base64 token>'")
    raw = value.strip()
    try:
        decoded = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None, raw
    # The spec's own sample headers encode a trailing newline; tolerate exactly one when reading.
    return decoded.removesuffix("\n"), raw


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Guard: find the partner for the token and store it on `connection.state.partner`."""
    directory: PartnerDirectory = connection.app.state.partners
    decoded, raw = parse_authorization(connection.headers.get("authorization"))
    found = await directory.lookup(decoded) if decoded is not None else None
    if found is None:
        raw_found = await directory.lookup(raw)
        if raw_found is not None and raw_found[0].profile.raw_token:
            found = raw_found
    if found is None:
        raise Unauthorized("unknown token")
    partner, kind = found
    if partner.status in (PartnerStatus.SUSPENDED, PartnerStatus.UNREGISTERED):
        raise Unauthorized("unknown token")
    if kind is TokenKind.A and not handler.opt.get(TOKEN_A_ALLOWED):
        raise Unauthorized("Token A is only valid on the versions and credentials modules")
    connection.state.partner = partner
    connection.state.token_kind = kind


def require_owner(partner: Partner, country_code: str, party_id: str) -> None:
    """The URL's party must be one of the caller's credentials roles; otherwise the object is hidden (404)."""
    if not partner.owns(country_code, party_id):
        raise NotFound(f"party {country_code}/{party_id} is not one of this partner's credentials roles")
