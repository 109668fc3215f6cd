"""The partner registry: who may call us, as which parties, with which tokens; persisted in ClickHouse.

One JSON record per partner in the `partners` table (ReplacingMergeTree on a nanosecond revision, above every one
stored: the last write wins, also across processes and machines whose clocks differ). ClickHouse is the one
persistent store in both modes, so the registry survives restarts in `dev` (chDB, reached through the running
instance's shim) and in `serve` (a server).

Tokens, in the vocabulary of `07-credentials.md`:
- *inbound* tokens are the ones a partner presents to us: the Token A we issue with an invitation
  (versions and credentials only), the Token C we issue when a partner registers with us, or the Token B we
  issue when we register with a partner. Only their sha256 is stored, and looked up in constant time.
- the *outbound* token is the one we present to the partner (its Token B, or the Token C it issued to us). It
  must stay usable, so it is stored as is, and masked (`infra.settings.mask`) wherever it is shown: `repr`,
  logs, CLI output and errors.

Every inbound token has a state: ACTIVE, RETIRING (a replaced token honoured until `expires_at`, the rotation
grace of `OCPI_TOKEN_GRACE`) or REVOKED (kept, as a hash, for the audit trail).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import msgspec
from clickhouse_connect.driver.client import Client

from infra.clickhouse.client import SYNCHRONOUS_INSERT, insert_first
from infra.settings import mask
from ocpi.compat import CompatProfile
from ocpi.identity import ci_equal, owner_key_part
from ocpi.model import BusinessDetails, CredentialsRole, Endpoint, Role

log = logging.getLogger(__name__)

class PartnerStatus(StrEnum):
    INVITED = "INVITED"  # holds a Token A from us; may only use versions and credentials
    REGISTERING = "REGISTERING"  # we are registering with it (`partners register`), waiting for its answer
    REGISTERED = "REGISTERED"  # handshake done (or provisioned by an operator): full access
    SUSPENDED = "SUSPENDED"  # an operator stopped it; every token answers 401 until `partners resume`
    UNREGISTERED = "UNREGISTERED"  # a credentials DELETE (either direction): tokens revoked, record kept
    DELETED = "DELETED"  # `partners delete`: a tombstone without tokens, kept for the audit trail


# Statuses whose inbound tokens are honoured by the guard.
ACCEPTING = frozenset({PartnerStatus.INVITED, PartnerStatus.REGISTERING, PartnerStatus.REGISTERED})


class TokenKind(StrEnum):
    A = "A"  # registration token we issued with an invitation: versions and credentials only
    B = "B"  # token we issued when we registered with the partner (we were the Sender)
    C = "C"  # token we issued when the partner registered with us (we were the Receiver), or on its PUT


class TokenState(StrEnum):
    ACTIVE = "ACTIVE"
    RETIRING = "RETIRING"  # replaced; honoured until expires_at
    REVOKED = "REVOKED"


class Origin(StrEnum):
    PARTNER = "PARTNER"  # the partner registered with us (it POSTed to our credentials endpoint)
    US = "US"  # we registered with the partner (`partners register`)
    OPERATOR = "OPERATOR"  # provisioned without a handshake (register_direct)


class InboundToken(msgspec.Struct, kw_only=True):
    """A token the partner presents to us, by hash only."""

    kind: TokenKind
    sha256: str
    state: TokenState = TokenState.ACTIVE
    issued_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def valid_at(self, now: datetime) -> bool:
        if self.state is TokenState.ACTIVE:
            return True
        return self.state is TokenState.RETIRING and self.expires_at is not None and now < self.expires_at


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh credentials token: 43 URL-safe characters (the spec allows printable ASCII, up to 64)."""
    return secrets.token_urlsafe(32)


def _now() -> datetime:
    return datetime.now(UTC)


def credentials_role(*, country_code: str, party_id: str, role: str | Role, business_name: str = "",
                     website: str | None = None) -> CredentialsRole:
    """A CredentialsRole from plain values (business name defaults to the party id)."""
    return CredentialsRole(role=Role(role), party_id=party_id, country_code=country_code,
                           business_details=BusinessDetails(name=business_name or party_id, website=website))


