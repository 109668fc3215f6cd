"""Scale-out mid-stream: a second worker joins the consumer group while the first is busy with 50,000 events.

The group rebalances (batch delivery's inboxes are cleared, in-flight batches finish, Faust commits, each worker
recovers the state of its partitions from the changelogs) and the two workers finish the topics together.
ClickHouse then holds exactly the expected totals: nothing lost in the hand-over, nothing counted twice, and no
record read again by the new owner mistaken for a partner's duplicate.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from infra.process import spawn, terminate
from pipeline.stack import Stack

from .pipeline_support import pipeline_settings, publish, wait_for
from .test_pipeline_crash import SESSIONS, totals, traffic

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

KEY = "scale-out-test-pseudonym-key"  # every worker of a group must share it: tokens are matched by pseudonym


@pytest.fixture(scope="module")
async def stack(session_tmp: Path, chdb_dsn: str, broker: str) -> AsyncIterator[Stack]:
    settings = pipeline_settings(session_tmp, chdb_dsn, broker, OCPI_KAFKA_SEND_TIMEOUT="5", OCPI_PSEUDONYM_KEY=KEY)
    running = await Stack(settings, run_receivers=False).start()
    yield running
    await running.stop()


async def test_a_worker_joining_mid_stream_shares_the_work_without_loss_or_double(stack: Stack,
                                                                                  tmp_path: Path) -> None:
    records, expected = traffic()
    kafka = stack.settings.kafka
    topics = {"sessions": kafka.topic_sessions, "cdrs": kafka.topic_cdrs}
    client = stack.clickhouse
    assert client is not None
    # A third of the stream first; the rest once the second worker has its partitions: the first worker alone
    # finishes 50,000 events sooner than a worker starts and joins, which left the second one nothing to do.
    third = len(records) // 3
    await publish(stack.bootstrap, [(topics[suffix], key, value) for suffix, key, value in records[:third]])
    await wait_for(client, "SELECT count() FROM raw_events", lambda r: r[0][0] >= third // 3, timeout=90)
    # Its own Faust state directory (a second machine, in effect); the same group, ClickHouse and key.
    log_path = stack.log_dir / "worker-second.log"
    second = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"],
                   env={**stack.child_environment(), "OCPI_DATA_DIR": str(tmp_path / "second")}, log_path=log_path)
    try:
        deadline = time.monotonic() + 120
        while "[^Worker]: Ready" not in (log_path.read_text() if log_path.exists() else ""):
            assert second.poll() is None and time.monotonic() < deadline, "the second worker did not start"
            await asyncio.sleep(0.2)
        await publish(stack.bootstrap, [(topics[suffix], key, value) for suffix, key, value in records[third:]])
        final = await wait_for(client, "SELECT count() FROM reconciliation FINAL",
                               lambda r: r[0][0] >= 2 * SESSIONS, timeout=150)
        assert second.poll() is None, "the second worker died; see worker-second.log"
        assert final[0][0] == 2 * SESSIONS
        assert totals(client) == expected
        worked = (stack.log_dir / "worker-second.log").read_text()
        assert "sessions:" in worked or "cdrs:" in worked or "party:" in worked, "the second worker did no batch"
    finally:
        terminate(second, 20)
