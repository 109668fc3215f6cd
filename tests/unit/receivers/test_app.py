"""The app's assembly (receivers.app.create_app)."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from receivers.app import create_app
from receivers.registry import PartnerDirectory
from tests.unit.receivers.app_support import AppEnv, app_env, make_env  # noqa: F401

pytestmark = pytest.mark.clickhouse


async def test_on_startup_runs_once_the_lifespan_has_started(app_env: AppEnv) -> None:  # noqa: F811
    """receivers.asgi freezes the startup objects there (infra.gc_tuning): the publisher and the partners loaded."""
    seen: list[object] = []
    app = create_app(app_env.settings, sink=app_env.sink, registry_factory=lambda: app_env.registry,
                     on_startup=[lambda: seen.append(app.state.partners)])
    assert not seen
    async with AsyncTestClient(app):
        assert len(seen) == 1
        assert isinstance(seen[0], PartnerDirectory)