# The name earlier callers (demo, tests) construct roles with.
PartyRole = credentials_role


def same_party(role: CredentialsRole, country_code: str, party_id: str) -> bool:
    """CiString identity: country_code and party_id compare ignoring ASCII case only (`ci_equal`): str.upper()
    would fold a non-ASCII URL segment (`ıST`, `ßX`) onto a role (`IST`, `SSX`)."""
    return ci_equal(role.country_code, country_code) and ci_equal(role.party_id, party_id)


class Partner(msgspec.Struct, kw_only=True):
    partner_id: str
    name: str
    status: PartnerStatus
    origin: Origin = Origin.PARTNER
    roles: list[CredentialsRole] = msgspec.field(default_factory=list)
    inbound_tokens: list[InboundToken] = msgspec.field(default_factory=list)
    outbound_token: str | None = None  # what we send in Authorization when calling the partner; never shown
    version: str | None = None
    versions_url: str | None = None
    endpoints: list[Endpoint] = msgspec.field(default_factory=list)
    compat: list[str] = msgspec.field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    registered_at: datetime | None = None
    # Whether the operator agreed that this connection is a Hub (`partners invite --hub`, `partners register
    # --hub`, or provisioned with a HUB role). A Hub acts for any party it names in the routing headers, so a
    # partner may not make itself one through its credentials roles. None: recorded before this rule (a HUB role
    # it held then counts as agreed; docs/upgrading.md, "Data written by earlier versions").
    hub: bool | None = None

    def __repr__(self) -> str:
        # The outbound token is usable as is; never let a log line or a traceback show it.
        return (f"Partner(partner_id={self.partner_id!r}, status={self.status.value}, "
                f"roles={[f'{r.country_code}/{r.party_id}/{r.role.value}' for r in self.roles]}, "
                f"outbound_token={mask(self.outbound_token or '')!r})")

    __str__ = __repr__

    # --- identity -----------------------------------------------------------------------------------------

    def owns(self, country_code: str, party_id: str) -> bool:
        """Whether (country_code, party_id) is one of this partner's credentials roles, in any role."""
        return any(same_party(role, country_code, party_id) for role in self.roles)

    def may_own(self, country_code: str, party_id: str) -> bool:
        """Whether this connection may push, and read back, objects owned by (country_code, party_id): the
        Locations, Sessions and CDRs of our receiver interfaces are a CPO's (08/09/10 §1: data owner CPO, the
        interfaces are called by the CPO, the URL's country_code/party_id are the CPO's), so the party must be one
        of the partner's CPO roles. A party it registered only as EMSP, NSP, NAP, SCSP, OTHER or HUB owns none."""
        return any(role.role is Role.CPO and same_party(role, country_code, party_id) for role in self.roles)

    def relays_for(self, country_code: str, party_id: str) -> bool:
        """Whether this connection is a Hub that may carry objects of (country_code, party_id) for their owner: a Hub
        reports only itself (07 §5), so the parties behind it are not in its roles, and any party may be one; but
        not a party it registered itself in a role other than CPO (its own HUB party owns no Location, Session or
        CDR, as for any partner: `may_own`)."""
        return self.is_hub and not self.owns(country_code, party_id)

    def roles_of(self, country_code: str, party_id: str) -> list[str]:
        """The roles (CPO, EMSP ...) the partner registered for (country_code, party_id), for messages."""
        return [role.role.value for role in self.roles if same_party(role, country_code, party_id)]

    def not_owner_reason(self, country_code: str, party_id: str) -> str:
        """Why objects owned by (country_code, party_id) are refused from this partner (`may_own` said no): the
        one message of a push (`receivers.auth.require_owner`) and a pull (`pipeline.jobs.pull`)."""
        other = self.roles_of(country_code, party_id)
        if other:
            return (f"party {country_code}/{party_id} is registered by this partner as {', '.join(other)}, not as "
                    "CPO: Locations, Sessions and CDRs are owned and pushed by a CPO (08/09/10 §1)")
        return (f"party {country_code}/{party_id} is not one this partner may act for (its CPO credentials roles, "
                "or for a Hub the party named in OCPI-from-*)")

    @property
    def is_hub(self) -> bool:
        return self.hub is not False and any(role.role is Role.HUB for role in self.roles)

    def unagreed_hub_role(self, roles: Iterable[CredentialsRole]) -> CredentialsRole | None:
        """The first HUB role among `roles` (what the partner claims) that the operator did not agree to."""
        if self.hub or (self.hub is None and self.is_hub):  # agreed, or a Hub from before the rule
            return None
        return next((role for role in roles if role.role is Role.HUB), None)

    @property
    def profile(self) -> CompatProfile:
        return CompatProfile.from_names(self.compat)

    def endpoint(self, identifier: str, role: str | None = None) -> Endpoint | None:
        for endpoint in self.endpoints:
            if endpoint.identifier == identifier and (role is None or endpoint.role == role):
                return endpoint
        return None

    # --- inbound tokens -----------------------------------------------------------------------------------

    def valid_tokens(self, now: datetime | None = None) -> list[InboundToken]:
        now = now or _now()
        return [token for token in self.inbound_tokens if token.valid_at(now)]

    def issue_token(self, kind: TokenKind) -> str:
        """A new ACTIVE inbound token of `kind`; returns it in clear (the only time it exists in clear)."""
        token = new_token()
        self.inbound_tokens.append(InboundToken(kind=kind, sha256=hash_token(token), issued_at=_now()))
        self._trim_history()
        return token

    def retire_tokens(self, *, keep: Iterable[str] = (), grace_s: float = 0.0,
                      kinds: Iterable[TokenKind] | None = None) -> None:
        """Replace every valid inbound token (of `kinds`) except the hashes in `keep`.

        With a grace, replaced tokens stay usable until now + grace (RETIRING); without, they are revoked.
        """
        now = _now()
        keep = set(keep)
        wanted = set(kinds) if kinds is not None else set(TokenKind)
        for token in self.inbound_tokens:
            if token.sha256 in keep or token.kind not in wanted or not token.valid_at(now):
                continue
            if grace_s > 0 and token.state is TokenState.ACTIVE:
                token.state = TokenState.RETIRING
                token.expires_at = now + timedelta(seconds=grace_s)
            elif token.state is not TokenState.REVOKED:
                token.state = TokenState.REVOKED
                token.revoked_at = now

    def revoke_tokens(self, *, kinds: Iterable[TokenKind] | None = None, sha256: str | None = None) -> None:
        now = _now()
        wanted = set(kinds) if kinds is not None else set(TokenKind)
        for token in self.inbound_tokens:
            if token.state is TokenState.REVOKED or token.kind not in wanted:
                continue
            if sha256 is not None and token.sha256 != sha256:
                continue
            token.state = TokenState.REVOKED
            token.revoked_at = now

    def _trim_history(self, keep_revoked: int = 8) -> None:
        """Revoked hashes, and retired ones past their grace (RETIRING stays their state), are only an audit
        trail: keep the newest few."""
        now = _now()
        revoked = [t for t in self.inbound_tokens if not t.valid_at(now)]
        for token in revoked[:-keep_revoked] if len(revoked) > keep_revoked else []:
            self.inbound_tokens.remove(token)


