"""Fixtures and helpers for testing the receivers app in-process: a per-test ClickHouse database on the
session's chDB path holds the partner registry, and a fake sink stands in for Kafka.

Import the fixtures into a test module: `from tests.unit.receivers.app_support import app_env, make_env`.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from infra.clickhouse.client import connect
from infra.clickhouse.migrations import migrate
from infra.settings import Settings
from receivers.app import create_app
from receivers.registry import PartnerRegistry, credentials_role


def auth(token: str) -> dict[str, str]:
    return {"Authorization": "Token " + base64.b64encode(token.encode()).decode()}


def routing(from_: tuple[str, str] | None = None, to: tuple[str, str] | None = None) -> dict[str, str]:
    headers = {}
    if from_:
        headers.update({"OCPI-from-country-code": from_[0], "OCPI-from-party-id": from_[1]})
    if to:
        headers.update({"OCPI-to-country-code": to[0], "OCPI-to-party-id": to[1]})
    return headers


@contextlib.asynccontextmanager
async def concurrent_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A really concurrent ASGI client (AsyncTestClient runs its requests one after the other), with the app's
    lifespan running."""
    async with AsyncTestClient(app=app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                           base_url="http://testserver") as client:
        yield client


class FakeSink:
    """Stands in for the Kafka publisher: acknowledges every record and keeps it."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []

    async def publish(self, topic: str, key: bytes, value: bytes, *, since: float | None = None) -> None:
        self.records.append((topic, key, value))


@dataclass
class AppEnv:
    settings: Settings
    registry: PartnerRegistry
    sink: FakeSink
    make_app: Callable[..., Litestar]
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def app(self) -> Litestar:
        return self.make_app()

    def provision(self, partner_id: str, *parties: tuple[str, str, str], compat: tuple[str, ...] = ()) -> str:
        """An operator-provisioned partner with (country, party, role) roles; returns its token."""
        roles = [credentials_role(country_code=c, party_id=p, role=r) for c, p, r in parties]
        token = self.registry.register_direct(partner_id, partner_id, roles, compat=compat)[1]
        self.tokens[partner_id] = token
        return token


@pytest.fixture
def make_env(settings_for: Callable[..., Settings], chdb_dsn: str) -> Callable[..., AppEnv]:
    """Build an AppEnv; keyword arguments are extra OCPI_* environment settings."""

    def build(**env: str) -> AppEnv:
        settings = settings_for(**{"OCPI_OUTBOUND_TIMEOUT": "3", **env})
        client = connect(chdb_dsn)
        migrate(client, settings.clickhouse.database)
        client.database = settings.clickhouse.database
        registry = PartnerRegistry(client)
        sink = FakeSink()

        def make_app() -> Litestar:
            return create_app(settings, sink=sink, registry_factory=lambda: registry)

        return AppEnv(settings=settings, registry=registry, sink=sink, make_app=make_app)

    return build


@pytest.fixture
def app_env(make_env: Callable[..., AppEnv]) -> AppEnv:
    return make_env()
