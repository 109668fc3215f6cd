"""Every workaround for the embedded Tansu broker, in one place, applied only when the broker is Tansu.

Measured in ../shared/research/infra-feasibility.md:
- ListOffsets(LATEST) under-reports partitions whose last batch holds more than one record, so Faust's table
  recovery highwater is wrong: `true_end_offsets` probes the Fetch high watermark instead (appendix A).
- aiokafka's idempotent/transactional producer sends InitProducerId v0, which Tansu rejects: no idempotence,
  so the pipeline is at-least-once and every sink is idempotent.
- Tansu holds a JoinGroup for session_timeout/2: short session timeouts make group joins quick.
- ListOffsets by timestamp compares with batch storage times: `offsets_for_times` binary-searches record
  timestamps instead (jobs: replay by time range).

Against a real Kafka none of this applies and nothing but the bootstrap address changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from infra.kafka.admin import RECORD_MAX_BYTES
from infra.settings import KafkaSettings


def producer_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka producer options: acks=all always, records up to `admin.RECORD_MAX_BYTES`; idempotence only where
    the broker supports it."""
    return {"acks": "all", "enable_idempotence": not kafka.is_tansu, "max_request_size": RECORD_MAX_BYTES}


# How long the receivers' producer waits for the broker's answer to a request before it gives up on the connection
# (aiokafka's `request_timeout_ms`, also how long a batch may wait for a broker that is away): well beyond the send
# timeout, so that a request still in the broker's hands when its push was answered 3000 keeps the connection, and
# the next records of its partition go out on it after that request (`infra.kafka.publisher.Publisher`).
REQUEST_TIMEOUT_MIN_S = 30.0
_REQUEST_TIMEOUT_MAX_MS = 2**31 - 1  # an int32 on the wire (a produce request's timeout)


def request_timeout_ms(kafka: KafkaSettings) -> int:
    """The receivers' producer request timeout: `REQUEST_TIMEOUT_MIN_S`, or 3 × the send timeout when larger. A
    record stamped (its create time) reaches the broker within it or not at all, the longest any of our producers
    takes (the jobs' producers wait the send timeout)."""
    return min(int(max(3 * kafka.send_timeout_s, REQUEST_TIMEOUT_MIN_S) * 1000), _REQUEST_TIMEOUT_MAX_MS)


def faust_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Faust app options that differ on Tansu."""
    if kafka.is_tansu:
        return {"broker_session_timeout": 6, "broker_heartbeat_interval": 1.5, "broker_rebalance_timeout": 6}
    return {}


async def true_end_offsets(bootstrap: str, tps: Iterable[Any], approx: Mapping[Any, int] | None = None,
                           timeout: float = 5.0, *, guess: bool = True) -> dict[Any, int | None]:
    """The real end offset of each partition, read from a Fetch response's high watermark.

    `tps` may be aiokafka or Faust TopicPartitions; the result is keyed by the same objects. A partition the
    probe did not read within `timeout` gets the ListOffsets answer, or None without `guess` (a caller to whom
    a too-small end is worse than none).
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
            result[by_native[native]] = approx.get(by_native[native]) if guess else None
        return result
    finally:
        await probe.stop()


_faust_patched = False
HIGHWATER_PROBES = 3  # probes (of `true_end_offsets`' timeout each) before table recovery gives up


class HighwaterUnknown(RuntimeError):
    """The true end of a state changelog could not be read: table recovery stops rather than end short of it."""


def patch_faust_highwaters() -> None:
    """Make Faust's table recovery use `true_end_offsets` (call before the worker starts; idempotent).

    A partition whose high watermark the probes cannot read stops the recovery (`HighwaterUnknown`; the worker
    ends, and recovers at its restart): ListOffsets' answer is short of the end when the last record batch holds
    several records (a stage-2 batch's whole state is one), and a table recovered up to it would leave that
    batch's state out for good."""
    global _faust_patched
    if _faust_patched:
        return
    from faust.transport.drivers import aiokafka as driver

    async def _highwaters(self: Any, partitions: Any) -> Any:
        consumer = self._ensure_consumer()
        if self.consumer.in_transaction:
            return {tp: consumer.last_stable_offset(tp) for tp in partitions}
        approx = await consumer.end_offsets(partitions)
        ends: dict[Any, int] = {}
        pending = list(partitions)
        for _ in range(HIGHWATER_PROBES):
            found = await true_end_offsets(consumer._client._bootstrap_servers, pending, approx, guess=False)
            ends.update({tp: end for tp, end in found.items() if end is not None})
            pending = [tp for tp in pending if tp not in ends]
            if not pending:
                return ends
        raise HighwaterUnknown("the high watermark of state changelog partition(s) "
                               + ", ".join(f"{tp.topic}/{tp.partition}" for tp in pending)
                               + " could not be read from the broker; table recovery stops rather than restore "
                               "the state short of its end")

    driver.AIOKafkaConsumerThread._highwaters = _highwaters  # type: ignore[method-assign]
    _faust_patched = True