class RoutedPartner(Partner, kw_only=True):
    """A per-request view of a Hub partner, widened by what the routing headers authorise (see auth.py).

    `routed_parties` are the parties the Hub relays for in this request (named in OCPI-from-*);
    `broadcast` is set for a broadcast push of a broadcastable module, where the URL keeps the original owner.
    Never persisted (PartnerRegistry.save refuses it).
    """

    routed_parties: list[tuple[str, str]] = msgspec.field(default_factory=list)
    broadcast: bool = False

    def may_own(self, country_code: str, party_id: str) -> bool:
        """A CPO role of the Hub's own (a Hub reports only HUB, 07 §5), the party it relays for, or any owner of a
        broadcast but the Hub's own party (`relays_for`: registered as HUB, it owns no Location). The routed party's
        role is not known (Hub Client Info is not read): the Hub is trusted for it."""
        if super().may_own(country_code, party_id):
            return True
        if self.broadcast:
            return self.relays_for(country_code, party_id)
        return any(ci_equal(c, country_code) and ci_equal(p, party_id) for c, p in self.routed_parties)

    @classmethod
    def of(cls, partner: Partner, *, routed_parties: list[tuple[str, str]], broadcast: bool) -> RoutedPartner:
        fields = {name: getattr(partner, name) for name in Partner.__struct_fields__}
        return cls(**fields, routed_parties=routed_parties, broadcast=broadcast)


