"""Fixtures of the `ocpi-pipeline pull` tests: the stack without receivers, and a fake CPO Sender."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pipeline.stack import Stack
from tests.integration.jobs_support import job_settings
from tests.unit.jobs.fake_sender import FakeSender

TOKEN = "our-token-at-the-cpo"


@pytest.fixture
async def stack(session_tmp: Path, chdb_dsn: str, broker: str) -> AsyncIterator[Stack]:
    running = await Stack(job_settings(session_tmp, chdb_dsn, broker), run_receivers=False).start()
    children = list(running.children.values())
    yield running
    await running.stop()
    assert all(child.poll() is not None for child in children)


@pytest.fixture
async def fake() -> AsyncIterator[FakeSender]:
    sender = await FakeSender(TOKEN, page_cap=2).start()
    yield sender
    await sender.stop()
