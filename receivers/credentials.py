"""Credentials module (`07-credentials.md`), both directions.

Receiving (the partner calls `/ocpi/2.2.1/credentials`):
- POST with the Token A we issued: we call the partner back *before answering*, with the token it just gave us
  (its Token B): GET its versions URL, pick 2.2.1, GET the version details, check the endpoints; then we
  store its roles, endpoints and token, revoke Token A, issue our Token C and answer with our credentials.
  Already registered (any other token, or again the Token A the registration spent): 405. Callback failed:
  3001; no 2.2.1: 3002; no credentials endpoint or no module in common: 3003. A party already held by another
  partner: 2001.
- GET: our credentials, with the token the caller used.
- PUT (update, re-negotiation, token rotation): the same callback with the token in the body, a new Token C
  for the caller; the replaced token keeps working for `OCPI_TOKEN_GRACE` seconds (default 0: at once).
  Not registered (Token A): 405.
- DELETE (unregister): every token of the partner dies at once, the token we held for it is dropped, the
  record stays as UNREGISTERED; answered 1000 without `data`. Not registered: 405.

Initiating (the CLI): `register_with` (POST with the partner's Token A), `update_with` (PUT),
`unregister_from` (DELETE). Our token for the callback is stored *before* the request goes out, since the
partner calls our versions URL with it while our request is open.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from litestar import Request, Response, Router, delete, get, post, put

from infra.settings import Settings, mask
from ocpi.compat import CompatProfile
from ocpi.model import BusinessDetails, Credentials, CredentialsRole, Endpoint, ModuleID, Role
from receivers.auth import ALREADY_REGISTERED, AS_REGISTERED, MODULE_OPT, TOKEN_A_ALLOWED
from receivers.outbound import (
    Discovery,
    EndpointsMissing,
    OcpiClient,
    PartnerApiError,
    VersionMismatch,
    require_endpoints,
    url_problem,
)
from receivers.registry import (
    Origin,
    Partner,
    PartnerDirectory,
    PartnerRegistry,
    PartnerStatus,
    RegistryError,
    TokenKind,
    TokenState,
    check_partner_id,
    hash_token,
    new_token,
    party_subject,
    token_generation,
)
from receivers.transport import (
    InvalidParameters,
    MethodNotAllowed,
    NoMatchingEndpoints,
    UnableToUseClientApi,
    Unauthorized,
    UnsupportedVersion,
    allowed_methods,
    decode_body,
    ocpi_data,
    ocpi_response,
)
from receivers.versions import VERSION, our_version_details, versions_url

log = logging.getLogger(__name__)

PATH: Final = f"/ocpi/{VERSION}/credentials"
# The Allow header of our 405s (RFC 9110 requires one): the methods open to an unregistered caller (to a
# registered one: auth.AS_REGISTERED).
_AS_UNREGISTERED: Final = {"Allow": allowed_methods(["GET", "POST"])}
_REPLACED_WHILE_WAITING: Final = "this token was replaced while the request waited; use the current token"
T = TypeVar("T")


def our_roles(settings: Settings) -> list[CredentialsRole]:
    party = settings.party
    details = BusinessDetails(name=party.name, website=party.website or None)
    return [CredentialsRole(role=Role(party.role), business_details=details, party_id=party.party_id,
                            country_code=party.country_code)]


def our_credentials(settings: Settings, token: str, *, url: str | None = None) -> Credentials:
    """Our Credentials (`credentials_example.json` shape): a token for the partner, our versions URL."""
    return Credentials(token=token, url=url or versions_url(settings), roles=our_roles(settings))


class PartnerLocks:
    """One handshake at a time per partner in this process (two POSTs with one Token A must not both win).

    `claims` serialises the final "party still free? then save" step of every handshake in this process: two
    partners registering at once with the same party must not both pass the check made before their callbacks.
    Both hold within one process only; across receiver processes (`serve --workers N`) a handshake saves only
    if it claimed the partner's tokens it read and the parties it takes (`PartnerRegistry.claim`,
    `_claim_or_refuse`, `_check_and_claim_parties`).
    """

    def __init__(self) -> None:
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.claims = asyncio.Lock()

    def __call__(self, partner_id: str) -> asyncio.Lock:
        return self._locks[partner_id]


async def _run(func: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(func, *args)


def _decode_credentials(body: bytes, profile: CompatProfile) -> Credentials:
    credentials = decode_body(body, Credentials, profile).value
    problem = url_problem(credentials.url)
    if problem is not None:
        raise InvalidParameters(f"$.url: {problem}: {credentials.url!r}",
                                data={"path": "$.url", "reason": problem})
    return credentials


async def _check_parties(registry: PartnerRegistry, roles: Iterable[CredentialsRole],
                         partner_id: str) -> None:
    held = await _run(lambda: registry.party_holder(roles, except_id=partner_id))
    if held is not None:
        raise _party_held(held[0])


def _party_held(role: CredentialsRole) -> InvalidParameters:
    # The holder's id is ours to know, not the caller's.
    return _roles_refused(f"party {role.country_code}/{role.party_id} is registered with us through another "
                          "connection")


def _roles_refused(reason: str) -> InvalidParameters:
    """2001 naming `$.roles`, in its message and in `data`, as a push's 2001 names its field."""
    return InvalidParameters(f"$.roles: {reason}", data={"path": "$.roles", "reason": reason})


