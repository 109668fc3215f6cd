"""Shared by the receiver integration tests: the receivers app in-process with the real Kafka publisher, its
registry on the session's chDB path, and a consumer that reads the module topics back."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer
from litestar.testing import AsyncTestClient

from infra.clickhouse.client import connect
from infra.clickhouse.migrations import migrate
from infra.codec import DecodedEvent, decode_event
from infra.kafka.admin import ensure_topics
from infra.settings import Settings
from receivers.app import create_app
from receivers.registry import PartnerRegistry, PartyRole


def auth(token: str) -> dict[str, str]:
    return {"Authorization": "Token " + base64.b64encode(token.encode()).decode()}


@dataclass
class Receivers:
    http: AsyncTestClient[Any]
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    async def push(self, method: str, url: str, body: Any, *, request_id: str | None = None) -> httpx.Response:
        """`url` starts with /ocpi; the token is the owner's: the URL's, or the body's for a CDR POST."""
        parts = url.split("/")
        owner = (parts[5], parts[6]) if len(parts) > 6 else (body["country_code"], body["party_id"])
        owner = (owner[0].upper(), owner[1].upper())
        headers = {**auth(self.tokens[owner]), **({"X-Request-ID": request_id} if request_id else {})}
        return await self.http.request(method, url, json=body, headers=headers)


@asynccontextmanager
async def receivers(settings: Settings, chdb_dsn: str, parties: list[tuple[str, str]],
                    compat: tuple[str, ...] = (), create_topics: bool = True) -> AsyncIterator[Receivers]:
    """The app with its real Publisher (lifespan), one single-party CPO partner per party."""
    client = connect(chdb_dsn)
    migrate(client, settings.clickhouse.database)
    client.database = settings.clickhouse.database
    registry = PartnerRegistry(client)
    if create_topics:
        # The topics `serve` creates: the publisher sends to no topic that does not exist.
        kafka = settings.kafka
        await asyncio.to_thread(ensure_topics, kafka.bootstrap, (*kafka.module_topics, kafka.topic_rejections),
                                kafka.partitions)
    tokens = {}
    for cc, pid in parties:
        roles = [PartyRole(country_code=cc, party_id=pid, role="CPO")]
        tokens[(cc, pid)] = registry.register_direct(f"cpo-{cc}-{pid}".lower(), cc + pid, roles,
                                                     compat=compat)[1]
    app = create_app(settings, registry_factory=lambda: registry)
    try:
        async with AsyncTestClient(app) as http:
            yield Receivers(http, tokens)
    finally:
        client.close()


async def consume(bootstrap: str, topics: tuple[str, ...], count: int,
                  timeout: float = 30.0) -> list[tuple[str, bytes, DecodedEvent]]:
    """(topic, key, event) of the first `count` records of `topics`, from the beginning."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: list[tuple[str, bytes, DecodedEvent]] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found) < count and asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                found += [(r.topic, r.key or b"", decode_event(r.value or b"")) for r in records]
        # Anything beyond `count` would be a record that should not exist: read a little longer.
        for records in (await consumer.getmany(timeout_ms=500)).values():
            found += [(r.topic, r.key or b"", decode_event(r.value or b"")) for r in records]
    finally:
        await consumer.stop()
    return found
