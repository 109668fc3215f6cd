"""The partner registry: who may push to us, as which parties, with which tokens; persisted in ClickHouse.

Tokens that partners present to us (Token A before registration, our issued Token C after) are stored only as
sha256 hashes and compared in constant time. The token we present to a partner (its Token B, or C after
initiating a registration) must stay usable, so it is stored, and masked wherever it is shown.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec
from clickhouse_connect.driver.client import Client

from ocpi.compat import CompatProfile


class PartnerStatus(StrEnum):
    INVITED = "INVITED"  # holds a Token A, may only use versions and credentials
    REGISTERED = "REGISTERED"  # handshake done (or registered by an operator), pushes allowed
    SUSPENDED = "SUSPENDED"  # an operator stopped it; every token answers 401
    UNREGISTERED = "UNREGISTERED"  # DELETE on credentials, or `partners delete`


class PartyRole(msgspec.Struct, frozen=True):
    """A CredentialsRole the partner hosts: the (country_code, party_id) pairs it may push for."""

    country_code: str
    party_id: str
    role: str
    business_name: str = ""
    business_details: dict[str, Any] | None = None

    def matches(self, country_code: str, party_id: str) -> bool:
        return self.country_code.upper() == country_code.upper() and self.party_id.upper() == party_id.upper()


class PartnerEndpoint(msgspec.Struct, frozen=True):
    identifier: str
    role: str
    url: str


class Partner(msgspec.Struct, kw_only=True):
    partner_id: str
    name: str
    status: PartnerStatus
    roles: list[PartyRole] = msgspec.field(default_factory=list)
    token_a_hash: str | None = None
    token_c_hash: str | None = None
    token_for_partner: str | None = None  # what we send in Authorization when calling the partner
    version: str | None = None
    versions_url: str | None = None
    endpoints: list[PartnerEndpoint] = msgspec.field(default_factory=list)
    compat: list[str] = msgspec.field(default_factory=list)
    created_at: datetime
    updated_at: datetime

    def owns(self, country_code: str, party_id: str) -> bool:
        return any(role.matches(country_code, party_id) for role in self.roles)

    @property
    def profile(self) -> CompatProfile:
        return CompatProfile.from_names(self.compat)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh credentials token: URL-safe, within the spec's printable ASCII and 64 characters."""
    return secrets.token_urlsafe(32)


def _now() -> datetime:
    return datetime.now(UTC)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Partner)


class PartnerRegistry:
    """Reads and writes partners in the `partners` table (ReplacingMergeTree on a revision counter)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def all(self) -> list[Partner]:
        rows = self._client.query("SELECT record_json FROM partners FINAL ORDER BY partner_id").result_rows
        return [_decoder.decode(row[0]) for row in rows]

    def get(self, partner_id: str) -> Partner | None:
        rows = self._client.query("SELECT record_json FROM partners FINAL WHERE partner_id = {id:String}",
                                  parameters={"id": partner_id}).result_rows
        return _decoder.decode(rows[0][0]) if rows else None

    def save(self, partner: Partner) -> Partner:
        partner.updated_at = _now()
        # time_ns as revision: later writes win, even from different processes.
        self._client.insert("partners", [[partner.partner_id, time.time_ns(),
                                          _encoder.encode(partner).decode(), partner.updated_at]],
                            column_names=["partner_id", "revision", "record_json", "updated_at"])
        return partner

    def invite(self, partner_id: str, name: str, *, compat: list[str] | None = None) -> tuple[Partner, str]:
        """A new partner holding a Token A; returns it with the Token A (shown once)."""
        if self.get(partner_id) is not None:
            raise ValueError(f"partner {partner_id!r} exists already")
        CompatProfile.from_names(compat or [])  # fail early on an unknown relaxation
        token_a = new_token()
        now = _now()
        partner = Partner(partner_id=partner_id, name=name, status=PartnerStatus.INVITED,
                          token_a_hash=hash_token(token_a), compat=list(compat or []),
                          created_at=now, updated_at=now)
        return self.save(partner), token_a

    def reinvite(self, partner_id: str) -> str:
        """A new Token A for a partner that has not registered yet (the old one stops working)."""
        partner = self.get(partner_id)
        if partner is None or partner.status is not PartnerStatus.INVITED:
            raise ValueError(f"partner {partner_id!r} is not waiting for a registration")
        token_a = new_token()
        partner.token_a_hash = hash_token(token_a)
        self.save(partner)
        return token_a

    def register_direct(self, partner_id: str, name: str, roles: list[PartyRole], *,
                        compat: list[str] | None = None) -> tuple[Partner, str]:
        """Register a partner without a handshake (operator-provisioned); returns its Token C."""
        CompatProfile.from_names(compat or [])
        token_c = new_token()
        now = _now()
        partner = Partner(partner_id=partner_id, name=name, status=PartnerStatus.REGISTERED, roles=roles,
                          token_c_hash=hash_token(token_c), compat=list(compat or []), version="2.2.1",
                          created_at=now, updated_at=now)
        return self.save(partner), token_c


class TokenKind(StrEnum):
    A = "A"
    C = "C"


class PartnerDirectory:
    """The receivers' in-memory view of the registry, for the per-request token lookup.

    Reloaded every `refresh_s` seconds, and at once (rate-limited) when a token is not found, so a partner
    created a moment ago can push right away and a suspension takes effect within `refresh_s`.
    """

    def __init__(self, registry: PartnerRegistry, *, refresh_s: float = 2.0, miss_reload_s: float = 0.05) -> None:
        self._registry = registry
        self._refresh_s = refresh_s
        self._miss_reload_s = miss_reload_s
        self._by_hash: dict[str, tuple[Partner, TokenKind]] = {}
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    async def reload(self) -> None:
        partners = await asyncio.to_thread(self._registry.all)
        by_hash: dict[str, tuple[Partner, TokenKind]] = {}
        for partner in partners:
            if partner.token_a_hash:
                by_hash[partner.token_a_hash] = (partner, TokenKind.A)
            if partner.token_c_hash:
                by_hash[partner.token_c_hash] = (partner, TokenKind.C)
        self._by_hash = by_hash
        self._loaded_at = time.monotonic()

    async def _maybe_reload(self, min_age: float) -> None:
        if time.monotonic() - self._loaded_at < min_age:
            return
        async with self._lock:
            if time.monotonic() - self._loaded_at >= min_age:
                await self.reload()

    async def lookup(self, token: str) -> tuple[Partner, TokenKind] | None:
        await self._maybe_reload(self._refresh_s)
        digest = hash_token(token)
        found = self._by_hash.get(digest)
        if found is None:
            await self._maybe_reload(self._miss_reload_s)
            found = self._by_hash.get(digest)
        if found is None:
            return None
        stored = found[0].token_a_hash if found[1] is TokenKind.A else found[0].token_c_hash
        # The dict lookup found it by hash; the constant-time compare keeps the check itself timing-safe.
        return found if stored and hmac.compare_digest(stored, digest) else None