async def _check_and_claim_parties(registry: PartnerRegistry, roles: Iterable[CredentialsRole],
                                   partner: Partner) -> None:
    """The party check again, just before saving, and a claim of each party the partner does not hold yet on the
    registry as that check read it (`PartnerRegistry.party_state`, `claim`): `PartnerLocks.claims` serialises the
    check and the save within one process only, and two partners taking one party in two receiver processes at
    once would both find it free. The first claim wins; the other partner is refused as if it had come after. A
    partner's own claim stays its own (its retry after a save that failed)."""
    roles = list(roles)
    held, generation = await _run(lambda: registry.party_state(roles, except_id=partner.partner_id))
    if held is not None:
        raise _party_held(held[0])
    for role in roles:
        if partner.owns(role.country_code, role.party_id):
            continue
        subject = party_subject(role.country_code, role.party_id)
        if not await _run(registry.claim, subject, generation, partner.partner_id):
            log.warning("partner %s: party %s/%s was taken by a concurrent registration in another process; "
                        "refused", partner.partner_id, role.country_code, role.party_id)
            raise _party_held(role)


def _check_hub_role(partner: Partner, roles: Iterable[CredentialsRole]) -> None:
    """A Hub acts for any party it names in the routing headers: only a connection the operator agreed to as a
    Hub may claim the role (`partners invite --hub`)."""
    role = partner.unagreed_hub_role(roles)
    if role is not None:
        raise _roles_refused(f"{role.country_code}/{role.party_id} claims the role HUB, which was not agreed for "
                             "this connection; ask us to connect you as a Hub")


async def _callback(credentials: Credentials, profile: CompatProfile, settings: Settings,
                    ours: list[Endpoint]) -> Discovery:
    """GET the client's versions and version details with the token it just gave us; 3001/3002/3003."""
    async with OcpiClient(credentials.token, profile=profile,
                          timeout=settings.partners.outbound_timeout_s) as client:
        try:
            discovery = await client.discover(credentials.url)
            require_endpoints(discovery, ours)
        except VersionMismatch as exc:
            raise UnsupportedVersion(str(exc)) from None
        except EndpointsMissing as exc:
            raise NoMatchingEndpoints(str(exc)) from None
        except PartnerApiError as exc:
            # Not what the URL answered: the caller chose the URL (any host we can reach); our log has it.
            log.warning("credentials callback to %s failed: %s", credentials.url, exc)
            raise UnableToUseClientApi(f"could not use your API with the token you sent: {exc.summary}") from None
    return discovery


def _apply_registration(partner: Partner, credentials: Credentials, discovery: Discovery) -> None:
    partner.roles = list(credentials.roles)
    partner.outbound_token = credentials.token
    partner.versions_url = credentials.url
    partner.version = discovery.version
    partner.endpoints = list(discovery.endpoints)


def _context(request: Request[Any, Any, Any]) -> tuple[PartnerDirectory, PartnerLocks, Settings]:
    state = request.app.state
    return state.partners, state.credential_locks, state.settings