class RegistryError(ValueError):
    """An operation the partner's current state does not allow; the message says what to do instead."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Partner)


class _Held(msgspec.Struct):
    """The token we held, as any revision of a record stores it (the other fields, of any release, ignored)."""

    outbound_token: str | None = None


_held_decoder = msgspec.json.Decoder(_Held)


class PartnerRegistry:
    """Reads and writes partners in the `partners` table (ReplacingMergeTree on a revision counter)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        # One client serves the receivers' threads (asyncio.to_thread); chDB clients are not thread-safe.
        self._lock = threading.Lock()

    def all(self, *, include_deleted: bool = False) -> list[Partner]:
        with self._lock:
            rows = self._client.query(
                "SELECT record_json FROM partners FINAL ORDER BY partner_id").result_rows
        partners = [_decoder.decode(row[0]) for row in rows]
        return partners if include_deleted else [p for p in partners if p.status is not PartnerStatus.DELETED]

    def get(self, partner_id: str) -> Partner | None:
        with self._lock:
            # Client-side binding (%(id)s), by clickhouse-connect before the query is sent.
            rows = self._client.query("SELECT record_json FROM partners FINAL WHERE partner_id = %(id)s",
                                      parameters={"id": partner_id}).result_rows
        return _decoder.decode(rows[0][0]) if rows else None

    def require(self, partner_id: str) -> Partner:
        partner = self.get(partner_id)
        if partner is None or partner.status is PartnerStatus.DELETED:
            raise RegistryError(f"no partner {partner_id!r} (see `ocpi-pipeline partners list`)")
        return partner

    def save(self, partner: Partner) -> Partner:
        if type(partner) is not Partner:
            raise TypeError("only a Partner record is persisted, never a per-request view")
        partner.updated_at = _now()
        with self._lock:
            # time_ns as revision, but above every revision stored: later writes win, also from a process whose clock
            # runs behind the last writer's (another machine, or a clock stepped back), which would otherwise be
            # kept below the record it replaces.
            stored = self._client.query("SELECT max(revision) FROM partners WHERE partner_id = %(id)s",
                                        parameters={"id": partner.partner_id}).result_rows
            revision = max(time.time_ns(), int(stored[0][0] if stored else 0) + 1)
            self._client.insert("partners", [[partner.partner_id, revision,
                                              _encoder.encode(partner).decode(), partner.updated_at]],
                                column_names=["partner_id", "revision", "record_json", "updated_at"],
                                # the caller answers the partner (a Token C) and other processes read it at once
                                settings=SYNCHRONOUS_INSERT)
            self._drop_replaced_tokens(partner, revision)
        return partner

    def claim(self, subject: str, generation: str, claim: str) -> bool:
        """Whether this handshake is the one that may save on top of the state of `subject` it read (a partner's
        tokens: `token_generation`).

        The registry's writes are "last write wins", across processes too, and the receivers' locks hold within
        one process: two handshakes of one partner in two receiver processes (`serve --workers N`) could both
        read the same record and both save, each with its own Token C, the later one undoing the other's (whose
        caller keeps a token that is refused). Each claims the generation it read first: both insert with one
        deduplication token (migration 0025), ClickHouse keeps the first insert that lands and drops the other,
        and both read back which claim is in force (`infra.clickhouse.client.insert_first`). A claim is never given
        back, so it is made after every check that may still refuse the handshake, just before the save."""
        with self._lock:
            in_force = insert_first(
                self._client, "credential_claims (subject, generation, claim, claimed_at)",
                "%(subject)s, %(generation)s, %(claim)s, now64(6, 'UTC')",
                token=f"credentials handshake {subject} {generation}",
                in_force="SELECT claim FROM credential_claims WHERE subject = %(subject)s "
                         "AND generation = %(generation)s ORDER BY claimed_at, claim LIMIT 1",
                parameters={"subject": subject, "generation": generation, "claim": claim})
        return in_force == claim

    def _drop_replaced_tokens(self, partner: Partner, revision: int) -> None:
        """Delete the revisions `revision` supersedes when one holds another token we held for the partner (a
        credentials PUT replaced it, an unregister or `partners delete` dropped it).

        ReplacingMergeTree drops a superseded revision only at a merge that nothing schedules; until then every
        query without FINAL (`ocpi-pipeline query`) reads it, the partner's token in clear with it: a token a local
        `partners delete` dropped still works at the partner. A lightweight DELETE hides them at once (their bytes
        leave the disk at the part's next merge). Only lower revisions go, so the record in force, the highest, is
        never touched, whichever process wrote it; a save that keeps the token deletes nothing (a DELETE is a
        mutation, a fraction of a second on chDB)."""
        older = self._client.query(
            "SELECT record_json FROM partners WHERE partner_id = %(id)s AND revision < %(revision)s",
            parameters={"id": partner.partner_id, "revision": revision}).result_rows
        if any(_held_decoder.decode(row[0]).outbound_token not in (None, partner.outbound_token) for row in older):
            self._client.command("DELETE FROM partners WHERE partner_id = %(id)s AND revision < %(revision)s",
                                 parameters={"id": partner.partner_id, "revision": revision})

    def party_holder(self, roles: Iterable[CredentialsRole], *,
                     except_id: str) -> tuple[CredentialsRole, str] | None:
        """The first role already held by another live partner, with that partner's id; None if all are free.

        A (country_code, party_id) belongs to one connection: otherwise a second platform could overwrite the
        first one's objects. An operator frees a party with `partners delete` or `unregister`.
        """
        return _party_holder(self.all(), roles, except_id)

    def party_state(self, roles: Iterable[CredentialsRole], *,
                    except_id: str) -> tuple[tuple[CredentialsRole, str] | None, str]:
        """`party_holder`, and the generation of the registry it was decided on (`registry_generation`), from one
        read: what a handshake claims the parties it takes on top of (`claim`, `party_subject`)."""
        partners = self.all(include_deleted=True)
        live = [partner for partner in partners if partner.status is not PartnerStatus.DELETED]
        return _party_holder(live, roles, except_id), registry_generation(partners)

    def invite(self, partner_id: str, name: str, *, compat: Iterable[str] = (), hub: bool = False,
               ) -> tuple[Partner, str]:
        """A partner waiting for its registration, holding a new Token A; returns it with the Token A.

        A new id, or one that is unregistered or deleted (a fresh start; its roles are forgotten). `hub`: the
        operator agrees that it registers as a Hub.
        """
        compat = list(CompatProfile.from_names(list(compat)).names)  # fails early on an unknown relaxation
        check_partner_id(partner_id)
        existing = self.get(partner_id)
        if existing is not None and existing.status not in (PartnerStatus.UNREGISTERED,
                                                            PartnerStatus.DELETED):
            invited = existing.status is PartnerStatus.INVITED
            hint = "rotate it for a new Token A" if invited else "unregister or delete it first"
            raise RegistryError(f"partner {partner_id!r} exists already ({existing.status.value}; {hint})")
        now = _now()
        partner = Partner(partner_id=partner_id, name=name, status=PartnerStatus.INVITED, compat=compat, hub=hub,
                          created_at=existing.created_at if existing else now, updated_at=now)
        if existing is not None:
            partner.inbound_tokens = existing.inbound_tokens
            partner.revoke_tokens()
        token_a = partner.issue_token(TokenKind.A)
        return self.save(partner), token_a

    def reinvite(self, partner_id: str) -> str:
        """A new Token A for a partner that has not registered yet (the old one stops working)."""
        partner = self.get(partner_id)
        if partner is None or partner.status is not PartnerStatus.INVITED:
            raise RegistryError(f"partner {partner_id!r} is not waiting for a registration")
        partner.revoke_tokens(kinds=[TokenKind.A])
        token_a = partner.issue_token(TokenKind.A)
        self.save(partner)
        return token_a

    def register_direct(self, partner_id: str, name: str, roles: list[CredentialsRole], *,
                        compat: Iterable[str] = ()) -> tuple[Partner, str]:
        """Register a partner without a handshake (operator-provisioned); returns its token (kind C)."""
        compat = list(CompatProfile.from_names(list(compat)).names)
        check_partner_id(partner_id)
        held = self.party_holder(roles, except_id=partner_id)
        if held is not None:
            role, holder = held
            raise RegistryError(f"party {role.country_code}/{role.party_id} belongs to partner {holder!r}")
        now = _now()
        existing = self.get(partner_id)
        partner = Partner(partner_id=partner_id, name=name, status=PartnerStatus.REGISTERED,
                          origin=Origin.OPERATOR, roles=list(roles), compat=compat, version="2.2.1",
                          hub=any(role.role is Role.HUB for role in roles),  # the operator chose the roles
                          created_at=existing.created_at if existing else now, updated_at=now,
                          registered_at=now)
        if existing is not None:
            partner.inbound_tokens = existing.inbound_tokens
            partner.revoke_tokens()
        token = partner.issue_token(TokenKind.C)
        return self.save(partner), token

    def set_status(self, partner_id: str, status: PartnerStatus) -> Partner:
        """Operator actions: SUSPENDED (from a live state), REGISTERED/INVITED again (resume)."""
        partner = self.require(partner_id)
        if status is PartnerStatus.SUSPENDED:
            if partner.status not in ACCEPTING:
                raise RegistryError(f"partner {partner_id!r} is {partner.status.value}; nothing to suspend")
            partner.status = PartnerStatus.SUSPENDED
        else:
            if partner.status is not PartnerStatus.SUSPENDED:
                raise RegistryError(f"partner {partner_id!r} is {partner.status.value}, not suspended")
            # Resume where it was: a partner that never completed a handshake is still only invited.
            partner.status = PartnerStatus.REGISTERED if partner.registered_at else PartnerStatus.INVITED
        return self.save(partner)

    def unregister(self, partner: Partner) -> Partner:
        """A credentials DELETE (either direction): every token is dead, the record stays."""
        partner.status = PartnerStatus.UNREGISTERED
        partner.revoke_tokens()
        partner.outbound_token = None
        return self.save(partner)

    def delete(self, partner_id: str) -> Partner:
        """Forget a partner locally: a tombstone without any token (ids in raw events still resolve)."""
        partner = self.require(partner_id)
        partner.status = PartnerStatus.DELETED
        partner.revoke_tokens()
        partner.outbound_token = None
        return self.save(partner)

    def set_compat(self, partner_id: str, compat: Iterable[str]) -> Partner:
        compat = list(CompatProfile.from_names(list(compat)).names)
        partner = self.require(partner_id)
        partner.compat = compat
        return self.save(partner)


