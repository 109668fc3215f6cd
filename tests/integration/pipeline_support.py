"""Shared by the pipeline's end-to-end tests: a worker-only stack on the session's engines, bulk publishing of
events straight to the module topics (as the receivers would), and polling ClickHouse."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from clickhouse_connect.driver.client import Client

from infra.settings import Settings, load_settings
from tests.conftest import unique
from tests.unit.pipeline.builders import event_bytes


def pipeline_settings(session_tmp: Path, chdb_dsn: str, broker: str, **env: str) -> Settings:
    """Own data dir, database, module topics, internal topics and consumer group on the session's engines."""
    name = unique("pipe")
    return load_settings({
        "OCPI_DATA_DIR": str(session_tmp / name), "OCPI_CLICKHOUSE_DSN": chdb_dsn,
        "OCPI_CLICKHOUSE_DATABASE": name, "OCPI_TOPIC_LOCATIONS": f"{name}.locations",
        "OCPI_TOPIC_SESSIONS": f"{name}.sessions", "OCPI_TOPIC_CDRS": f"{name}.cdrs",
        "OCPI_TOPIC_REJECTIONS": f"{name}.rejections", "OCPI_TOPIC_PARTY_FACTS": f"{name}.party-facts",
        "OCPI_TOPIC_RECONCILIATION": f"{name}.reconciliation", "OCPI_PIPELINE_APP_ID": name,
        "OCPI_TOPIC_PARTITIONS": "2", "OCPI_KAFKA_SEND_TIMEOUT": "1", "OCPI_ADMIN_TOKEN": "test-admin-token",
        "OCPI_KAFKA_BOOTSTRAP": broker, "OCPI_KAFKA_FLAVOR": "tansu", "PATH": os.environ.get("PATH", ""),
        **env}).with_overrides(http={"port": 0})


def topic_of(settings: Settings, payload_type: str) -> str:
    if payload_type == "CDR":
        return settings.kafka.topic_cdrs
    if payload_type.startswith("Session"):
        return settings.kafka.topic_sessions
    return settings.kafka.topic_locations


def key_of(body: dict[str, Any], object_id: str | None = None, cc: str = "NL", pid: str = "TNM") -> bytes:
    cc = body.get("country_code", cc)
    pid = body.get("party_id", pid)
    return f"{cc}/{pid}/{object_id or body['id']}".upper().encode()


def record(settings: Settings, payload_type: str, body: dict[str, Any], *, object_id: str | None = None,
           cc: str = "NL", pid: str = "TNM", **kw: Any) -> tuple[str, bytes, bytes]:
    """(topic, key, Avro value) of one push, received now."""
    kw.setdefault("received_at", datetime.now(UTC))
    value = event_bytes(payload_type, body, object_id=object_id, cc=cc, pid=pid, **kw)
    return topic_of(settings, payload_type), key_of(body, object_id, cc, pid), value


async def publish(bootstrap: str, records: Iterable[tuple[str, bytes, bytes]]) -> int:
    """Send in order and wait for every ack (one object's records keep their order: same key, same partition)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=value, key=key) for topic, key, value in records]
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


async def wait_for(client: Client, sql: str, done: Callable[[list[tuple[Any, ...]]], bool],
                   timeout: float = 60.0) -> list[tuple[Any, ...]]:
    """Poll `sql` until `done(rows)`; returns the last rows either way (the caller asserts on them)."""
    deadline = time.monotonic() + timeout
    rows: list[tuple[Any, ...]] = []
    while time.monotonic() < deadline:
        rows = await asyncio.to_thread(lambda: list(client.query(sql).result_rows))
        if done(rows):
            return rows
        await asyncio.sleep(0.3)
    return rows


async def wait_rows(client: Client, sql: str, want: list[tuple[Any, ...]], timeout: float = 60.0,
                    ) -> list[tuple[Any, ...]]:
    return await wait_for(client, sql, lambda rows: rows == want, timeout)
