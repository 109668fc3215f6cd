"""Every workaround for the embedded Tansu broker, in one place, applied only when the broker is Tansu.

Measured in ../shared/research/infra-feasibility.md:
- ListOffsets(LATEST) under-reports partitions whose last batch holds more than one record, so Faust's table
  recovery highwater is wrong: `true_end_offsets` probes the Fetch high watermark instead (appendix A).
- aiokafka's idempotent/transactional producer sends InitProducerId v0, which Tansu rejects: no idempotence,
  so the pipeline is at-least-once and every sink is idempotent.
- Tansu holds a JoinGroup for session_timeout/2: short session timeouts make group joins quick.

Against a real Kafka none of this applies and nothing but the bootstrap address changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from infra.settings import KafkaSettings


def producer_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka producer options: acks=all always; idempotence only where the broker supports it."""
    return {"acks": "all", "enable_idempotence": not kafka.is_tansu}


def consumer_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka/kafka-python consumer group timeouts (Tansu holds JoinGroup for session_timeout/2)."""
    if kafka.is_tansu:
        return {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2000}
    return {}


def faust_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Faust app options that differ on Tansu."""
    if kafka.is_tansu:
        return {"broker_session_timeout": 6, "broker_heartbeat_interval": 1.5, "broker_rebalance_timeout": 6}
    return {}


async def true_end_offsets(bootstrap: str, tps: Iterable[Any], approx: Mapping[Any, int] | None = None,
                           timeout: float = 5.0) -> dict[Any, int | None]:
    """The real end offset of each partition, read from a Fetch response's high watermark.

    `tps` may be aiokafka or Faust TopicPartitions; the result is keyed by the same objects.
    """
    import aiokafka
    from aiokafka.structs import TopicPartition

    probe = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                      fetch_max_wait_ms=50)
    await probe.start()
    try:
        by_native = {TopicPartition(tp.topic, tp.partition): tp for tp in tps}
        if approx is None:
            ends = await probe.end_offsets(list(by_native))
            approx = {by_native[k]: v for k, v in ends.items()}
        probe.assign(list(by_native))
        for native, tp in by_native.items():
            probe.seek(native, max((approx.get(tp) or 0) - 1, 0))
        result: dict[Any, int | None] = {}
        pending = set(by_native)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while pending and loop.time() < deadline:
            await probe.getmany(*pending, timeout_ms=100)
            for native in list(pending):
                high = probe.highwater(native)
                if high is not None:
                    result[by_native[native]] = max(high, approx.get(by_native[native]) or 0)
                    pending.discard(native)
        for native in pending:
            result[by_native[native]] = approx.get(by_native[native])
        return result
    finally:
        await probe.stop()


_faust_patched = False


def patch_faust_highwaters() -> None:
    """Make Faust's table recovery use `true_end_offsets` (call before the worker starts; idempotent)."""
    global _faust_patched
    if _faust_patched:
        return
    from faust.transport.drivers import aiokafka as driver

    async def _highwaters(self: Any, partitions: Any) -> Any:
        consumer = self._ensure_consumer()
        if self.consumer.in_transaction:
            return {tp: consumer.last_stable_offset(tp) for tp in partitions}
        approx = await consumer.end_offsets(partitions)
        return await true_end_offsets(consumer._client._bootstrap_servers, list(partitions), approx)

    driver.AIOKafkaConsumerThread._highwaters = _highwaters  # type: ignore[method-assign]
    _faust_patched = True