def _party_holder(partners: Iterable[Partner], roles: Iterable[CredentialsRole],
                  except_id: str) -> tuple[CredentialsRole, str] | None:
    roles = list(roles)
    for other in partners:
        if other.partner_id == except_id or other.status in (PartnerStatus.UNREGISTERED, PartnerStatus.DELETED):
            continue
        for role in roles:
            if other.owns(role.country_code, role.party_id):
                return role, other.partner_id
    return None


def registry_generation(partners: Iterable[Partner]) -> str:
    """Every partner record as read (deleted ones too), by its last save: two reads between the same saves give the
    same generation, any save since gives another (a party freed and taken again is never the state it was)."""
    held = sorted(f"{p.partner_id} {p.updated_at.isoformat()} {p.status.value}" for p in partners)
    return hashlib.sha256("\n".join(held).encode()).hexdigest()


def party_subject(country_code: str, party_id: str) -> str:
    """What a handshake claims for a party it takes (`PartnerRegistry.claim`): one per party, in any case."""
    return f"party {owner_key_part(country_code)}/{owner_key_part(party_id)}"


def token_generation(partner: Partner) -> str:
    """The partner's inbound tokens as a record holds them (every token and its state, whatever the time): what a
    handshake replaces, and claims (`PartnerRegistry.claim`). Two reads of one record give the same generation; any
    token issued, retired or revoked since gives another."""
    held = sorted(f"{token.sha256}:{token.state.value}" for token in partner.inbound_tokens)
    return hashlib.sha256("\n".join(held).encode()).hexdigest()


