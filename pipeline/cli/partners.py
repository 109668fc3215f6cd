"""`ocpi-pipeline partners ...`: the partner registry and the credentials handshake, from the command line.

Works against a ClickHouse server and against the embedded store while `dev` holds it (through the running
instance's ClickHouse-HTTP shim, found in the run file, like `query`). Output is one `key: value` per line
(or JSON), so scripts can read it. Tokens we hold for partners are always masked; a token a partner must
present to us is printed once, when it is created (that is the hand-over).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlparse

import click
from clickhouse_connect.driver.exceptions import ClickHouseError
from rich.console import Console
from rich.text import Text

from infra.clickhouse.client import ClickHouseUnavailable, connect, effective_dsn
from infra.clickhouse.migrations import MigrationError, migrate
from infra.runfile import read_running_instance
from infra.settings import Settings, load_settings
from pipeline.cli.tables import folded_table
from receivers.credentials import HandshakeError, Initiator, describe_token, rotate_locally
from receivers.registry import (
    Origin,
    Partner,
    PartnerRegistry,
    PartnerStatus,
    RegistryError,
    TokenState,
    record_json,
)

P = ParamSpec("P")
R = TypeVar("R")


def _fails_cleanly(func: Callable[P, R]) -> Callable[P, R]:
    """Registry, handshake and store errors as one line (exit 1), never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (RegistryError, HandshakeError, ClickHouseUnavailable, MigrationError) as exc:
            raise click.ClickException(str(exc)) from None
        except ClickHouseError as exc:
            raise click.ClickException(f"the partner registry could not be read or written: {exc}") from None
        except ValueError as exc:  # an unknown compatibility name, from CompatProfile.from_names
            raise click.ClickException(str(exc)) from None

    return wrapper


def _registry(settings: Settings) -> PartnerRegistry:
    # The route connect_for takes (a running instance's shim where one holds chDB), but without selecting the
    # database first: on a fresh store the migrations create it, and its tables (idempotent otherwise).
    dsn, password = effective_dsn(settings)
    client = connect(dsn, password=password)
    migrate(client, settings.clickhouse.database)
    client.database = settings.clickhouse.database
    return PartnerRegistry(client)


def _our_versions_url(settings: Settings) -> str:
    """Where partners call us back: the running `dev` instance's URL, else the configured public URL."""
    from receivers.versions import versions_url

    instance = read_running_instance(settings.storage.path)
    return instance.versions_url if instance is not None else versions_url(settings)


def _initiator(settings: Settings, registry: PartnerRegistry) -> Initiator:
    from receivers.app import create_app
    from receivers.versions import served_endpoints

    # The endpoints we serve, read from the app's routes (the same list our version details publish).
    ours = served_endpoints(create_app(settings), settings.http.base_url)
    return Initiator(registry, settings, ours=ours, our_versions_url=_our_versions_url(settings))


