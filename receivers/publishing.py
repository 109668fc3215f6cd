"""From an accepted push to a durable Kafka record: the event envelope, Avro encoding, acknowledged send."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from litestar import Request

from infra.codec import AvroCodecError, encode_event
from infra.events import build_event
from infra.kafka.publisher import PublishError
from infra.settings import KafkaSettings
from ocpi.decode import Decoded
from ocpi.identity import ObjectKey
from receivers.registry import Partner
from receivers.transport import ServerError, message_ids, routing_headers


class RecordSink(Protocol):
    """Where records go: `infra.kafka.publisher.Publisher` in production, a fake in unit tests."""

    async def publish(self, topic: str, key: bytes, value: bytes, *, since: float | None = None) -> None:
        """Raise PublishError unless the broker acknowledged the record within the send timeout of `since` (the
        event loop's time when the event was stamped)."""


class EventPublisher:
    """Builds the OcpiEvent of a push and publishes it; raises ServerError (3000) unless the broker acked."""

    def __init__(self, sink: RecordSink, kafka: KafkaSettings) -> None:
        self._sink = sink
        self._kafka = kafka

    async def publish_push(self, request: Request[Any, Any, Any], *, module: str, operation: str, level: str,
                           key: ObjectKey, decoded: Decoded[Any], payload_type: str,
                           evse_uid: str | None = None, connector_id: str | None = None) -> dict[str, Any]:
        partner: Partner = request.state.partner
        # The send timeout counts from the stamp (`received_at`), not from the send: the deadline sweeps decide a
        # deadline the send timeout after it, counting on every event stamped before it being in Kafka by then,
        # and hashing and encoding a large object between the two take a second.
        stamped = asyncio.get_running_loop().time()
        request_id, correlation_id = message_ids(request.scope)
        routing = routing_headers(request.scope)
        event = build_event(
            partner_id=partner.partner_id, module=module, operation=operation, level=level, key=key,
            decoded=decoded, payload_type=payload_type, source="PUSH", request_id=request_id,
            correlation_id=correlation_id, evse_uid=evse_uid, connector_id=connector_id,
            from_party=routing.sender, to_party=routing.receiver)
        try:
            record = encode_event(event)
        except AvroCodecError as exc:
            # Validation passed but the record does not fit the wire schema: our bug, never the partner's.
            raise ServerError(f"could not encode the event: {exc}") from exc
        try:
            await self._sink.publish(self._kafka.topic_for(module), key.kafka_key(), record, since=stamped)
        except PublishError as exc:
            raise ServerError(f"not stored, please retry: {exc}") from exc
        return event

