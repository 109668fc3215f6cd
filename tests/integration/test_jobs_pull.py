"""`ocpi-pipeline pull` end to end: a fake CPO Sender over real HTTP → the CLI as its own process → Kafka →
the worker → ClickHouse, with rows marked source=PULL; the partner, its endpoints and our token come from
the registry."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import UTC, datetime
from decimal import Decimal
from itertools import pairwise

import pytest

from infra.settings import as_environ
from ocpi.model import Endpoint, InterfaceRole
from pipeline.jobs.common import Checkpoint, jobs_dir
from pipeline.stack import Stack
from receivers.registry import PartnerRegistry, PartyRole
from tests.integration.jobs_support import run_cli, wait_rows
from tests.integration.pull_support import TOKEN, fake, stack  # noqa: F401
from tests.unit.jobs.fake_sender import Failure, FakeSender, cdr, hours_ago, session

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]



async def test_pull_sessions_and_cdrs_into_clickhouse(stack: Stack, fake: FakeSender) -> None:  # noqa: F811
    assert stack.clickhouse is not None
    registry = PartnerRegistry(stack.clickhouse)
    partner, _token = await asyncio.to_thread(registry.register_direct, "cpo-be", "CPO BE",
                                              [PartyRole(country_code="BE", party_id="BEC", role="CPO")])
    partner.outbound_token = TOKEN
    partner.endpoints = [Endpoint(identifier=m, role=InterfaceRole.SENDER, url=fake.url(m))
                         for m in ("sessions", "cdrs")]
    await asyncio.to_thread(registry.save, partner)
    fake.objects["sessions"] = [session(i, hours_ago(6 - i), kwh=10 + i, status="COMPLETED") for i in range(1, 6)]
    fake.objects["cdrs"] = [cdr(1, hours_ago(3), energy="12.5", cost="3.75"), cdr(2, hours_ago(2), energy="7.25")]
    fake.fail_next(Failure(503, 3000))

    code, out, err = await run_cli(stack.settings, "pull", "--partner", "cpo-be", "--module", "sessions",
                                   "--since", "1d", "--limit", "3")
    assert code == 0, err
    assert "pulled 5 sessions from cpo-be" in out and "in 3 pages" in out and "retries 1" in out
    assert fake.offsets("sessions") == [0, 0, 2, 4]  # the 503 answer, then the pages

    code, out, err = await run_cli(stack.settings, "pull", "--partner", "cpo-be", "--module", "cdrs")
    assert code == 0, err
    assert "pulled 2 cdrs from cpo-be (party BE/BEC) for [the beginning," in out
    assert "date_from" not in fake.seen[-1].query  # CDRs may be pulled without a start

    sessions = await wait_rows(stack.clickhouse, "SELECT session_id, partner_id, kwh, status FROM sessions FINAL "
                               "ORDER BY session_id",
                               [(f"S000{i}", "cpo-be", Decimal(10 + i).quantize(Decimal("0.0001")), "COMPLETED")
                                for i in range(1, 6)])
    assert [row[0] for row in sessions] == [f"S000{i}" for i in range(1, 6)]
    cdrs = await wait_rows(stack.clickhouse, "SELECT cdr_id, total_energy, total_cost_excl_vat FROM cdrs FINAL "
                           "ORDER BY cdr_id",
                           [("C0001", Decimal("12.5000"), Decimal("3.7500")),
                            ("C0002", Decimal("7.2500"), Decimal("4.0000"))])
    assert cdrs == [("C0001", Decimal("12.5000"), Decimal("3.7500")), ("C0002", Decimal("7.2500"), Decimal("4.0000"))]
    sources = await wait_rows(stack.clickhouse, "SELECT module, source, count() FROM raw_events FINAL GROUP BY 1, 2 "
                              "ORDER BY 1", [("CDRS", "PULL", 2), ("SESSIONS", "PULL", 5)])
    assert sources == [("CDRS", "PULL", 2), ("SESSIONS", "PULL", 5)]

    state = Checkpoint(jobs_dir(stack.settings, "pull") / "cpo-be.sessions.json").load()
    assert state is not None and state["crawl"] is None
    assert datetime.fromisoformat(state["completed_until"]) <= datetime.now(UTC)
    code, out, err = await run_cli(stack.settings, "pull", "--partner", "nobody", "--module", "cdrs")
    assert code == 1 and "no partner 'nobody'" in err


async def test_cli_relative_since_resumes_and_scheduled_rounds_continue(stack: Stack, fake: FakeSender) -> None:  # noqa: F811
    assert stack.clickhouse is not None
    registry = PartnerRegistry(stack.clickhouse)
    partner, _token = await asyncio.to_thread(registry.register_direct, "cpo-be", "CPO BE",
                                              [PartyRole(country_code="BE", party_id="BEC", role="CPO")])
    partner.outbound_token = TOKEN
    partner.endpoints = [Endpoint(identifier="sessions", role=InterfaceRole.SENDER, url=fake.url("sessions"))]
    await asyncio.to_thread(registry.save, partner)
    fake.objects["sessions"] = [session(i, hours_ago(6 - i)) for i in range(1, 4)]

    fake.fail_next(Failure(503, 3000))
    args = ("pull", "--partner", "cpo-be", "--module", "sessions", "--since", "1d")
    code, _out, err = await run_cli(stack.settings, *args, "--max-attempts", "1")
    assert code == 1 and "gave up after 1 attempts" in err
    code, out, err = await run_cli(stack.settings, *args)  # the same command, a moment later: `1d` moved
    assert code == 0, err
    assert "pulled 3 sessions from cpo-be (party BE/BEC)" in out and "(resumed)" in out
    assert len({s.query["date_from"] for s in fake.seen}) == 1

    fake.seen.clear()
    env = {**os.environ, **as_environ(stack.settings), "COLUMNS": "200", "OCPI_HTTP_PORT": "8080"}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "pipeline", *args, "--schedule", "0.3",
                                                   "--splay", "0", env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while sum(s.query.get("offset") == "0" for s in fake.seen) < 3:
            assert asyncio.get_running_loop().time() < deadline, "fewer than 3 rounds within 60 s"
            await asyncio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        out_b, err_b = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err_b.decode()
    firsts = [s.query for s in fake.seen if s.query.get("offset") == "0"]
    # The first round starts at --since; every later one where the one before ended.
    assert all(later["date_from"] == earlier["date_to"] for earlier, later in pairwise(firsts))
    assert "pulled 3 sessions" in out_b.decode() and "pulled 0 sessions" in out_b.decode()