# --- offsets for jobs (replay, export): where a partition ends, where a point in time starts -----------------
#
# Tansu answers ListOffsets wrongly (research note §2): LATEST is the base offset of the last stored batch + 1,
# and a timestamp query compares with each batch's *broker storage time* (offset 0 for anything after the
# last batch). The Fetch high watermark and the record timestamps themselves are right, so on Tansu the end
# comes from `true_end_offsets` and a time is found by a binary search over record timestamps.


async def end_offsets(kafka: KafkaSettings, bootstrap: str, tps: Iterable[Any], *,
                      exact: bool = False) -> dict[Any, int]:
    """The offset the next record of each partition will get (aiokafka TopicPartitions in, same keys out).

    `exact`: on Tansu, a partition whose high watermark could not be probed is left out rather than given
    ListOffsets' answer, which may be short of the end.
    """
    import aiokafka

    tps = list(tps)
    if not tps:
        return {}
    if kafka.is_tansu:
        found = await true_end_offsets(bootstrap, tps, guess=not exact)
        if exact:
            return {tp: end for tp, end in found.items() if end is not None}
        return {tp: found.get(tp) or 0 for tp in tps}
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(tps))
    finally:
        await _stop(consumer)


OffsetProbe = Callable[[int], Awaitable[tuple[int, int] | None]]


async def search_offset_for_time(probe: OffsetProbe, begin: int, end: int, target_ms: int) -> int:
    """The offset of the first record in [begin, end) with a timestamp >= `target_ms`, else `end` (binary search).

    `probe(offset)` returns (offset, timestamp_ms) of the first record at or after `offset`, or None when there
    is none before `end`. Assumes timestamps that do not decrease along the partition (true for the broker's
    append time, not for the create times of several producers: `offsets_for_times` searches from further back).
    """
    lo, hi = begin, end
    while lo < hi:
        mid = (lo + hi) // 2
        found = await probe(mid)
        if found is None or found[1] >= target_ms:
            hi = mid
        else:
            lo = min(found[0] + 1, hi)
    if lo >= end:
        return end
    # Positions in a gap (compaction, transaction markers) are equivalent; answer the record's own offset.
    found = await probe(lo)
    return end if found is None else found[0]


async def offsets_for_times(kafka: KafkaSettings, bootstrap: str, targets: Mapping[Any, int],
                            begins: Mapping[Any, int], ends: Mapping[Any, int],
                            timeout: float = 5.0) -> dict[Any, int]:
    """For each partition, the offset of the first record with timestamp >= the target (ms since the epoch);
    the partition's end offset when there is none. `begins`/`ends` bound the search (Tansu only)."""
    import aiokafka

    result = {tp: ends[tp] for tp in targets if begins[tp] >= ends[tp]}  # empty partitions: nothing to find
    searched = {tp: target for tp, target in targets.items() if tp not in result}
    if not searched:
        return result
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                         fetch_max_wait_ms=50)
    await consumer.start()
    await asyncio.sleep(0)  # aiokafka: a stop() before its coordinator task first ran raises CancelledError
    try:
        if not kafka.is_tansu:
            found = await consumer.offsets_for_times(dict(searched))
            return result | {tp: found[tp].offset if found.get(tp) is not None else ends[tp] for tp in searched}
        consumer.assign(list(searched))
        for tp, target in searched.items():
            end = ends[tp]

            async def probe(offset: int, tp: Any = tp, end: int = end) -> tuple[int, int] | None:
                consumer.seek(tp, offset)
                deadline = asyncio.get_running_loop().time() + timeout
                while asyncio.get_running_loop().time() < deadline:
                    records = (await consumer.getmany(tp, timeout_ms=200, max_records=1)).get(tp, [])
                    if records:
                        return records[0].offset, records[0].timestamp
                    if await consumer.position(tp) >= end:
                        return None
                return None

            async def first_from(offset: int, target: int = target, tp: Any = tp, end: int = end) -> int:
                """The first record at or after `offset` stamped at or after `target`, read in turn; where the
                reading stalled, the offset it got to (an earlier start than the answer: never one too late)."""
                consumer.seek(tp, offset)
                deadline = asyncio.get_running_loop().time() + timeout
                while asyncio.get_running_loop().time() < deadline:
                    records = (await consumer.getmany(tp, timeout_ms=200, max_records=500)).get(tp, [])
                    for record in records:
                        if record.timestamp >= target:
                            return int(record.offset)
                    if records:
                        deadline = asyncio.get_running_loop().time() + timeout
                    if await consumer.position(tp) >= end:
                        return end
                return int(await consumer.position(tp))

            # Records are stamped as each producer hands them over, so several producers (receivers, pulls,
            # replays) write them out of time order, by up to a request timeout: a record stamped before the target
            # may land after one stamped at or after it, and a search for the target that probes it moves past
            # that one. The search for a request timeout before the target ends at or before every record stamped
            # at or after the target; from there they are read in turn, as Kafka's ListOffsets finds the first.
            lower = await search_offset_for_time(probe, begins[tp], end, target - request_timeout_ms(kafka))
            result[tp] = await first_from(lower) if lower < end else end
        return result
    finally:
        await _stop(consumer)


async def _stop(client: Any) -> None:
    """aiokafka's stop() swallows a cancellation of the calling task that lands inside it: re-raise it."""
    await client.stop()
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