def check_partner_id(partner_id: str) -> None:
    allowed = all(c.isascii() and (c.isalnum() or c in "-_.") for c in partner_id)
    if not partner_id or len(partner_id) > 64 or not allowed:
        raise RegistryError(f"partner id {partner_id!r}: use 1-64 of A-Z a-z 0-9 - _ .")


class PartnerDirectory:
    """The receivers' in-memory view of the registry, for the per-request token lookup.

    Reloaded every `refresh_s` seconds (so a suspension or rotation made by another process takes effect
    within that time, plus the time of a slow registry read; a read that fails keeps the copy held, so known
    partners are still served while ClickHouse is down) and on every unknown token, so a token saved a moment
    ago by another process (the CLI registering with a partner, whose callback arrives at once) is found.
    Reloads on misses are coalesced and spaced by `miss_reload_s`, but a miss always waits for a reload that
    *started after it arrived*: a flood of unknown tokens costs at most one registry read per `miss_reload_s`,
    and never hides a fresh token.
    Changes made by this process (`apply`) take effect at once, and a reload that read the registry before
    such a change was saved does not undo it when it completes (a revoked token must stay dead).
    """

    def __init__(self, registry: PartnerRegistry, *, refresh_s: float = 2.0,
                 miss_reload_s: float = 0.05, refresh_wait_s: float = 1.0) -> None:
        self._registry = registry
        self._refresh_s = refresh_s
        self._miss_reload_s = miss_reload_s
        self._refresh_wait_s = refresh_wait_s
        self._refreshing: asyncio.Future[None] | None = None
        self._by_hash: dict[str, tuple[str, InboundToken]] = {}
        self._spent_a: dict[str, str] = {}  # hash of a revoked Token A -> partner id (`registered_by`)
        self._partners: dict[str, Partner] = {}
        self._reload_started = float("-inf")
        self._loaded_from = float("-inf")  # when the read of the reload now in effect started
        self._applied: dict[str, tuple[float, Partner]] = {}  # partner id -> (when applied, record)
        self._lock = asyncio.Lock()

    @property
    def registry(self) -> PartnerRegistry:
        return self._registry

    async def reload(self) -> None:
        started = self._reload_started = time.monotonic()
        partners = await asyncio.to_thread(self._registry.all)
        if started < self._loaded_from:
            return  # a reload that read later has completed meanwhile
        self._loaded_from = started
        # What this process applied after the read started may be missing from it: the applied record wins.
        newer = {pid: partner for pid, (at, partner) in self._applied.items() if at >= started}
        self._partners = {}
        self._by_hash = {}
        self._spent_a = {}
        for partner in partners:
            if partner.partner_id not in newer:
                self._index(partner)
        for partner in newer.values():
            if partner.status is not PartnerStatus.DELETED:
                self._index(partner)

    def _index(self, partner: Partner) -> None:
        self._partners[partner.partner_id] = partner
        for token in partner.inbound_tokens:
            if token.state is not TokenState.REVOKED:
                self._by_hash[token.sha256] = (partner.partner_id, token)
            elif token.kind is TokenKind.A:
                self._spent_a[token.sha256] = partner.partner_id

    def apply(self, partner: Partner) -> None:
        """Take a partner this process just saved into account at once."""
        self._applied[partner.partner_id] = (time.monotonic(), partner)
        self._by_hash = {h: v for h, v in self._by_hash.items() if v[0] != partner.partner_id}
        self._spent_a = {h: pid for h, pid in self._spent_a.items() if pid != partner.partner_id}
        self._partners.pop(partner.partner_id, None)
        if partner.status is not PartnerStatus.DELETED:
            self._index(partner)

    async def _reload_after(self, arrived: float) -> None:
        async with self._lock:
            if self._reload_started >= arrived:
                return  # a reload that started after this request arrived has completed meanwhile
            wait = self._reload_started + self._miss_reload_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.reload()

    async def _refresh(self, arrived: float) -> None:
        """The periodic reload, by the request that finds it due. It refreshes what the directory holds, so it
        is best effort: while another request reads the registry, this one uses the copy held (rather than queue
        behind a slow read), and the request that started the read waits for it `refresh_wait_s` at most; a read
        that fails is logged and the copy kept (ClickHouse slow or down must not turn the pushes of known partners
        into 3000s, nor hold them)."""
        if self._lock.locked() or (self._refreshing is not None and not self._refreshing.done()):
            return  # a read is under way (or about to take the lock): use the copy held
        reload = self._refreshing = asyncio.ensure_future(self._reload_after(arrived))  # held: runs on unawaited
        reload.add_done_callback(_log_failed_refresh)
        # At most `refresh_wait_s`: a ClickHouse server that accepts and never answers would hold this request for
        # the client library's 300 s. The read goes on (holding the lock, so no other request starts one) and takes
        # effect when it completes.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(reload), self._refresh_wait_s)

    async def lookup(self, token: str) -> tuple[Partner, TokenKind] | None:
        """The partner and token kind of a token valid now; None if unknown or no longer valid."""
        found = await self.find(token)
        return (found[1], found[2]) if found is not None else None

    async def find(self, *tokens: str) -> tuple[str, Partner, TokenKind] | None:
        """The first of `tokens` that is valid now, with its partner and kind (one registry reload at most,
        so a raw-token partner, whose header is tried decoded first, does not cause a reload per request)."""
        arrived = time.monotonic()
        if arrived - self._reload_started >= self._refresh_s:
            await self._refresh(arrived)
        digests = [(token, hash_token(token)) for token in tokens]
        hit = self._first(digests)
        if hit is None or self._partners[hit[2][0]].status is PartnerStatus.REGISTERING:
            # Unknown, or known from the middle of a handshake another process runs (the CLI registering
            # with this partner): the token, or the handshake's outcome (status, roles), may be saved by now.
            await self._reload_after(arrived)
            hit = self._first(digests)
        if hit is None:
            return None
        token, digest, (partner_id, stored) = hit
        # Found by hash; the constant-time compare keeps the final check itself timing-safe.
        if not hmac.compare_digest(stored.sha256, digest) or not stored.valid_at(_now()):
            return None
        partner = self._partners[partner_id]
        if partner.status not in ACCEPTING:
            return None
        return token, partner, stored.kind

    def registered_by(self, *tokens: str) -> tuple[str, Partner] | None:
        """The first of `tokens` that is a Token A of a partner registered now, with that partner: the token the
        registration spent (07 §1: invalid from then on), whose holder may repeat its POST (07 §2: 405). Ask only
        after `find` missed, which has reloaded the registry for it."""
        for token in tokens:
            partner = self._partners.get(self._spent_a.get(hash_token(token), ""))
            if partner is not None and partner.status is PartnerStatus.REGISTERED:
                return token, partner
        return None

    def _first(self, digests: list[tuple[str, str]]) -> tuple[str, str, tuple[str, InboundToken]] | None:
        for token, digest in digests:
            entry = self._by_hash.get(digest)
            if entry is not None:
                return token, digest, entry
        return None

    def partner(self, partner_id: str) -> Partner | None:
        return self._partners.get(partner_id)

    def known(self) -> list[Partner]:
        return list(self._partners.values())


def _log_failed_refresh(reload: asyncio.Future[None]) -> None:
    if reload.cancelled():
        return
    exc = reload.exception()
    if exc is not None:
        log.warning("partner registry not reloaded (%s: %s); tokens are checked against the last copy read",
                    type(exc).__name__, exc)


def record_json(partner: Partner) -> dict[str, Any]:
    """The record as builtins with the outbound token masked (CLI `show --format json`)."""
    data: dict[str, Any] = msgspec.to_builtins(partner)
    data["outbound_token"] = mask(partner.outbound_token or "") or None
    return data
