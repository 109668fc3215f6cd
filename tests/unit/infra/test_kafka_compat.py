"""infra.kafka.compat: the Tansu workarounds, as Faust's table recovery uses them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from faust.transport.drivers import aiokafka as driver
from faust.types import TP

from infra.kafka import compat


class _Consumer:
    """What `_highwaters` asks of aiokafka's consumer: ListOffsets' ends (Tansu's under-report) and the bootstrap."""

    def __init__(self, ends: dict[TP, int]) -> None:
        self.ends = ends
        self._client = SimpleNamespace(_bootstrap_servers="127.0.0.1:9092")

    async def end_offsets(self, partitions: Iterable[TP]) -> dict[TP, int]:
        return {tp: self.ends[tp] for tp in partitions}


async def test_recovery_does_not_take_listoffsets_end_when_the_high_watermark_probe_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On Tansu ListOffsets answers the base offset of a partition's last record batch + 1, short of the end when
    that batch holds several records (a stage-2 batch's whole state is one). A table recovered up to it leaves the
    last batch's state out, and nothing reads it later: a CDR two sessions list, a credit linked twice. So a probe
    that did not read the true high watermark stops the recovery (the worker ends, and recovers at its restart)
    rather than have it go on with that end."""
    short, probed = TP("ocpi-pipeline-party-state-changelog", 0), TP("ocpi-pipeline-party-state-changelog", 1)

    async def probe(bootstrap: str, tps: Iterable[Any], approx: Mapping[Any, int] | None = None,
                    timeout: float = 5.0, *, guess: bool = True) -> dict[Any, int | None]:
        assert approx is not None
        # The probe's own fallback for a partition it could not read in time: ListOffsets' answer, or None.
        return {tp: (approx[tp] if guess else None) if tp == short else 10 for tp in tps}

    monkeypatch.setattr(compat, "true_end_offsets", probe)
    original = driver.AIOKafkaConsumerThread._highwaters
    monkeypatch.setattr(compat, "_faust_patched", False)
    try:
        compat.patch_faust_highwaters()
        thread = SimpleNamespace(_ensure_consumer=lambda: _Consumer({short: 4, probed: 7}),
                                 consumer=SimpleNamespace(in_transaction=False))
        with pytest.raises(compat.HighwaterUnknown, match="party-state-changelog"):
            await driver.AIOKafkaConsumerThread._highwaters(thread, [short, probed])  # type: ignore[arg-type]
    finally:
        driver.AIOKafkaConsumerThread._highwaters = original  # type: ignore[method-assign]


async def test_recovery_takes_the_probed_high_watermarks(monkeypatch: pytest.MonkeyPatch) -> None:
    tps = [TP("ocpi-pipeline-cdr-state-changelog", 0), TP("ocpi-pipeline-cdr-state-changelog", 1)]

    async def probe(bootstrap: str, partitions: Iterable[Any], approx: Mapping[Any, int] | None = None,
                    timeout: float = 5.0, *, guess: bool = True) -> dict[Any, int | None]:
        return {tp: 12 for tp in partitions}

    monkeypatch.setattr(compat, "true_end_offsets", probe)
    original = driver.AIOKafkaConsumerThread._highwaters
    monkeypatch.setattr(compat, "_faust_patched", False)
    try:
        compat.patch_faust_highwaters()
        thread = SimpleNamespace(_ensure_consumer=lambda: _Consumer(dict.fromkeys(tps, 3)),
                                 consumer=SimpleNamespace(in_transaction=False))
        assert await driver.AIOKafkaConsumerThread._highwaters(thread, tps) == dict.fromkeys(tps, 12)  # type: ignore[arg-type]
    finally:
        driver.AIOKafkaConsumerThread._highwaters = original  # type: ignore[method-assign]
