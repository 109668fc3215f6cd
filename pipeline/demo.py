"""The demo: the whole stack on the embedded engines, a simulated CPO, and a summary read back from ClickHouse."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from clickhouse_connect.driver.client import Client

from infra.settings import Settings
from pipeline.simulator import Expected, SimulatedCpo, SimulatedParty
from pipeline.stack import Stack
from receivers.registry import PartnerRegistry, PartyRole

DEMO_PARTNERS = {
    "demo-cpo-nl": ("Demo CPO Netherlands", [SimulatedParty("NL", "TNM"), SimulatedParty("NL", "EVB")]),
    "demo-cpo-be": ("Demo CPO Belgium", [SimulatedParty("BE", "BEC")]),
}


@dataclass(frozen=True)
class PartyTotals:
    country_code: str
    party_id: str
    sessions: int
    cdrs: int
    kwh: Decimal
    cost_excl_vat: Decimal
    cost_incl_vat: Decimal


@dataclass(frozen=True)
class DemoSummary:
    sessions: int
    cdrs: int
    raw_events: int
    dead_letters: int
    parties: list[PartyTotals]
    expected: Expected
    seconds: float

    @property
    def matches_expected(self) -> bool:
        """Every push acknowledged, and ClickHouse holds exactly what was acknowledged."""
        return (self.expected.rejected == 0
                and self.sessions == len(self.expected.sessions) and self.cdrs == len(self.expected.cdrs)
                and all(p.kwh == self.expected.kwh_by_party[f"{p.country_code}/{p.party_id}"]
                        and p.cost_excl_vat == self.expected.cost_by_party[f"{p.country_code}/{p.party_id}"]
                        for p in self.parties))


def read_summary(client: Client, expected: Expected, seconds: float) -> DemoSummary:
    def scalar(sql: str) -> int:
        return int(client.query(sql).result_rows[0][0])

    sessions_by_party = dict(((cc, pid), n) for cc, pid, n in client.query(
        "SELECT country_code, party_id, count() FROM sessions FINAL GROUP BY country_code, party_id").result_rows)
    parties = [
        PartyTotals(cc, pid, int(sessions_by_party.get((cc, pid), 0)), int(n), kwh, excl, incl or Decimal(0))
        for cc, pid, n, kwh, excl, incl in client.query(
            "SELECT country_code, party_id, count(), sum(total_energy), sum(total_cost_excl_vat), "
            "sum(total_cost_incl_vat) FROM cdrs FINAL GROUP BY country_code, party_id "
            "ORDER BY country_code, party_id").result_rows
    ]
    return DemoSummary(
        sessions=scalar("SELECT count() FROM sessions FINAL"),
        cdrs=scalar("SELECT count() FROM cdrs FINAL"),
        raw_events=scalar("SELECT count() FROM raw_events FINAL"),
        dead_letters=scalar("SELECT count() FROM dead_letters"),
        parties=parties, expected=expected, seconds=seconds)


async def wait_for_rows(client: Client, expected: Expected, timeout: float) -> bool:
    """Poll until ClickHouse holds every acknowledged session and CDR (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    want = (len(expected.sessions), len(expected.cdrs))
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(lambda: (
            int(client.query("SELECT count() FROM sessions FINAL WHERE status = 'COMPLETED'").result_rows[0][0]),
            int(client.query("SELECT count() FROM cdrs FINAL").result_rows[0][0])))
        if got == want:
            return True
        await asyncio.sleep(0.5)
    return False


def provision_demo_partners(client: Client) -> dict[str, tuple[str, list[SimulatedParty]]]:
    """Register the demo CPOs directly (operator-provisioned) and return their tokens."""
    registry = PartnerRegistry(client)
    tokens = {}
    for partner_id, (name, parties) in DEMO_PARTNERS.items():
        roles = [PartyRole(country_code=p.country_code, party_id=p.party_id, role="CPO", business_name=name)
                 for p in parties]
        _partner, token = registry.register_direct(partner_id, name, roles)
        tokens[partner_id] = (token, parties)
    return tokens


async def run_demo(settings: Settings, *, sessions: int, seed: int, timeout: float,
                   on_started: Callable[[Stack], None] | None = None,
                   progress: Callable[[int], None] | None = None) -> DemoSummary:
    started = time.monotonic()
    stack = await Stack(settings).start()
    try:
        assert stack.clickhouse is not None
        if on_started:
            on_started(stack)
        partners = await asyncio.to_thread(provision_demo_partners, stack.clickhouse)
        expected = Expected()
        share = [sessions // len(partners) + (1 if i < sessions % len(partners) else 0)
                 for i in range(len(partners))]
        cpos = [SimulatedCpo(stack.base_url, token, parties, seed=seed + i)
                for i, (token, parties) in enumerate(partners.values())]
        results = await asyncio.gather(*(cpo.run(n, progress) for cpo, n in zip(cpos, share, strict=True)))
        for result in results:
            expected.sessions |= result.sessions
            expected.cdrs |= result.cdrs
            for party, kwh in result.kwh_by_party.items():
                expected.kwh_by_party[party] += kwh
            for party, cost in result.cost_by_party.items():
                expected.cost_by_party[party] += cost
            expected.pushes += result.pushes
            expected.rejected += result.rejected
        await wait_for_rows(stack.clickhouse, expected, timeout)
        stack.check_children()
        return await asyncio.to_thread(read_summary, stack.clickhouse, expected, time.monotonic() - started)
    finally:
        await stack.stop()
