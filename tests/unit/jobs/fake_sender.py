"""A fake CPO Sender interface (Locations/Sessions/CDRs GET List) on 127.0.0.1, for the pull tests.

Independent of our code: plain dicts, its own token check and pagination, following 04 §4.2 — `date_from`
inclusive, `date_to` exclusive on `last_updated`, `offset`/`limit` with a server cap announced in `X-Limit`,
`X-Total-Count` of the whole filtered list, and `Link: <…>; rel="next"` carrying every filter. Tests script
failures (`fail_next`) and mutate the data between requests (`before_request`) to exercise the crawler.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from tests.conftest import EXAMPLES

SESSION = json.loads((EXAMPLES / "session_example_2_short_finished.json").read_text())


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def session(number: int, updated: datetime, *, kwh: float = 10.0, party: tuple[str, str] = ("BE", "BEC"),
            **changes: Any) -> dict[str, Any]:
    """The spec's example Session with another id, energy, owner and times (recent: tables have TTLs)."""
    body = copy.deepcopy(SESSION)
    start = updated - timedelta(hours=2)
    for period in body["charging_periods"]:
        period["start_date_time"] = stamp(start)
    body.update(country_code=party[0], party_id=party[1], id=f"S{number:04d}", kwh=kwh,
                start_date_time=stamp(start), end_date_time=stamp(updated - timedelta(minutes=5)),
                last_updated=stamp(updated), **changes)
    return body


def cdr(number: int, updated: datetime, *, energy: str = "15.342", cost: str = "4.00") -> dict[str, Any]:
    """A complete CDR of party BE/BEC (numbers as JSON numbers with the given digits)."""
    start = updated - timedelta(hours=2)
    return {
        "country_code": "BE", "party_id": "BEC", "id": f"C{number:04d}", "start_date_time": stamp(start),
        "end_date_time": stamp(updated), "session_id": f"S{number:04d}",
        "cdr_token": {"country_code": "DE", "party_id": "TNM", "uid": "012345678", "type": "RFID",
                      "contract_id": "DE8ACC12E46L89"},
        "auth_method": "WHITELIST",
        "cdr_location": {"id": "LOC1", "name": "Gent Zuid", "address": "F.Rooseveltlaan 3A", "city": "Gent",
                         "postal_code": "9000", "country": "BEL",
                         "coordinates": {"latitude": "3.729944", "longitude": "51.047599"},
                         "evse_uid": "3256", "evse_id": "BE*BEC*E041503003", "connector_id": "1",
                         "connector_standard": "IEC_62196_T2", "connector_format": "SOCKET",
                         "connector_power_type": "AC_1_PHASE"},
        "currency": "EUR",
        "charging_periods": [{"start_date_time": stamp(start),
                              "dimensions": [{"type": "ENERGY", "volume": float(energy)}]}],
        "total_cost": {"excl_vat": float(cost), "incl_vat": round(float(cost) * 1.1, 4)},
        "total_energy": float(energy), "total_time": 2.0, "last_updated": stamp(updated),
    }


@dataclass
class Seen:
    module: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class Failure:
    http_status: int
    ocpi_status: int | None = None  # None: a body that is not an OCPI envelope
    headers: dict[str, str] | None = None


class FakeSender:
    def __init__(self, token: str, *, page_cap: int = 2) -> None:
        self.token = token
        self.page_cap = page_cap
        self.objects: dict[str, list[dict[str, Any]]] = {"sessions": [], "cdrs": [], "locations": []}
        self.seen: list[Seen] = []
        self.failures: list[Failure] = []
        self.before_request: Callable[[FakeSender, int], None] | None = None
        self.redirect_to: str | None = None
        self.ignore_offset = False  # a broken server: every offset answers the first page (Link still moves on)
        self.link_filters = True  # False: next links carry only offset and limit, as 04 §4.2's example shows them
        # A platform hosting several CPO parties (03 case 3): a GET lists only the objects of the party its
        # OCPI-to-* headers name, and answers from that party.
        self.route_by_to_party = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> FakeSender:
        app = web.Application()
        app.router.add_get("/ocpi/cpo/2.2.1/{module}", self._list)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, module: str) -> str:
        return f"http://127.0.0.1:{self.port}/ocpi/cpo/2.2.1/{module}"

    def fail_next(self, *failures: Failure) -> None:
        self.failures.extend(failures)

    def offsets(self, module: str) -> list[int]:
        return [int(s.query.get("offset", "0")) for s in self.seen if s.module == module]

    @staticmethod
    def _envelope(status: int, data: Any = None, http: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
        body: dict[str, Any] = {"status_code": status, "timestamp": stamp(datetime.now(UTC))}
        if data is not None:
            body["data"] = data
        return web.json_response(body, status=http, headers=headers)

    async def _list(self, request: web.Request) -> web.Response:
        module = request.match_info["module"]
        self.seen.append(Seen(module, dict(request.query), dict(request.headers)))
        expected = "Token " + base64.b64encode(self.token.encode()).decode()
        if request.headers.get("Authorization") != expected:
            return self._envelope(2000, http=401)
        if self.redirect_to:
            raise web.HTTPFound(self.redirect_to)
        if self.failures:
            failure = self.failures.pop(0)
            if failure.ocpi_status is None:
                return web.Response(status=failure.http_status, text="busy", headers=failure.headers)
            return self._envelope(failure.ocpi_status, http=failure.http_status, headers=failure.headers)
        if self.before_request is not None:
            self.before_request(self, len(self.seen))
        date_from = parse(request.query["date_from"]) if "date_from" in request.query else None
        date_to = parse(request.query["date_to"]) if "date_to" in request.query else None
        if module == "sessions" and date_from is None:
            return self._envelope(2001, http=400)
        matching = [o for o in sorted(self.objects[module], key=lambda o: parse(o["last_updated"]))
                    if (date_from is None or parse(o["last_updated"]) >= date_from)
                    and (date_to is None or parse(o["last_updated"]) < date_to)]
        answering = ("BE", "BEC")
        if self.route_by_to_party:
            answering = (request.headers.get("OCPI-to-country-code", ""), request.headers.get("OCPI-to-party-id", ""))
            matching = [o for o in matching if (o["country_code"].upper(), o["party_id"].upper())
                        == (answering[0].upper(), answering[1].upper())]
        offset = int(request.query.get("offset", "0"))
        limit = min(int(request.query.get("limit", str(self.page_cap))), self.page_cap)
        first = 0 if self.ignore_offset else offset
        page = matching[first:first + limit]
        headers = {"X-Total-Count": str(len(matching)), "X-Limit": str(self.page_cap),
                   "OCPI-from-country-code": answering[0], "OCPI-from-party-id": answering[1],
                   "OCPI-to-country-code": "NL", "OCPI-to-party-id": "OPP"}
        if offset + limit < len(matching):
            query = {k: v for k, v in request.query.items() if k not in ("offset", "limit") and self.link_filters}
            query |= {"offset": str(offset + limit), "limit": str(limit)}
            headers["Link"] = f'<{self.url(module)}?{urlencode(query)}>; rel="next"'
        return self._envelope(1000, page, headers=headers)


def hours_ago(hours: float) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(hours=hours)
