"""Scale-out mid-stream: a second worker joins the consumer group while the first is busy with 50,000 events.

The group rebalances (batch delivery's inboxes are cleared, in-flight batches finish, Faust commits, each worker
recovers the state of its partitions from the changelogs) and the two workers finish the topics together.
ClickHouse then holds exactly the expected totals: nothing lost in the hand-over, nothing counted twice, and no
record read again by the new owner mistaken for a partner's duplicate.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from infra.process import spawn, terminate
from pipeline.stack import Stack

from .pipeline_support import pipeline_settings, wait_for
from .test_pipeline_crash import SESSIONS, publish_and_wait_mid_stream, totals

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
    client, expected = await publish_and_wait_mid_stream(stack, 5)
    # Its own Faust state directory (a second machine, in effect); the same group, ClickHouse and key.
    second = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"],
                   env={**stack.child_environment(), "OCPI_DATA_DIR": str(tmp_path / "second")},
                   log_path=stack.log_dir / "worker-second.log")
    try:
        final = await wait_for(client, "SELECT count() FROM reconciliation FINAL",
                               lambda r: r[0][0] >= 2 * SESSIONS, timeout=150)
        assert second.poll() is None, "the second worker died; see worker-second.log"
        assert final[0][0] == 2 * SESSIONS
        assert totals(client) == expected
        worked = (stack.log_dir / "worker-second.log").read_text()
        assert "sessions:" in worked or "cdrs:" in worked or "party:" in worked, "the second worker did no batch"
    finally:
        terminate(second, 20)
