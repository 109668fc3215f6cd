"""From an accepted push to a durable Kafka record: the event envelope, Avro encoding, acknowledged send."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
from litestar import Request

from infra.codec import AvroCodecError, encode_event
from infra.kafka.publisher import PublishError
from infra.settings import KafkaSettings
from ocpi.canonical import content_hash, to_builtins
from ocpi.decode import Decoded
from ocpi.identity import ObjectKey
from receivers.registry import Partner
from receivers.transport import ServerError, message_ids, routing_headers


class RecordSink(Protocol):
    """Where records go: `infra.kafka.publisher.Publisher` in production, a fake in unit tests."""

    async def publish(self, topic: str, key: bytes, value: bytes) -> None: ...


class EventPublisher:
    """Builds the OcpiEvent of a push and publishes it; raises ServerError (3000) unless the broker acked."""

    def __init__(self, sink: RecordSink, kafka: KafkaSettings) -> None:
        self._sink = sink
        self._kafka = kafka

    async def publish_push(self, request: Request[Any, Any, Any], *, module: str, operation: str, level: str,
                           key: ObjectKey, decoded: Decoded[Any], payload_type: str,
                           evse_uid: str | None = None, connector_id: str | None = None) -> dict[str, Any]:
        partner: Partner = request.state.partner
        request_id, correlation_id = message_ids(request.scope)
        routing = routing_headers(request.scope)
        value = decoded.value
        event = {
            "event_id": str(uuid.uuid4()),
            "partner_id": partner.partner_id,
            "module": module.upper(),
            "operation": operation,
            "level": level,
            "country_code": key.country_code,
            "party_id": key.party_id,
            "object_id": key.object_id,
            "evse_uid": evse_uid,
            "connector_id": connector_id,
            "received_at": datetime.now(UTC),
            "request_id": request_id,
            "correlation_id": correlation_id,
            "from_country_code": routing.from_country_code,
            "from_party_id": routing.from_party_id,
            "to_country_code": routing.to_country_code,
            "to_party_id": routing.to_party_id,
            "source": "PUSH",
            "content_hash": content_hash(value),
            "relaxations": list(decoded.relaxations),
            "payload": (payload_type, to_builtins(value)),
        }
        try:
            record = encode_event(event)
        except AvroCodecError as exc:
            # Validation passed but the record does not fit the wire schema: our bug, never the partner's.
            raise ServerError(f"could not encode the event: {exc}") from exc
        try:
            await self._sink.publish(self._kafka.topic_for(module), key.kafka_key(), record)
        except PublishError as exc:
            raise ServerError(f"not stored, please retry: {exc}") from exc
        return event


def body_identity_mismatch(value: msgspec.Struct, **expected: str) -> str | None:
    """The first body field (CiString, case-insensitive) that differs from the URL, as a message; or None."""
    for field_name, url_value in expected.items():
        body_value = getattr(value, field_name, None)
        if body_value is not None and str(body_value).upper() != url_value.upper():
            return f"$.{field_name}: {body_value!r} in the body differs from {url_value!r} in the URL"
    return None