@get("/")
async def get_credentials(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Our credentials, holding the token the caller used to ask (the one it uses to access us)."""
    return ocpi_response(ocpi_data(our_credentials(request.app.state.settings, request.state.token)))


@post("/", status_code=200)
async def post_credentials(request: Request[Any, Any, Any]) -> Response[bytes]:
    """A registration: the caller holds our Token A and sends its credentials (07 §2 steps 3-5)."""
    caller: Partner = request.state.partner
    if request.state.token_kind is not TokenKind.A:
        raise MethodNotAllowed("already registered: use PUT to update the credentials, DELETE to unregister",
                               headers=AS_REGISTERED)
    credentials = _decode_credentials(await request.body(), caller.profile)
    directory, locks, settings = _context(request)
    registry = directory.registry
    async with locks(caller.partner_id):
        partner = await _run(registry.get, caller.partner_id)
        presented = hash_token(request.state.token)
        if partner is None or partner.status is not PartnerStatus.INVITED or not any(
                t.sha256 == presented and t.kind is TokenKind.A for t in partner.valid_tokens()):
            raise MethodNotAllowed(ALREADY_REGISTERED, headers=AS_REGISTERED)
        _check_hub_role(partner, credentials.roles)
        await _check_parties(registry, credentials.roles, partner.partner_id)
        discovery = await _callback(credentials, partner.profile, settings,
                                    our_version_details(request.app, settings).endpoints)
        async with locks.claims:
            partner = await _as_stored_now(registry, partner.partner_id, request.state.token, PartnerStatus.INVITED)
            # Again after the callback: another partner may have claimed one of these parties meanwhile.
            await _check_and_claim_parties(registry, credentials.roles, partner)
            generation = token_generation(partner)
            _apply_registration(partner, credentials, discovery)
            partner.status = PartnerStatus.REGISTERED
            partner.origin = Origin.PARTNER
            partner.registered_at = datetime.now(UTC)
            partner.revoke_tokens(kinds=[TokenKind.A])
            token_c = partner.issue_token(TokenKind.C)
            await _claim_or_refuse(registry, partner.partner_id, generation, token_c,
                                   MethodNotAllowed(ALREADY_REGISTERED, headers=AS_REGISTERED))
            await _run(registry.save, partner)
            directory.apply(partner)
    log.info("partner %s registered (version %s, roles %s)", partner.partner_id, partner.version,
             [f"{r.country_code}/{r.party_id}" for r in partner.roles])
    return ocpi_response(ocpi_data(our_credentials(settings, token_c)))


def _require_current_token(partner: Partner, token: str) -> None:
    """The token the request was authenticated with must still be valid now that we hold the partner's lock:
    a PUT that finished meanwhile may have replaced it (07 §1: replaced tokens are no longer valid)."""
    presented = hash_token(token)
    if not any(t.sha256 == presented for t in partner.valid_tokens()):
        raise Unauthorized(_REPLACED_WHILE_WAITING)


async def _as_stored_now(registry: PartnerRegistry, partner_id: str, token: str,
                         status: PartnerStatus) -> Partner:
    """The partner as stored now, after the callback, which lasts as long as the caller makes it: an operator (in
    another process) may have deleted, suspended or re-invited the partner meanwhile, and saving the record read
    before the callback would undo that (a deleted partner REGISTERED again, with a new Token C)."""
    partner = await _run(registry.get, partner_id)
    if partner is not None and status is PartnerStatus.INVITED and _registered_with(partner, token):
        # Another POST with this Token A (in another receiver process, whose lock this one does not share)
        # registered the partner meanwhile: a second use of a used Token A.
        raise MethodNotAllowed(ALREADY_REGISTERED, headers=AS_REGISTERED)
    if partner is None or partner.status is not status:
        raise Unauthorized("this connection was changed by our operator while the request waited")
    _require_current_token(partner, token)
    return partner


def _registered_with(partner: Partner, token: str) -> bool:
    """Whether the partner is registered through a POST that spent `token`, its Token A."""
    presented = hash_token(token)
    return partner.status is PartnerStatus.REGISTERED and any(
        t.sha256 == presented and t.kind is TokenKind.A and t.state is TokenState.REVOKED
        for t in partner.inbound_tokens)


async def _claim_or_refuse(registry: PartnerRegistry, partner_id: str, generation: str, token_c: str,
                           refusal: Exception) -> None:
    """Save only as the one handshake that claimed the tokens it read (`PartnerRegistry.claim`): another one that
    read them too, in another receiver process, claimed them first, and its Token C (or its unregistration) is the
    one that stays; this caller is refused as if it had come after (it would have found its token used or
    replaced). A DELETE claims with a token it never issues."""
    if not await _run(registry.claim, partner_id, generation, hash_token(token_c)):
        log.warning("partner %s: a concurrent credentials handshake in another process went first; refused",
                    partner_id)
        raise refusal


def _require_registered(request: Request[Any, Any, Any]) -> Partner:
    caller: Partner = request.state.partner
    if request.state.token_kind is TokenKind.A or caller.status is not PartnerStatus.REGISTERED:
        raise MethodNotAllowed("not registered: register with POST (and Token A) first",
                               headers=_AS_UNREGISTERED)
    return caller


@put("/")
async def put_credentials(request: Request[Any, Any, Any]) -> Response[bytes]:
    """An update: a new token for us to use, maybe new version/endpoints/roles; a new token for the caller."""
    caller = _require_registered(request)
    credentials = _decode_credentials(await request.body(), caller.profile)
    directory, locks, settings = _context(request)
    registry = directory.registry
    async with locks(caller.partner_id):
        partner = await _run(registry.get, caller.partner_id)
        if partner is None or partner.status is not PartnerStatus.REGISTERED:
            raise MethodNotAllowed("not registered: register with POST (and Token A) first",
                                   headers=_AS_UNREGISTERED)
        _require_current_token(partner, request.state.token)
        _check_hub_role(partner, credentials.roles)
        await _check_parties(registry, credentials.roles, partner.partner_id)
        # 07 §3: fetch versions and endpoints again, even when the version is unchanged.
        discovery = await _callback(credentials, partner.profile, settings,
                                    our_version_details(request.app, settings).endpoints)
        async with locks.claims:
            partner = await _as_stored_now(registry, partner.partner_id, request.state.token,
                                           PartnerStatus.REGISTERED)
            await _check_and_claim_parties(registry, credentials.roles, partner)
            generation = token_generation(partner)
            _apply_registration(partner, credentials, discovery)
            token_c = partner.issue_token(TokenKind.C)
            partner.retire_tokens(keep=[hash_token(token_c)], grace_s=settings.partners.token_grace_s)
            await _claim_or_refuse(registry, partner.partner_id, generation, token_c,
                                   Unauthorized(_REPLACED_WHILE_WAITING))
            await _run(registry.save, partner)
            directory.apply(partner)
    log.info("partner %s updated its credentials (version %s)", partner.partner_id, partner.version)
    return ocpi_response(ocpi_data(our_credentials(settings, token_c)))


@delete("/", status_code=200)
async def delete_credentials(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Unregister: both sides stop all automated communication; every token of the caller dies now."""
    caller = _require_registered(request)
    directory, locks, _ = _context(request)
    registry = directory.registry
    async with locks(caller.partner_id):
        partner = await _run(registry.get, caller.partner_id)
        if partner is None or partner.status is not PartnerStatus.REGISTERED:
            raise MethodNotAllowed("not registered", headers=_AS_UNREGISTERED)
        _require_current_token(partner, request.state.token)
        # Claimed as a PUT claims: a PUT in another process that read the partner before this DELETE saves would
        # otherwise register it again, with a new Token C, after the DELETE was answered.
        await _claim_or_refuse(registry, partner.partner_id, token_generation(partner), new_token(),
                               Unauthorized(_REPLACED_WHILE_WAITING))
        await _run(registry.unregister, partner)
        directory.apply(partner)
    log.info("partner %s unregistered", partner.partner_id)
    return ocpi_response()


router = Router(path=PATH,
                route_handlers=[get_credentials, post_credentials, put_credentials, delete_credentials],
                opt={MODULE_OPT: ModuleID.CREDENTIALS.value, TOKEN_A_ALLOWED: True})


# --- initiating: the CLI side -----------------------------------------------------------------------------


class HandshakeError(Exception):
    """A handshake we started failed; the message says where and why (never with a token in it)."""


def _explain(exc: PartnerApiError, our_versions_url: str) -> str:
    text = str(exc)
    if exc.ocpi_status == 3001:
        text += (f" (the partner could not call us back at {our_versions_url}: is `ocpi-pipeline dev` or "
                 "`serve` running there, and is OCPI_PUBLIC_URL the address the partner can reach?)")
    return text


class Initiator:
    """Starts handshakes toward partners: register (POST), update (PUT), unregister (DELETE).

    `ours` are the endpoints we serve (for the "module in common" check); `our_versions_url` is what we tell
    the partner to call back (a running instance's URL when the CLI talks to `dev`).
    """

    def __init__(self, registry: PartnerRegistry, settings: Settings, *, ours: list[Endpoint],
                 our_versions_url: str | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.ours = ours
        self.our_versions_url = our_versions_url or versions_url(settings)

    def _client(self, token: str, profile: CompatProfile) -> OcpiClient:
        return OcpiClient(token, profile=profile, timeout=self.settings.partners.outbound_timeout_s)

    async def _discover(self, client: OcpiClient, url: str) -> Discovery:
        try:
            discovery = await client.discover(url)
            require_endpoints(discovery, self.ours)
        except PartnerApiError as exc:
            raise HandshakeError(str(exc)) from None
        return discovery

    async def register(self, *, versions_url: str, token_a: str, partner_id: str, name: str | None = None,
                       compat: Iterable[str] = (), hub: bool = False) -> Partner:
        """07 §2 as the Sender: discover with Token A, POST our credentials with a new Token B, keep C. `hub`: the
        operator agrees that the partner is a Hub (otherwise a HUB role in its answer undoes the registration)."""
        profile = CompatProfile.from_names(list(compat))
        check_partner_id(partner_id)
        existing = await _run(self.registry.get, partner_id)
        if existing is not None and existing.status not in (PartnerStatus.UNREGISTERED,
                                                            PartnerStatus.DELETED):
            raise HandshakeError(f"partner {partner_id!r} exists already ({existing.status.value}); use "
                                 "`partners update` for a registered one, or delete it first")
        async with self._client(token_a, profile) as client:
            discovery = await self._discover(client, versions_url)
            now = datetime.now(UTC)
            partner = Partner(partner_id=partner_id, name=name or partner_id,
                              status=PartnerStatus.REGISTERING, origin=Origin.US,
                              compat=list(profile.names), versions_url=versions_url, hub=hub,
                              version=discovery.version, endpoints=list(discovery.endpoints),
                              created_at=existing.created_at if existing else now, updated_at=now)
            if existing is not None:
                partner.inbound_tokens = existing.inbound_tokens
                partner.revoke_tokens()
            token_b = partner.issue_token(TokenKind.B)
            await _run(self.registry.save, partner)  # before the POST: the partner calls us back with Token B
            try:
                ours = our_credentials(self.settings, token_b, url=self.our_versions_url)
                theirs = await client.credentials("POST", discovery.credentials_url, ours)
            except PartnerApiError as exc:
                await self._abandon(partner)  # without its token for us there is no connection to keep
                if not exc.without_effect:
                    raise HandshakeError(
                        f"{exc}; the partner may have accepted our registration all the same (no answer, or one we "
                        "cannot use), its Token A then spent: should it refuse this Token A from now on, ask it to "
                        "drop our registration and for a new Token A") from None
                raise HandshakeError(_explain(exc, self.our_versions_url)) from None
            assert theirs is not None
        stored = await _run(self.registry.get, partner_id)
        if stored is None or stored.status is not PartnerStatus.REGISTERING or not _holds(stored, token_b):
            # An operator deleted, suspended or replaced it while our POST was open (the partner decides how long):
            # saving the record read before would undo that.
            undone = await self._undo_remote(theirs, discovery, profile)
            raise HandshakeError(f"partner {partner_id!r} was changed here while our registration was open (it is "
                                 f"{stored.status.value if stored else 'gone'} now, and stays so); {undone}")
        partner = stored
        hub_role = partner.unagreed_hub_role(theirs.roles)
        if hub_role is not None:
            undone = await self._undo_remote(theirs, discovery, profile)
            await self._abandon(partner)
            raise HandshakeError(f"the partner's party {hub_role.country_code}/{hub_role.party_id} has the role HUB "
                                 f"(a Hub acts for any party it names); {undone}: register again with --hub if "
                                 "that is agreed")
        held = await _run(lambda: self.registry.party_holder(theirs.roles, except_id=partner_id))
        if held is not None:
            undone = await self._undo_remote(theirs, discovery, profile)
            await self._abandon(partner)
            role, holder = held
            raise HandshakeError(f"the partner's party {role.country_code}/{role.party_id} belongs to our "
                                 f"partner {holder!r}; {undone}")
        partner.status = PartnerStatus.REGISTERED
        partner.roles = list(theirs.roles)
        partner.outbound_token = theirs.token
        partner.versions_url = _their_versions_url(theirs, versions_url)
        partner.registered_at = datetime.now(UTC)
        await _run(self.registry.save, partner)
        return partner

    async def _abandon(self, partner: Partner) -> None:
        partner.status = PartnerStatus.DELETED
        partner.revoke_tokens()
        partner.outbound_token = None
        await _run(self.registry.save, partner)

    async def _undo_remote(self, theirs: Credentials, discovery: Discovery, profile: CompatProfile) -> str:
        """DELETE the registration the partner just accepted; what became of it, for the operator."""
        try:
            async with self._client(theirs.token, profile) as client:
                await client.credentials("DELETE", discovery.credentials_url)
        except PartnerApiError as exc:
            log.warning("could not undo the registration at %s: %s", discovery.credentials_url, exc)
            return (f"the registration was dropped here, but the partner did not confirm our credentials DELETE "
                    f"({exc}) and may still hold it: ask it to drop it")
        return "the registration was undone"

    def _registered(self, partner: Partner) -> tuple[str, str]:
        if partner.status is not PartnerStatus.REGISTERED:
            hint = " (`partners resume` it first)" if partner.status is PartnerStatus.SUSPENDED else ""
            raise HandshakeError(f"partner {partner.partner_id!r} is {partner.status.value}; only a REGISTERED "
                                 f"partner can do this{hint}")
        if not partner.outbound_token or not partner.versions_url:
            raise HandshakeError(f"partner {partner.partner_id!r} is {partner.status.value} without a credentials "
                                 "handshake; only a partner registered through the credentials handshake can do "
                                 "this")
        return partner.outbound_token, partner.versions_url

    async def update(self, partner_id: str) -> Partner:
        """07 §4 as the caller: re-discover, PUT our credentials with a new token, take the partner's."""
        partner = await _run(self.registry.require, partner_id)
        token, url = self._registered(partner)
        profile = partner.profile
        async with self._client(token, profile) as client:
            discovery = await self._discover(client, url)
            # Read again after each call (their length is the partner's): saving the record read before would
            # undo what an operator did meanwhile (a deleted or suspended partner REGISTERED again).
            partner = await _run(self.registry.require, partner_id)
            if self._registered(partner)[0] != token:
                raise HandshakeError(f"partner {partner_id!r} was updated meanwhile; nothing changed: try again")
            new_token = partner.issue_token(TokenKind.B)
            await _run(self.registry.save, partner)  # the partner calls us back with it during the PUT
            try:
                ours = our_credentials(self.settings, new_token, url=self.our_versions_url)
                theirs = await client.credentials("PUT", discovery.credentials_url, ours)
            except PartnerApiError as exc:
                if not exc.without_effect:
                    # The partner may hold our new token now, and only that one (it gets it with the PUT and calls
                    # us back with it): revoking it would refuse its every push. Both stay until the next update.
                    raise HandshakeError(
                        f"{exc}; the partner may have applied our credentials PUT: the token it had and the new one "
                        f"both keep working here. Run `partners update {partner_id}` again; should the partner then "
                        "refuse our token, it applied the PUT and its answer was lost: ask it for a new Token A, "
                        "`partners delete` this partner and register again") from None
                stored = await _run(self.registry.get, partner_id)
                if stored is not None:
                    stored.revoke_tokens(sha256=hash_token(new_token))
                    await _run(self.registry.save, stored)
                raise HandshakeError(_explain(exc, self.our_versions_url)) from None
            assert theirs is not None
        stored = await _run(self.registry.get, partner_id)
        if stored is None or stored.status not in (PartnerStatus.REGISTERED, PartnerStatus.SUSPENDED) or \
                not _holds(stored, new_token):
            raise HandshakeError(f"partner {partner_id!r} was changed here while our credentials PUT was open (it is "
                                 f"{stored.status.value if stored else 'gone'} now, and stays so); the partner has "
                                 "renewed its tokens, which are not kept here")
        partner = stored  # a suspension made meanwhile stays, with the tokens the partner now holds
        partner.retire_tokens(keep=[hash_token(new_token)], grace_s=self.settings.partners.token_grace_s)
        partner.outbound_token = theirs.token
        partner.versions_url = _their_versions_url(theirs, url)
        partner.version = discovery.version
        partner.endpoints = list(discovery.endpoints)
        hub_role = partner.unagreed_hub_role(theirs.roles)
        held = await _run(lambda: self.registry.party_holder(theirs.roles, except_id=partner_id))
        if held is None and hub_role is None:
            partner.roles = list(theirs.roles)
        await _run(self.registry.save, partner)
        if hub_role is not None:
            raise HandshakeError(f"tokens were renewed, but the partner now claims the role HUB for "
                                 f"{hub_role.country_code}/{hub_role.party_id}, which was not agreed: roles left "
                                 "unchanged")
        if held is not None:
            role, holder = held
            raise HandshakeError(f"tokens were renewed, but the partner now claims {role.country_code}/"
                                 f"{role.party_id}, held by partner {holder!r}: roles left unchanged")
        return partner

    async def unregister(self, partner_id: str) -> Partner:
        """07 §3 DELETE as the caller: the partner forgets our token; we drop every token we hold."""
        partner = await _run(self.registry.require, partner_id)
        token, url = self._registered(partner)
        async with self._client(token, partner.profile) as client:
            endpoint = partner.endpoint(ModuleID.CREDENTIALS)
            if endpoint is not None:
                credentials_url = endpoint.url
            else:
                credentials_url = (await self._discover(client, url)).credentials_url
            try:
                await client.credentials("DELETE", credentials_url)
            except PartnerApiError as exc:
                maybe = "" if exc.without_effect else (
                    ", but the partner may have applied it (should it refuse our token from now on, it did: "
                    "`partners delete` then drops the partner here)")
                raise HandshakeError(f"{exc}; nothing changed here{maybe} (`partners suspend` stops the partner "
                                     "locally)") from None
        return await _run(self.registry.unregister, partner)


def _their_versions_url(theirs: Credentials, reached_at: str) -> str:
    """The versions URL of the partner's credentials answer, where every later update starts; the URL we reached
    it at when the answer's is not one we can call (a relative URL would make the connection unchangeable)."""
    problem = url_problem(theirs.url)
    if problem is None:
        return theirs.url
    log.warning("the partner answered with the versions URL %r, which is %s; keeping %s", theirs.url, problem,
                reached_at)
    return reached_at


def _holds(partner: Partner, token: str) -> bool:
    """Whether `token` is one of the partner's inbound tokens valid now."""
    digest = hash_token(token)
    return any(t.sha256 == digest for t in partner.valid_tokens())


def describe_token(token: str | None) -> str:
    """How a token we hold for a partner is shown anywhere: masked."""
    return mask(token or "") or "(none)"


def rotate_locally(registry: PartnerRegistry, settings: Settings,
                   partner_id: str) -> tuple[Partner, str, str]:
    """Rotation without a handshake: a new Token A for an invited partner, or a new token for an operator-
    provisioned one (handed over out of band). Returns (partner, token kind, token). A partner registered
    through the handshake is rotated with `Initiator.update` (a credentials PUT) instead."""
    partner = registry.require(partner_id)
    if partner.status is PartnerStatus.INVITED:
        return registry.require(partner_id), "A", registry.reinvite(partner_id)
    live = partner.status in (PartnerStatus.REGISTERED, PartnerStatus.SUSPENDED)
    if live and partner.origin is Origin.OPERATOR:
        token = partner.issue_token(TokenKind.C)
        partner.retire_tokens(keep=[hash_token(token)], grace_s=settings.partners.token_grace_s)
        registry.save(partner)
        return partner, "C", token
    if partner.status is PartnerStatus.SUSPENDED:  # invited, or registered through the handshake (a PUT, whose
        # callback a suspended partner's tokens would refuse)
        raise RegistryError(f"partner {partner_id!r} is SUSPENDED; `partners resume` it first")
    raise RegistryError(f"partner {partner_id!r} is {partner.status.value} ({partner.origin.value.lower()}); "
                        "nothing to rotate here")
