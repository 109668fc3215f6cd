"""Shared by the job tests: a stack on the session's engines, seeded traffic, totals and topic census."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from infra.codec import DecodedEvent, decode_event, encode_event
from infra.events import build_event
from infra.settings import Settings, as_environ, load_settings
from ocpi.decode import decode
from ocpi.identity import ObjectKey
from ocpi.model import CDR, Session
from pipeline.jobs.kafka_io import (
    JobProducer,
    PartitionRange,
    offset_bounds,
    read_ranges,
    topic_partitions,
    wait_for_group,
)
from pipeline.simulator import Expected, SimulatedCpo, SimulatedParty
from pipeline.stack import Stack
from receivers.registry import PartnerRegistry, PartyRole
from tests.conftest import unique

PARTNERS = {  # partner id -> (parties, stories pushed in the first round)
    "cpo-a": ([SimulatedParty("NL", "AAA")], 4),  # one party each: no routing headers needed (04 §8.1)
    "cpo-b": ([SimulatedParty("BE", "BBB")], 3),
}
LATE_PARTNER = ("cpo-c", [SimulatedParty("DE", "CCC")], 2)  # pushed after a pause, for the time-range test


def job_settings(session_tmp: Path, chdb_dsn: str, broker: str, **env: str) -> Settings:
    """Settings of one test module: own data dir, database and topics on the session's engines."""
    name = unique("jobs")
    return load_settings({
        "OCPI_DATA_DIR": str(session_tmp / name), "OCPI_CLICKHOUSE_DSN": chdb_dsn,
        "OCPI_CLICKHOUSE_DATABASE": name, "OCPI_TOPIC_LOCATIONS": f"{name}.locations",
        "OCPI_TOPIC_SESSIONS": f"{name}.sessions", "OCPI_TOPIC_CDRS": f"{name}.cdrs",
        # Own app id (consumer group, state changelogs) and internal topics: a worker of another test must
        # neither share its deduplication state nor its facts.
        "OCPI_PIPELINE_APP_ID": f"{name}-app", "OCPI_TOPIC_PARTY_FACTS": f"{name}.party-facts",
        "OCPI_TOPIC_RECONCILIATION": f"{name}.reconciliation",
        "OCPI_TOPIC_PARTITIONS": "2", "OCPI_KAFKA_SEND_TIMEOUT": "5", "OCPI_ADMIN_TOKEN": "test-admin-token",
        "OCPI_KAFKA_BOOTSTRAP": broker, "OCPI_KAFKA_FLAVOR": "tansu",
        "PATH": os.environ.get("PATH", ""), **env}).with_overrides(http={"port": 0})


async def push(stack: Stack, partner_id: str, parties: list[SimulatedParty], stories: int, seed: int) -> Expected:
    """Register `partner_id` for `parties` and push `stories` charging stories (Locations, Session PUTs and
    PATCHes, CDRs, resends ...); returns what the simulator expects (`events`: records in Kafka)."""
    assert stack.clickhouse is not None
    registry = PartnerRegistry(stack.clickhouse)
    roles = [PartyRole(country_code=p.country_code, party_id=p.party_id, role="CPO") for p in parties]
    _partner, token = await asyncio.to_thread(registry.register_direct, partner_id, partner_id, roles)
    expected = await SimulatedCpo(stack.base_url, token, parties, seed=seed).run(stories)
    assert expected.rejected == 0
    return expected


def totals(client: Client) -> dict[str, Any]:
    """Every total a replay must leave unchanged."""
    def one(sql: str) -> tuple[Any, ...]:
        return tuple(client.query(sql).result_rows[0])

    return {
        "sessions": one("SELECT count(), sum(kwh), sum(total_cost_excl_vat), countIf(status = 'COMPLETED') "
                        "FROM sessions FINAL"),
        "cdrs": one("SELECT count(), sum(total_energy), sum(total_cost_excl_vat), sum(total_cost_incl_vat) "
                    "FROM cdrs FINAL"),
        "cdrs_by_party": client.query("SELECT country_code, party_id, count(), sum(total_energy) FROM cdrs FINAL "
                                      "GROUP BY 1, 2 ORDER BY 1, 2").result_rows,
        "raw_events": one("SELECT count(), uniqExact(event_id), uniqExact(content_hash) FROM raw_events FINAL"),
        "dead_letters": one("SELECT count() FROM dead_letters"),
    }


async def census(settings: Settings, bootstrap: str) -> Counter[tuple[str, str, str]]:
    """(module, partner, source) of every record in the module topics."""
    tps = await topic_partitions(bootstrap, settings.kafka.module_topics)
    bounds = await offset_bounds(settings.kafka, bootstrap, tps)
    ranges = [PartitionRange(tp.topic, tp.partition, b, e) for tp, (b, e) in bounds.items()]
    found: Counter[tuple[str, str, str]] = Counter()
    async for _r, records in read_ranges(bootstrap, ranges):
        for record in records:
            event = decode_event(record.value)
            found[(event.module, event.partner_id, event.source)] += 1
    return found


async def wait_pipeline(settings: Settings, bootstrap: str, written: Any, timeout: float = 90.0) -> None:
    """Until the live worker committed past everything written (then its ClickHouse insert is done)."""
    await wait_for_group(bootstrap, settings.pipeline.app_id, written, timeout=timeout)


async def wait_rows(client: Client, sql: str, want: Any, timeout: float = 90.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    got = None
    while asyncio.get_running_loop().time() < deadline:
        got = await asyncio.to_thread(lambda: client.query(sql).result_rows)
        if got == want:
            return got
        await asyncio.sleep(0.3)
    return got


async def run_cli(settings: Settings, *args: str, data_dir: Path | None = None) -> tuple[int, str, str]:
    """`ocpi-pipeline ARGS` as its own process with the test's settings; (exit code, stdout, stderr)."""
    env = {**os.environ, **as_environ(settings), "COLUMNS": "200", "OCPI_HTTP_PORT": "8080"}  # not served
    if data_dir is not None:
        env["OCPI_DATA_DIR"] = str(data_dir)
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "pipeline", *args, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), 240)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode or 0, out.decode(), err.decode()


def utcnow() -> datetime:
    return datetime.now(UTC)


def dec(value: str) -> Decimal:
    return Decimal(value)


async def publish(settings: Settings, bootstrap: str, partner_id: str, objects: list[tuple[str, dict[str, Any]]],
                  *, source: str = "PUSH") -> tuple[list[DecodedEvent], dict[Any, int]]:
    """Publish (module, OCPI JSON) objects as the receivers would; returns the events and offsets written."""
    kinds = {"sessions": (Session, "Session", "SESSION", "PUT"), "cdrs": (CDR, "CDR", "CDR", "POST")}
    records, events = [], []
    for module, body in objects:
        model, payload_type, level, operation = kinds[module]
        decoded = decode(json.dumps(body), model)
        key = ObjectKey.of(decoded.value)
        event = build_event(partner_id=partner_id, module=module, operation=operation, level=level, key=key,
                            decoded=decoded, payload_type=payload_type, source=source,
                            request_id=str(uuid.uuid4()), correlation_id=str(uuid.uuid4()))
        value = encode_event(event)
        events.append(decode_event(value))
        records.append((settings.kafka.topic_for(module), key.kafka_key(), value))
    async with JobProducer(settings.kafka, bootstrap) as producer:
        await producer.send_all(records)
        return events, dict(producer.written)
