"""Full sync of Locations end to end (08 §2.1): a fake CPO Sender over real HTTP → `ocpi-pipeline pull` as its own
process → Kafka → the worker → ClickHouse. A complete list that no longer holds a stored Location unlists it (its
`locations` row, its EVSE and Connector rows); a later pull that lists it again, unchanged, or a later push newer
than that list lists it again."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import pytest

from ocpi.model import Endpoint, InterfaceRole
from pipeline.jobs.pull import not_listed_path
from pipeline.stack import Stack
from receivers.registry import PartnerRegistry, PartyRole
from tests.conftest import EXAMPLES
from tests.integration.jobs_support import run_cli, wait_rows
from tests.integration.pull_support import TOKEN, fake, stack  # noqa: F401
from tests.unit.jobs.fake_sender import FakeSender, hours_ago, stamp

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

LOCATION = json.loads((EXAMPLES / "location_example.json").read_text())


def location(name: str, hours: float) -> dict[str, Any]:
    return {**LOCATION, "id": name, "last_updated": stamp(hours_ago(hours))}


async def test_a_full_pull_unlists_what_the_cpo_dropped_and_a_newer_push_lists_it_again(stack: Stack,  # noqa: F811
                                                                                      fake: FakeSender) -> None:  # noqa: F811
    assert stack.clickhouse is not None
    registry = PartnerRegistry(stack.clickhouse)
    partner, _token = await asyncio.to_thread(registry.register_direct, "cpo-be", "CPO BE",
                                              [PartyRole(country_code="BE", party_id="BEC", role="CPO")])
    partner.outbound_token = TOKEN
    partner.endpoints = [Endpoint(identifier="locations", role=InterfaceRole.SENDER, url=fake.url("locations"))]
    await asyncio.to_thread(registry.save, partner)
    l2 = location("L2", 5)
    fake.objects["locations"] = [location("L1", 6), l2, location("L3", 4)]
    evses = len(LOCATION["evses"])
    rows = ("SELECT location_id, unlisted, evse_count FROM locations FINAL ORDER BY location_id")

    code, out, err = await run_cli(stack.settings, "pull", "--partner", "cpo-be", "--module", "locations")
    assert code == 0, err
    # A party's first pull is a complete list: nothing stored yet, nothing to unlist.
    assert "the complete list holds 3 Locations; 0 stored ones are no longer listed: unlisted 0" in out
    listed = [("L1", False, evses), ("L2", False, evses), ("L3", False, evses)]
    assert await wait_rows(stack.clickhouse, rows, listed) == listed

    fake.objects["locations"] = [location("L1", 6), location("L3", 4)]  # the CPO dropped L2
    code, out, err = await run_cli(stack.settings, "pull", "--partner", "cpo-be", "--module", "locations",
                                   "--no-full-sync", "--full")
    assert code == 0, err
    assert "2 Locations; 1 stored ones are no longer listed (BE/BEC/L2): reported only (--no-full-sync)" in out
    await asyncio.sleep(2)  # nothing was sent: L2 stays listed
    assert await asyncio.to_thread(lambda: stack.clickhouse.query(rows).result_rows) == listed  # type: ignore[union-attr]

    code, out, err = await run_cli(stack.settings, "pull", "--partner", "cpo-be", "--module", "locations", "--full")
    assert code == 0, err
    assert "2 Locations; 1 stored ones are no longer listed (BE/BEC/L2): unlisted 1" in out
    unlisted = [("L1", False, evses), ("L2", True, evses), ("L3", False, evses)]
    assert await wait_rows(stack.clickhouse, rows, unlisted) == unlisted
    gone = await wait_rows(stack.clickhouse, "SELECT DISTINCT present FROM evses FINAL WHERE location_id = 'L2'",
                           [(False,)])
    assert gone == [(False,)]
    assert await wait_rows(stack.clickhouse, "SELECT DISTINCT present FROM connectors FINAL "
                           "WHERE location_id = 'L2'", [(False,)]) == [(False,)]
    outcomes = await wait_rows(stack.clickhouse, "SELECT object_id, outcome FROM raw_events FINAL "
                               "WHERE operation = 'UNLIST'", [("L2", "APPLIED")])
    assert outcomes == [("L2", "APPLIED")]
    recorded = [json.loads(line) for line in not_listed_path(stack.settings, "cpo-be").read_text().splitlines()]
    assert [(r["not_listed"], r["unlist"]) for r in recorded] == [
        ([], True), ([["BE", "BEC", "L2"]], False), ([["BE", "BEC", "L2"]], True)]

    # The full pull again: L2 is unlisted already, nothing more to do.
    code, out, err = await run_cli(stack.settings, "pull", "--partner", "cpo-be", "--module", "locations", "--full")
    assert code == 0, err
    assert "0 stored ones are no longer listed" in out

    # The list had left L2 out by mistake: a later complete list holds it again, unchanged (dated before the date_to
    # of the list that unlisted it, so no newer push). Received after that date_to, its pulled PUT lists L2 again as
    # stored, instead of being a DUPLICATE of what was stored before the UNLIST.
    fake.objects["locations"] = [location("L1", 6), l2, location("L3", 4)]
    code, out, err = await run_cli(stack.settings, "pull", "--partner", "cpo-be", "--module", "locations", "--full")
    assert code == 0, err
    assert "the complete list holds 3 Locations; 0 stored ones are no longer listed" in out
    assert await wait_rows(stack.clickhouse, rows, listed) == listed
    dated = int(datetime.fromisoformat(l2["last_updated"]).timestamp())
    again = [("L2", False, evses, dated)]
    assert await wait_rows(stack.clickhouse, "SELECT location_id, unlisted, evse_count, toUnixTimestamp(last_updated) "
                           "FROM locations FINAL WHERE location_id = 'L2'", again) == again
    present = [("3256", "AVAILABLE", True), ("3257", "RESERVED", True)]
    assert await wait_rows(stack.clickhouse, "SELECT evse_uid, status, present FROM evses FINAL "
                           "WHERE location_id = 'L2' ORDER BY evse_uid", present) == present
    assert await wait_rows(stack.clickhouse, "SELECT DISTINCT present FROM connectors FINAL "
                           "WHERE location_id = 'L2'", [(True,)]) == [(True,)]
    relisted = [("APPLIED", True)]
    assert await wait_rows(stack.clickhouse, "SELECT outcome, endsWith(outcome_detail, 'lists it again') "
                           "FROM raw_events FINAL WHERE object_id = 'L2' AND operation = 'PUT' AND received_at > "
                           "(SELECT max(received_at) FROM raw_events FINAL WHERE operation = 'UNLIST')",
                           relisted) == relisted

    # Left out again, by a list that means it this time: unlisted again.
    fake.objects["locations"] = [location("L1", 6), location("L3", 4)]
    code, out, err = await run_cli(stack.settings, "pull", "--partner", "cpo-be", "--module", "locations", "--full")
    assert code == 0, err
    assert "1 stored ones are no longer listed (BE/BEC/L2): unlisted 1" in out
    assert await wait_rows(stack.clickhouse, rows, unlisted) == unlisted

    # The CPO lists L2 again, updated after that list's date_to: a pull of the window it falls in reads it.
    fake.objects["locations"].append(location("L2", 1 / 60))
    code, out, err = await run_cli(stack.settings, "pull", "--partner", "cpo-be", "--module", "locations",
                                   "--since", "1h", "--until", stamp(hours_ago(-1)))
    assert code == 0, err
    assert "pulled 1 locations" in out
    assert await wait_rows(stack.clickhouse, rows, listed) == listed
    assert await wait_rows(stack.clickhouse, "SELECT DISTINCT present FROM evses FINAL WHERE location_id = 'L2'",
                           [(True,)]) == [(True,)]
