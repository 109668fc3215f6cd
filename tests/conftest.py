"""Shared fixtures: one embedded broker and one chDB path per test session (chDB allows one path per process).

Tests isolate themselves by ClickHouse database and Kafka topic names, never by starting another engine.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings, load_settings

SHARED = Path(__file__).resolve().parents[2] / "shared"
OCPI_DIGEST = SHARED / "ocpi"
EXAMPLES = OCPI_DIGEST / "examples"


def pytest_sessionstart(session: pytest.Session) -> None:
    """One line, not a dozen collection errors (FileNotFoundError), when the digest is not beside the clone."""
    if not EXAMPLES.is_dir():
        pytest.exit(f"the tests read the OCPI 2.2.1 digest at {OCPI_DIGEST} (../shared/ocpi beside the clone, see "
                    "README), which is missing", returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ocpi")


@pytest.fixture(scope="session")
def chdb_dsn(session_tmp: Path) -> Iterator[str]:
    """The one chDB path of this test process, held open by one client for the whole session.

    chDB stops its engine when the process's last client closes, and the next `connect` starts it again and loads
    every database on the path: late in a run, with thousands of test databases there, one reconnect took minutes.
    """
    from infra.clickhouse.client import connect

    dsn = f"chdb://{session_tmp / 'clickhouse'}"
    keeper = connect(dsn)
    yield dsn
    keeper.close()


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """An embedded Tansu broker for the whole session; stopped by PID at the end."""
    from infra.kafka.embedded import EmbeddedBroker

    # 60 s to answer, not the default 20: the session's first start on a slow, loaded CI machine (two cores) comes
    # with every import and the first chDB in the same moments.
    with EmbeddedBroker().start(timeout=60) as embedded:
        yield embedded.bootstrap
    assert embedded.process is None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the session's embedded broker is marked `kafka`, in `tests/unit` too (README,
    Development), so `-m "not kafka"` runs without one."""
    for item in items:
        if "broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings_for(session_tmp: Path, chdb_dsn: str):  # type: ignore[no-untyped-def]
    """Build Settings for a test: its own data dir, database and topics on the session's engines."""

    def build(**env: str) -> Settings:
        name = unique("t")
        base = {
            "OCPI_DATA_DIR": str(session_tmp / name),
            "OCPI_CLICKHOUSE_DSN": chdb_dsn,
            "OCPI_CLICKHOUSE_DATABASE": name,
            "OCPI_TOPIC_LOCATIONS": f"{name}.locations",
            "OCPI_TOPIC_SESSIONS": f"{name}.sessions",
            "OCPI_TOPIC_CDRS": f"{name}.cdrs",
            "OCPI_TOPIC_REJECTIONS": f"{name}.rejections",
            # Own consumer group, state changelogs and internal topics: workers of different tests share nothing.
            "OCPI_PIPELINE_APP_ID": f"{name}-app",
            "OCPI_TOPIC_PARTY_FACTS": f"{name}.party-facts",
            "OCPI_TOPIC_RECONCILIATION": f"{name}.reconciliation",
            "OCPI_TOPIC_PARTITIONS": "2",
            "OCPI_KAFKA_SEND_TIMEOUT": "3",
            "OCPI_ADMIN_TOKEN": "test-admin-token",
            "PATH": os.environ.get("PATH", ""),
        }
        base.update(env)
        return load_settings(base)

    return build