def _compat(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def _emit(**fields: Any) -> None:
    for key, value in fields.items():
        click.echo(f"{key}: {'' if value is None else value}")


def _roles(partner: Partner) -> str:
    return ", ".join(f"{r.country_code}/{r.party_id} {r.role.value}" for r in partner.roles) or "-"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else "-"


def _summary(partner: Partner) -> None:
    _emit(partner_id=partner.partner_id, status=partner.status.value, version=partner.version or "-",
          roles=_roles(partner), token_for_partner=describe_token(partner.outbound_token))


_COMPAT_HELP = ("Compatibility profile: comma-separated names (RAW_TOKEN, DATETIME_OFFSET, NULL_IN_LIST, "
                "...; see docs/partners.md). Default: strict.")


@click.group()
def partners() -> None:
    """Partners: invitations, the credentials handshake, tokens and compatibility profiles.

    Example: ocpi-pipeline partners invite cpo-acme --name "ACME Charging"
    """


_HUB_HELP = ("The partner is a Hub (role HUB): it may act for any party it names in the routing headers. Without "
             "this flag a registration claiming the role HUB is refused.")


@partners.command()
@click.argument("partner_id")
@click.option("--name", default=None, help="Display name (default: the id).")
@click.option("--compat", default=None, help=_COMPAT_HELP)
@click.option("--hub", is_flag=True, help=_HUB_HELP)
@_fails_cleanly
def invite(partner_id: str, name: str | None, compat: str | None, hub: bool) -> None:
    """Create a Token A for a new partner and print it with our versions URL.

    Hand both to the partner over a secure channel; it registers with them (credentials POST). Token A works
    only on versions and credentials, and dies when the registration succeeds.

    Example: ocpi-pipeline partners invite cpo-acme --name "ACME Charging"
    """
    settings = load_settings()
    partner, token_a = _registry(settings).invite(partner_id, name or partner_id, compat=_compat(compat), hub=hub)
    _emit(partner_id=partner.partner_id, token_a=token_a, versions_url=_our_versions_url(settings))


@partners.command("list")
@click.option("--all", "include_deleted", is_flag=True, help="Include deleted partners.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@_fails_cleanly
def list_cmd(include_deleted: bool, fmt: str) -> None:
    """List partners: status, roles, version, tokens (masked).

    Example: ocpi-pipeline partners list --format json
    """
    found = _registry(load_settings()).all(include_deleted=include_deleted)
    if fmt == "json":
        click.echo(json.dumps([record_json(p) for p in found], indent=2, default=str))
        return
    table = folded_table("partner", "status", "roles", "version", "origin", "valid tokens", "token for partner",
                  "updated")
    for p in found:
        tokens = ", ".join(t.kind.value for t in p.valid_tokens()) or "-"
        # Text, not str: rich would read brackets in a value the partner chose (a party id) as markup.
        table.add_row(*map(Text, (p.partner_id, p.status.value, _roles(p), p.version or "-", p.origin.value.lower(),
                                  tokens, describe_token(p.outbound_token), _when(p.updated_at))))
    Console(width=160).print(table)


@partners.command()
@click.argument("partner_id")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@_fails_cleanly
def show(partner_id: str, fmt: str) -> None:
    """Everything about one partner: roles, endpoints, token states, profile (tokens masked).

    Example: ocpi-pipeline partners show cpo-acme
    """
    partner = _registry(load_settings()).require(partner_id)
    if fmt == "json":
        click.echo(json.dumps(record_json(partner), indent=2, default=str))
        return
    _emit(partner_id=partner.partner_id, name=partner.name, status=partner.status.value,
          origin=partner.origin.value.lower(), version=partner.version or "-",
          versions_url=partner.versions_url or "-", roles=_roles(partner),
          compat=",".join(partner.profile.names) or "strict",
          token_for_partner=describe_token(partner.outbound_token), created=_when(partner.created_at),
          registered=_when(partner.registered_at), updated=_when(partner.updated_at))
    for endpoint in partner.endpoints:
        click.echo(f"endpoint: {endpoint.identifier} {endpoint.role.value} {endpoint.url}")
    for token in partner.inbound_tokens:
        # A revoked token keeps the end of the grace it was retired with: not a validity to show.
        until = f" until {_when(token.expires_at)}" if token.state is TokenState.RETIRING else ""
        click.echo(f"token: {token.kind.value} {token.state.value}{until} issued {_when(token.issued_at)} "
                   f"sha256:{token.sha256[:12]}")


@partners.command()
@click.argument("partner_id")
@_fails_cleanly
def rotate(partner_id: str) -> None:
    """Renew a partner's tokens.

    Invited: a new Token A (the old one dies). Registered through the handshake: a credentials update (PUT)
    toward the partner, which renews both tokens. Provisioned by an operator: a new token, printed once.

    Example: ocpi-pipeline partners rotate cpo-acme
    """
    settings = load_settings()
    registry = _registry(settings)
    partner = registry.require(partner_id)
    if partner.status is PartnerStatus.REGISTERED and partner.origin is not Origin.OPERATOR:
        _summary(asyncio.run(_initiator(settings, registry).update(partner_id)))
        return
    partner, kind, token = rotate_locally(registry, settings, partner_id)
    if kind == "A":
        _emit(partner_id=partner.partner_id, token_a=token, versions_url=_our_versions_url(settings))
    else:
        _emit(partner_id=partner.partner_id, token=token)


@partners.command()
@click.argument("partner_id")
@_fails_cleanly
def suspend(partner_id: str) -> None:
    """Stop a partner: every token answers 401 (within 2 s on running receivers) until `resume`.

    Example: ocpi-pipeline partners suspend cpo-acme
    """
    _summary(_registry(load_settings()).set_status(partner_id, PartnerStatus.SUSPENDED))


@partners.command()
@click.argument("partner_id")
@_fails_cleanly
def resume(partner_id: str) -> None:
    """Undo `suspend`: the partner's tokens work again.

    Example: ocpi-pipeline partners resume cpo-acme
    """
    _summary(_registry(load_settings()).set_status(partner_id, PartnerStatus.REGISTERED))


@partners.command()
@click.argument("partner_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_fails_cleanly
def delete(partner_id: str, yes: bool) -> None:
    """Forget a partner locally: every token dies; a tombstone keeps the id for the audit trail.

    The partner is not told: use `partners unregister` first for a partner registered by handshake.

    Example: ocpi-pipeline partners delete cpo-acme --yes
    """
    settings = load_settings()
    registry = _registry(settings)
    registry.require(partner_id)
    if not yes:
        click.confirm(f"delete partner {partner_id!r} and revoke all its tokens?", abort=True)
    _summary(registry.delete(partner_id))


@partners.command()
@click.argument("partner_id")
@click.argument("names", required=False, default="")
@_fails_cleanly
def compat(partner_id: str, names: str) -> None:
    """Set a partner's compatibility profile (comma-separated names; empty = strict).

    Example: ocpi-pipeline partners compat cpo-acme RAW_TOKEN,DATETIME_OFFSET
    """
    partner = _registry(load_settings()).set_compat(partner_id, _compat(names))
    _emit(partner_id=partner.partner_id, compat=",".join(partner.compat) or "strict")


def _default_id(versions_url: str) -> str:
    """A partner id from the versions URL's host (and port), e.g. `ocpi-acme-com`."""
    netloc = urlparse(versions_url).netloc.rsplit("@", 1)[-1]
    return re.sub(r"[^A-Za-z0-9]+", "-", netloc).strip("-").lower()[:64] or "partner"


@partners.command()
@click.option("--versions-url", required=True, help="The partner's versions URL (sent with its token).")
@click.option("--token", "token_a", required=True, help="The Token A the partner issued to us.")
@click.option("--id", "partner_id", default=None, help="Our id for the partner (default: the URL's host).")
@click.option("--name", default=None, help="Display name (default: the id).")
@click.option("--compat", default=None, help=_COMPAT_HELP)
@click.option("--hub", is_flag=True, help=_HUB_HELP)
@_fails_cleanly
def register(versions_url: str, token_a: str, partner_id: str | None, name: str | None,
             compat: str | None, hub: bool) -> None:
    """Register with a partner (we are the Sender of the credentials handshake).

    GETs the partner's versions and 2.2.1 details with its Token A, POSTs our credentials with a new token
    for it, and stores the token it returns. Our receivers must be running and reachable at our versions
    URL: the partner calls it back during the POST.

    Example: ocpi-pipeline partners register --versions-url https://cpo.example.com/ocpi/versions --token T
    """
    settings = load_settings()
    registry = _registry(settings)
    initiator = _initiator(settings, registry)
    partner = asyncio.run(initiator.register(versions_url=versions_url, token_a=token_a,
                                             partner_id=partner_id or _default_id(versions_url), name=name,
                                             compat=_compat(compat), hub=hub))
    _summary(partner)


@partners.command()
@click.argument("partner_id")
@_fails_cleanly
def update(partner_id: str) -> None:
    """Update our registration with a partner (credentials PUT): new tokens both ways, endpoints re-read.

    Use it after our endpoints or roles changed, or to rotate tokens.

    Example: ocpi-pipeline partners update cpo-acme
    """
    settings = load_settings()
    registry = _registry(settings)
    _summary(asyncio.run(_initiator(settings, registry).update(partner_id)))


@partners.command()
@click.argument("partner_id")
@_fails_cleanly
def unregister(partner_id: str) -> None:
    """Unregister from a partner (credentials DELETE); then every token of the connection is dead.

    Example: ocpi-pipeline partners unregister cpo-acme
    """
    settings = load_settings()
    registry = _registry(settings)
    _summary(asyncio.run(_initiator(settings, registry).unregister(partner_id)))
