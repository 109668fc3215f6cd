"""A simulated CPO: realistic OCPI traffic pushed through real HTTP to the receivers.

Deterministic for a seed, so the demo and the tests know exactly what must arrive in ClickHouse.
"""

from __future__ import annotations

import asyncio
import base64
import random
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx

from ocpi.datetime import format_datetime

RECEIVER_BASE = "/ocpi/emsp/2.2.1"
FOUR_PLACES = Decimal("0.0001")


@dataclass(frozen=True)
class SimulatedParty:
    country_code: str
    party_id: str


@dataclass
class Expected:
    """What the simulator pushed and was acknowledged: the truth the pipeline must reproduce."""

    sessions: set[tuple[str, str, str]] = field(default_factory=set)
    cdrs: set[tuple[str, str, str]] = field(default_factory=set)
    kwh_by_party: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    cost_by_party: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    pushes: int = 0
    rejected: int = 0


def _money(value: float) -> Decimal:
    return Decimal(str(value)).quantize(FOUR_PLACES)


def auth_header(token: str) -> str:
    return "Token " + base64.b64encode(token.encode()).decode()


class ChargingStory:
    """One charging session at a party: its Session versions and final CDR as OCPI JSON."""

    def __init__(self, rng: random.Random, party: SimulatedParty, number: int, start: datetime) -> None:
        self.party = party
        self.session_id = f"S{number:06d}"
        self.cdr_id = f"C{number:06d}"
        self.start = start
        self.minutes = rng.randint(15, 180)
        self.end = start + timedelta(minutes=self.minutes)
        self.kwh = _money(rng.uniform(3.0, 75.0))
        self.price_per_kwh = _money(rng.choice([0.29, 0.35, 0.42, 0.59]))
        self.cost_excl = (self.kwh * self.price_per_kwh).quantize(FOUR_PLACES)
        self.cost_incl = (self.cost_excl * Decimal("1.21")).quantize(FOUR_PLACES)
        self.location_id = f"LOC{rng.randint(1, 40):03d}"
        self.evse_uid = f"{self.location_id}-E{rng.randint(1, 4)}"
        self.token_uid = f"TOK{rng.randint(1, 500):05d}"
        self.contract_id = f"{party.country_code}-EMS-C{rng.randint(1, 500):08d}"

    def _token(self) -> dict[str, Any]:
        return {"country_code": self.party.country_code, "party_id": "EMS", "uid": self.token_uid,
                "type": "RFID", "contract_id": self.contract_id}

    def session(self, status: str, kwh: Decimal, updated: datetime, *, final: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "country_code": self.party.country_code, "party_id": self.party.party_id, "id": self.session_id,
            "start_date_time": format_datetime(self.start), "kwh": float(kwh), "cdr_token": self._token(),
            "auth_method": "WHITELIST", "location_id": self.location_id, "evse_uid": self.evse_uid,
            "connector_id": "1", "currency": "EUR", "status": status, "last_updated": format_datetime(updated),
        }
        if final:
            body["end_date_time"] = format_datetime(self.end)
            body["total_cost"] = {"excl_vat": float(self.cost_excl), "incl_vat": float(self.cost_incl)}
        return body

    def cdr(self) -> dict[str, Any]:
        hours = (Decimal(self.minutes) / Decimal(60)).quantize(FOUR_PLACES)
        return {
            "country_code": self.party.country_code, "party_id": self.party.party_id, "id": self.cdr_id,
            "start_date_time": format_datetime(self.start), "end_date_time": format_datetime(self.end),
            "session_id": self.session_id, "cdr_token": self._token(), "auth_method": "WHITELIST",
            "cdr_location": {
                "id": self.location_id, "name": f"Station {self.location_id}", "address": "Main Street 1",
                "city": "Utrecht", "postal_code": "3511AB", "country": "NLD",
                "coordinates": {"latitude": "52.090736", "longitude": "5.121420"},
                "evse_uid": self.evse_uid, "evse_id": f"NL*TNM*E{self.evse_uid}".replace("-", ""),
                "connector_id": "1", "connector_standard": "IEC_62196_T2", "connector_format": "SOCKET",
                "connector_power_type": "AC_3_PHASE",
            },
            "currency": "EUR",
            "charging_periods": [{"start_date_time": format_datetime(self.start),
                                  "dimensions": [{"type": "ENERGY", "volume": float(self.kwh)},
                                                 {"type": "TIME", "volume": float(hours)}]}],
            "total_cost": {"excl_vat": float(self.cost_excl), "incl_vat": float(self.cost_incl)},
            "total_energy": float(self.kwh), "total_time": float(hours),
            "last_updated": format_datetime(self.end),
        }


class SimulatedCpo:
    """Pushes sessions and CDRs for its parties to one receiver base URL with one token."""

    def __init__(self, base_url: str, token: str, parties: list[SimulatedParty], *, seed: int = 7,
                 concurrency: int = 32) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.parties = parties
        self.rng = random.Random(seed)
        self.concurrency = concurrency
        self.expected = Expected()

    async def _send(self, client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any]) -> bool:
        headers = {"Authorization": auth_header(self.token), "X-Request-ID": str(uuid.uuid4()),
                   "X-Correlation-ID": str(uuid.uuid4())}
        for attempt in range(5):
            response = await client.request(method, f"{self.base_url}{path}", json=body, headers=headers)
            status = response.json().get("status_code")
            self.expected.pushes += 1
            if status == 1000:
                return True
            if status is not None and 3000 <= status < 4000 and attempt < 4:
                await asyncio.sleep(0.2 * (attempt + 1))  # a real CPO retries server errors
                continue
            self.expected.rejected += 1
            return False
        return False

    async def _story(self, client: httpx.AsyncClient, story: ChargingStory) -> None:
        p = story.party
        url = f"{RECEIVER_BASE}/sessions/{p.country_code}/{p.party_id}/{story.session_id}"
        await self._send(client, "PUT", url, story.session("ACTIVE", Decimal(0), story.start))
        done = await self._send(client, "PUT", url,
                                story.session("COMPLETED", story.kwh, story.end, final=True))
        if done:
            self.expected.sessions.add((p.country_code, p.party_id, story.session_id))
        if await self._send(client, "POST", f"{RECEIVER_BASE}/cdrs", story.cdr()):
            party = f"{p.country_code}/{p.party_id}"
            self.expected.cdrs.add((p.country_code, p.party_id, story.cdr_id))
            self.expected.kwh_by_party[party] += story.kwh
            self.expected.cost_by_party[party] += story.cost_excl

    async def run(self, sessions: int, progress: Callable[[int], None] | None = None) -> Expected:
        """Push `sessions` complete charging stories (2 session PUTs and a CDR each)."""
        now = datetime.now(UTC).replace(microsecond=0)
        stories = [ChargingStory(self.rng, self.parties[i % len(self.parties)], i + 1,
                                 now - timedelta(days=self.rng.randint(0, 6), minutes=self.rng.randint(200, 600)))
                   for i in range(sessions)]
        slots = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            async def one(story: ChargingStory) -> None:
                async with slots:
                    await self._story(client, story)
                if progress:
                    progress(1)

            await asyncio.gather(*(one(s) for s in stories))
        return self.expected
