"""Fixtures of the pipeline's unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.client import Client

from infra.clickhouse.client import connect
from infra.clickhouse.migrations import migrate
from tests.conftest import unique


@pytest.fixture
def client(chdb_dsn: str) -> Iterator[Client]:
    """A client of a freshly migrated database of its own on the session's chDB store, dropped afterwards."""
    database = unique("pipe")
    owner = connect(chdb_dsn)
    migrate(owner, database)
    yield connect(chdb_dsn, database=database)
    owner.command(f"DROP DATABASE IF EXISTS {database}")
