"""The transport layer, table-driven: every status code and header rule, routing headers included.

Each row is one real request to the assembled app (create_app with a registry on chDB and a fake sink) and
the HTTP status, OCPI status code and headers it must get back.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from litestar import Router, get
from litestar.exceptions import InternalServerException
from litestar.params import FromPath
from litestar.testing import AsyncTestClient

from ocpi.compat import CompatProfile
from ocpi.datetime import parse_datetime
from ocpi.status import OcpiStatus
from receivers.app import create_app
from receivers.registry import PartnerStatus
from receivers.transport import (
    STATUS_EXCEPTIONS,
    InvalidParameters,
    InvalidRoutingHeaders,
    OcpiError,
    parse_timestamp,
    routing_headers,
)
from tests.conftest import EXAMPLES
from tests.unit.receivers.app_support import AppEnv, FakeSink, app_env, auth, make_env, routing  # noqa: F401

pytestmark = pytest.mark.clickhouse

SESSIONS = "/ocpi/emsp/2.2.1/sessions"
OURS = ("NL", "OPP")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def session(country: str = "BE", party: str = "BEC", session_id: str = "101") -> bytes:
    body = json.loads((EXAMPLES / "session_example_2_short_finished.json").read_text())
    body.update(country_code=country, party_id=party, id=session_id)
    return json.dumps(body).encode()


def cdr(country: str, party: str) -> bytes:
    from tests.unit.receivers.push_support import cdr as cdr_body

    return json.dumps({**cdr_body(), "country_code": country, "party_id": party}).encode()


@dataclass
class Partners:
    """The cast of every row: tokens by name."""

    tokens: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> dict[str, str]:
        return auth(self.tokens[name])


def cast(env: AppEnv) -> Partners:
    p = Partners()
    p.tokens["cpo"] = env.provision("cpo", ("BE", "BEC", "CPO"))
    p.tokens["multi"] = env.provision("multi", ("NL", "EXO", "CPO"), ("NL", "PFC", "CPO"))
    p.tokens["hub"] = env.provision("hub", ("DE", "HUB", "HUB"))
    p.tokens["emsp"] = env.provision("emsp", ("FR", "MSP", "EMSP"))
    p.tokens["mixed"] = env.provision("mixed", ("NL", "CPX", "CPO"), ("NL", "MXP", "EMSP"))
    # Parties are CiString(2)/CiString(3) (07 §5): any printable ASCII up to that length, as registration accepts.
    p.tokens["odd"] = env.provision("odd", ("N1", "A-B", "CPO"), ("NL", "X", "CPO"))
    p.tokens["raw"] = env.provision("raw", ("FR", "RAW", "CPO"), compat=("RAW_TOKEN",))
    p.tokens["suspended"] = env.provision("suspended", ("FR", "SUS", "CPO"))
    env.registry.set_status("suspended", PartnerStatus.SUSPENDED)
    p.tokens["invited"] = env.registry.invite("invited", "Invited")[1]
    return p


@dataclass
class Row:
    name: str
    method: str
    path: str
    headers: Callable[[Partners], dict[str, str]]
    http: int
    code: int | None  # None: a response without a body (HEAD)
    body: bytes | None = None
    check: Callable[[httpx.Response], None] | None = None


def as_(name: str, **extra: str) -> Callable[[Partners], dict[str, str]]:
    return lambda p: {**p.header(name), **extra}


def raw_token(name: str) -> Callable[[Partners], dict[str, str]]:
    return lambda p: {"Authorization": f"Token {p.tokens[name]}"}


def no_auth(**extra: str) -> Callable[[Partners], dict[str, str]]:
    return lambda p: dict(extra)


Party = tuple[str, str]


def routed(name: str, from_: Party | None, to: Party | None) -> Callable[[Partners], dict[str, str]]:
    return lambda p: {**p.header(name), **routing(from_, to)}


def response_routing(from_: Party | None, to: Party | None) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        got_from = (response.headers.get("ocpi-from-country-code"), response.headers.get("ocpi-from-party-id"))
        got_to = (response.headers.get("ocpi-to-country-code"), response.headers.get("ocpi-to-party-id"))
        assert got_from == (from_ or (None, None)), got_from
        assert got_to == (to or (None, None)), got_to

    return check


def allow(methods: str) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        assert response.headers["allow"] == methods

    return check


def no_data(response: httpx.Response) -> None:
    assert "data" not in response.json(), "a push answer leaves data out (04 §5, d2 note)"


def accept_encoding_identity(response: httpx.Response) -> None:
    assert response.headers["accept-encoding"] == "identity"
    assert "Content-Encoding" in response.json()["status_message"]


def message_has(text: str) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        assert text in response.json()["status_message"], response.json()

    return check


OK, BAD = 1000, 2001
ROWS = [
    # --- authentication (04 §2, 05 §2) ---
    Row("versions with Token A", "GET", "/ocpi/versions", as_("invited"), 200, OK),
    Row("versions with a registered token", "GET", "/ocpi/versions", as_("cpo"), 200, OK),
    Row("no Authorization header", "GET", "/ocpi/versions", no_auth(), 401, 2000),
    Row("unknown token", "GET", "/ocpi/versions", lambda p: auth("not-a-token"), 401, 2000),
    Row("not the Token scheme", "GET", "/ocpi/versions", lambda p: {"Authorization": f"Bearer {p.tokens['cpo']}"},
        401, 2000),
    Row("Token with two values", "GET", "/ocpi/versions", lambda p: {"Authorization": "Token abc def"}, 401, 2000),
    Row("raw token, profile strict", "GET", "/ocpi/versions", raw_token("cpo"), 401, 2000),
    Row("raw token, profile RAW_TOKEN", "GET", "/ocpi/versions", raw_token("raw"), 200, OK),
    Row("base64 token, profile RAW_TOKEN", "GET", "/ocpi/versions", as_("raw"), 200, OK),
    Row("suspended partner", "GET", "/ocpi/versions", as_("suspended"), 401, 2000),
    Row("Token A on a functional module", "PUT", f"{SESSIONS}/BE/BEC/101", as_("invited"), 401, 2000,
        body=session(), check=message_has("Token A")),
    # --- framework errors as envelopes ---
    Row("unknown path", "GET", "/ocpi/emsp/2.2.1/nothing", as_("cpo"), 404, 2000),
    Row("unknown path without a token", "POST", "/x", no_auth(), 404, 2000),
    Row("method not allowed", "DELETE", f"{SESSIONS}/BE/BEC/101", as_("cpo"), 405, 2000,
        check=allow("GET, HEAD, PATCH, PUT")),
    Row("OPTIONS", "OPTIONS", f"{SESSIONS}/BE/BEC/101", no_auth(), 405, 2000,
        check=allow("GET, HEAD, PATCH, PUT")),
    # HEAD is GET without content wherever GET is (RFC 9110 §9.1, §9.3.2): same status and headers, no body.
    Row("HEAD", "HEAD", "/ocpi/versions", as_("cpo"), 200, None),
    Row("HEAD without a token", "HEAD", "/ocpi/versions", no_auth(), 401, None),
    Row("HEAD with Token A on a functional module", "HEAD", f"{SESSIONS}/BE/BEC/101", as_("invited"), 401, None),
    Row("HEAD of a Session we do not hold", "HEAD", f"{SESSIONS}/BE/BEC/101", as_("cpo"), 404, None,
        check=response_routing(OURS, ("BE", "BEC"))),
    Row("HEAD where there is no GET", "HEAD", "/ocpi/emsp/2.2.1/cdrs", as_("cpo"), 405, None, check=allow("POST")),
    Row("malformed JSON", "PUT", f"{SESSIONS}/BE/BEC/101", as_("cpo"), 400, BAD, body=b"{not json"),
    Row("invalid UTF-8 in a JSON string", "PUT", f"{SESSIONS}/BE/BEC/101", as_("cpo"), 400, BAD,
        body=b'{"meter_id": "\xff"}', check=message_has("not UTF-8")),
    Row("invalid UTF-8, Location level check", "PUT", "/ocpi/emsp/2.2.1/locations/BE/BEC/LOC1", as_("cpo"), 400,
        BAD, body=b'{"name": "\xff"}', check=message_has("not UTF-8")),
    Row("JSON nested too deeply, Location level check", "PUT", "/ocpi/emsp/2.2.1/locations/BE/BEC/LOC1",
        as_("cpo"), 400, BAD, body=b'{"name": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        check=message_has("nests too deeply")),
    Row("body too large", "PUT", f"{SESSIONS}/BE/BEC/101", as_("cpo"), 413, BAD, body=b" " * (4 * 1024 * 1024 + 1)),
    # A compressed body (RFC 9110 §8.4) is refused as such, 415 with Accept-Encoding, not read as broken JSON, and a
    # body its headers say is compressed is never read as if it were not.
    Row("gzip-compressed push", "PUT", f"{SESSIONS}/BE/BEC/101", as_("cpo", **{"Content-Encoding": "gzip"}), 415, BAD,
        body=gzip.compress(session()), check=accept_encoding_identity),
    Row("push labelled gzip, not compressed", "PUT", f"{SESSIONS}/BE/BEC/101",
        as_("cpo", **{"Content-Encoding": "GZIP"}), 415, BAD, body=session(), check=accept_encoding_identity),
    Row("push labelled br", "POST", "/ocpi/emsp/2.2.1/cdrs", as_("cpo", **{"Content-Encoding": "identity, br"}), 415,
        BAD, body=cdr("BE", "BEC"), check=accept_encoding_identity),
    Row("compressed credentials", "PUT", "/ocpi/2.2.1/credentials", as_("cpo", **{"Content-Encoding": "deflate"}),
        415, BAD, body=b"{}", check=accept_encoding_identity),
    Row("compressed push without a token: 401 first", "PUT", f"{SESSIONS}/BE/BEC/101",
        no_auth(**{"Content-Encoding": "gzip"}), 401, 2000, body=gzip.compress(session())),
    Row("Content-Encoding identity", "PUT", f"{SESSIONS}/BE/BEC/101", as_("cpo", **{"Content-Encoding": "identity"}),
        200, OK, body=session()),
    Row("valid JSON, invalid object", "PUT", f"{SESSIONS}/BE/BEC/101", as_("cpo"), 200, BAD, body=b"{}",
        check=message_has("$.country_code")),
    Row("URL id differs from body id", "PUT", f"{SESSIONS}/BE/BEC/999", as_("cpo"), 200, BAD, body=session()),
    Row("accepted push", "PUT", f"{SESSIONS}/BE/BEC/101", as_("cpo"), 200, OK, body=session(), check=no_data),
    # --- owner authorization (04 §6.2) ---
    Row("owner not one of the caller's roles", "PUT", f"{SESSIONS}/NL/TNM/101", as_("cpo"), 404, BAD,
        body=session("NL", "TNM")),
    Row("owner compared case-insensitively", "PUT", f"{SESSIONS}/be/bec/101", as_("cpo"), 200, OK, body=session()),
    Row("CDR owner in the body, not the caller's", "POST", "/ocpi/emsp/2.2.1/cdrs", as_("cpo"), 404, BAD,
        body=cdr("NL", "TNM")),
    # Locations, Sessions and CDRs are a CPO's (08/09/10 §1): a party registered in another role owns none.
    Row("EMSP role pushing a Session of its party", "PUT", f"{SESSIONS}/FR/MSP/101", as_("emsp"), 404, BAD,
        body=session("FR", "MSP"), check=message_has("EMSP")),
    Row("EMSP role pushing a Location of its party", "PUT", "/ocpi/emsp/2.2.1/locations/FR/MSP/LOC1", as_("emsp"),
        404, BAD, body=b"{}"),
    Row("EMSP role posting a CDR of its party", "POST", "/ocpi/emsp/2.2.1/cdrs", as_("emsp"), 404, BAD,
        body=cdr("FR", "MSP")),
    Row("EMSP role reading back a Session", "GET", f"{SESSIONS}/FR/MSP/101", as_("emsp"), 404, BAD),
    Row("EMSP role reading back a CDR", "GET", "/ocpi/emsp/2.2.1/cdrs/FR/MSP/1", as_("emsp"), 404, BAD),
    Row("mixed platform: its CPO party", "PUT", f"{SESSIONS}/NL/CPX/101", routed("mixed", ("NL", "CPX"), OURS),
        200, OK, body=session("NL", "CPX")),
    Row("mixed platform: its EMSP party", "PUT", f"{SESSIONS}/NL/MXP/101", routed("mixed", ("NL", "MXP"), OURS),
        404, BAD, body=session("NL", "MXP")),
    Row("mixed platform: a CDR of its EMSP party", "POST", "/ocpi/emsp/2.2.1/cdrs",
        routed("mixed", ("NL", "CPX"), OURS), 404, BAD, body=cdr("NL", "MXP")),
    # --- routing headers (04 §8) ---
    Row("single-party peer, no routing headers: response names both sides", "PUT", f"{SESSIONS}/BE/BEC/101",
        as_("cpo"), 200, OK, body=session(), check=response_routing(from_=OURS, to=("BE", "BEC"))),
    Row("routing headers swapped in the response", "PUT", f"{SESSIONS}/BE/BEC/101",
        routed("cpo", ("BE", "BEC"), OURS), 200, OK, body=session(),
        check=response_routing(from_=OURS, to=("BE", "BEC"))),
    Row("routing headers swapped on an error too", "PUT", f"{SESSIONS}/BE/BEC/101",
        routed("cpo", ("BE", "BEC"), OURS), 200, BAD, body=b"{}", check=response_routing(OURS, ("BE", "BEC"))),
    Row("malformed country code", "PUT", f"{SESSIONS}/BE/BEC/101", routed("cpo", ("BEL", "BEC"), OURS), 400, BAD,
        body=session(), check=message_has("ocpi-from-country-code")),
    Row("malformed party id", "PUT", f"{SESSIONS}/BE/BEC/101", routed("cpo", ("BE", "BE-C"), OURS), 400, BAD,
        body=session()),
    Row("unpaired routing header", "PUT", f"{SESSIONS}/BE/BEC/101",
        as_("cpo", **{"OCPI-from-country-code": "BE"}), 400, BAD, body=session(), check=message_has("pairs")),
    # Refused headers are not echoed as if they were true: the answer is ours, to the caller's party (04 §8.2).
    Row("malformed routing headers: the answer is from us, to the caller's party", "PUT", f"{SESSIONS}/BE/BEC/101",
        routed("cpo", ("BEL", "BEC"), OURS), 400, BAD, body=session(), check=response_routing(OURS, ("BE", "BEC"))),
    Row("unpaired routing header: the answer is from us, to the caller's party", "PUT", f"{SESSIONS}/BE/BEC/101",
        as_("cpo", **{"OCPI-to-party-id": "OPP"}), 400, BAD, body=session(),
        check=response_routing(OURS, ("BE", "BEC"))),
    Row("malformed routing headers from a multi-party platform: from us", "PUT", f"{SESSIONS}/NL/EXO/101",
        routed("multi", ("NL", "EXO"), ("NLX", "OPP")), 400, BAD, body=session("NL", "EXO"),
        check=response_routing(OURS, None)),
    Row("addressed to a party we do not host", "PUT", f"{SESSIONS}/BE/BEC/101",
        routed("cpo", ("BE", "BEC"), ("DE", "XXX")), 400, BAD, body=session(),
        check=response_routing(OURS, ("BE", "BEC"))),
    Row("from a party that is not the caller's", "PUT", f"{SESSIONS}/BE/BEC/101",
        routed("cpo", ("NL", "EXO"), OURS), 400, BAD, body=session(), check=response_routing(OURS, ("BE", "BEC"))),
    Row("multi-party platform without routing headers", "PUT", f"{SESSIONS}/NL/EXO/101", as_("multi"), 400, BAD,
        body=session("NL", "EXO"), check=message_has("required")),
    Row("multi-party platform, to-* missing", "PUT", f"{SESSIONS}/NL/EXO/101", routed("multi", ("NL", "EXO"), None),
        400, BAD, body=session("NL", "EXO")),
    Row("routing headers name any CiString party the caller holds", "PUT", f"{SESSIONS}/N1/A-B/101",
        routed("odd", ("N1", "A-B"), OURS), 200, OK, body=session("N1", "A-B"),
        check=response_routing(OURS, ("N1", "A-B"))),
    Row("routing headers with a party id shorter than 3", "PUT", f"{SESSIONS}/NL/X/101",
        routed("odd", ("nl", "x"), OURS), 200, OK, body=session("NL", "X")),
    Row("multi-party platform pushing for its other party", "PUT", f"{SESSIONS}/NL/PFC/101",
        routed("multi", ("NL", "EXO"), OURS), 200, OK, body=session("NL", "PFC")),
    Row("routing headers are not used on configuration modules", "GET", "/ocpi/versions",
        routed("cpo", ("BE", "BEC"), OURS), 200, OK, check=response_routing(None, None)),
    # Answers given before the guard reads the headers still carry them on a functional module (04 §8.1).
    Row("routing headers swapped on a 405", "DELETE", f"{SESSIONS}/BE/BEC/101",
        routed("cpo", ("BE", "BEC"), OURS), 405, 2000, check=response_routing(OURS, ("BE", "BEC"))),
    Row("routing headers swapped on a 405 at the CDRs POST URL", "GET", "/ocpi/emsp/2.2.1/cdrs",
        routed("cpo", ("BE", "BEC"), OURS), 405, 2000, check=response_routing(OURS, ("BE", "BEC"))),
    Row("routing headers swapped on a 405 at a CDR URL", "POST", "/ocpi/emsp/2.2.1/cdrs/BE/BEC/1/",
        routed("cpo", ("BE", "BEC"), OURS), 405, 2000, check=response_routing(OURS, ("BE", "BEC"))),
    Row("routing headers swapped on OPTIONS", "OPTIONS", f"{SESSIONS}/BE/BEC/101",
        routed("cpo", ("BE", "BEC"), OURS), 405, 2000, check=response_routing(OURS, ("BE", "BEC"))),
    Row("routing headers swapped on a 401", "GET", f"{SESSIONS}/BE/BEC/101",
        lambda p: {**auth("not-a-token"), **routing(("BE", "BEC"), OURS)}, 401, 2000,
        check=response_routing(OURS, ("BE", "BEC"))),
    # Such an answer is ours whatever party the request's unchecked OCPI-to-* named, or if it named none (an open
    # routing request): from = us (04 §8.2), as on every answer the guard decides.
    Row("a 405 addressed to another party is still from us", "DELETE", f"{SESSIONS}/BE/BEC/101",
        routed("cpo", ("BE", "BEC"), ("DE", "XXX")), 405, 2000, check=response_routing(OURS, ("BE", "BEC"))),
    Row("a 401 addressed to another party is still from us", "GET", f"{SESSIONS}/BE/BEC/101",
        lambda p: {**auth("not-a-token"), **routing(("BE", "BEC"), ("DE", "XXX"))}, 401, 2000,
        check=response_routing(OURS, ("BE", "BEC"))),
    Row("Token A on a functional module, addressed to another party", "GET", f"{SESSIONS}/BE/BEC/101",
        routed("invited", ("BE", "BEC"), ("DE", "XXX")), 401, 2000, check=response_routing(OURS, ("BE", "BEC"))),
    Row("OPTIONS without OCPI-to-*", "OPTIONS", f"{SESSIONS}/BE/BEC/101", routed("cpo", ("BE", "BEC"), None), 405,
        2000, check=response_routing(OURS, ("BE", "BEC"))),
    Row("a 405 without OCPI-to-*", "DELETE", f"{SESSIONS}/BE/BEC/101", routed("cpo", ("BE", "BEC"), None), 405,
        2000, check=response_routing(OURS, ("BE", "BEC"))),
    Row("the case of our party as the request spelled it", "DELETE", f"{SESSIONS}/BE/BEC/101",
        routed("cpo", ("BE", "BEC"), ("nl", "opp")), 405, 2000, check=response_routing(("nl", "opp"), ("BE", "BEC"))),
    Row("broken routing headers are not echoed on a 405", "DELETE", f"{SESSIONS}/BE/BEC/101",
        routed("cpo", ("BEL", "BEC"), OURS), 405, 2000, check=response_routing(None, None)),
    Row("no routing headers on a 405 of a configuration module", "PATCH", "/ocpi/2.2.1/credentials",
        routed("cpo", ("BE", "BEC"), OURS), 405, 2000, check=response_routing(None, None)),
    Row("no routing headers on an unknown path", "GET", f"{SESSIONS}/BE/BEC",
        routed("cpo", ("BE", "BEC"), OURS), 404, 2000, check=response_routing(None, None)),
    # --- hubs (04 §9, our rule) ---
    Row("hub without routing headers", "PUT", f"{SESSIONS}/NL/XYZ/101", as_("hub"), 400, BAD,
        body=session("NL", "XYZ")),
    Row("hub relaying for the owner named in from-*", "PUT", f"{SESSIONS}/NL/XYZ/101",
        routed("hub", ("NL", "XYZ"), OURS), 200, OK, body=session("NL", "XYZ"),
        check=response_routing(OURS, ("NL", "XYZ"))),
    Row("hub relaying, URL owner differs from from-*", "PUT", f"{SESSIONS}/NL/ABC/101",
        routed("hub", ("NL", "XYZ"), OURS), 404, BAD, body=session("NL", "ABC")),
    Row("hub 'broadcast' of a Session (never broadcast)", "PUT", f"{SESSIONS}/NL/ABC/101",
        routed("hub", ("DE", "HUB"), OURS), 404, BAD, body=session("NL", "ABC")),
    Row("hub's own party owns no Session", "PUT", f"{SESSIONS}/DE/HUB/101",
        routed("hub", ("DE", "HUB"), OURS), 404, BAD, body=session("DE", "HUB")),
    Row("hub's own party owns no CDR", "POST", "/ocpi/emsp/2.2.1/cdrs",
        routed("hub", ("DE", "HUB"), OURS), 404, BAD, body=cdr("DE", "HUB")),
    Row("hub relaying a CDR of the from-* party", "POST", "/ocpi/emsp/2.2.1/cdrs",
        routed("hub", ("NL", "XYZ"), OURS), 201, OK, body=cdr("NL", "XYZ")),
    Row("hub relaying a CDR of another party", "POST", "/ocpi/emsp/2.2.1/cdrs",
        routed("hub", ("NL", "XYZ"), OURS), 404, BAD, body=cdr("NL", "ABC")),
    # The answer goes back the way the request came (04 §8.2): to the party the Hub relays for, to the Hub itself
    # when it spoke as itself; a to-* that is not us is the request's fault (2001), not a Hub's routing error (4xxx
    # are answered by a Hub, never by us, 05 §4).
    Row("hub relaying a GET: the answer is addressed to the from-* party", "GET", f"{SESSIONS}/NL/XYZ/101",
        routed("hub", ("NL", "XYZ"), OURS), 404, 2000, check=response_routing(OURS, ("NL", "XYZ"))),
    Row("hub speaking as itself, refused: the answer is addressed to the Hub", "PUT", f"{SESSIONS}/NL/ABC/101",
        routed("hub", ("DE", "HUB"), OURS), 404, BAD, body=session("NL", "ABC"),
        check=response_routing(OURS, ("DE", "HUB"))),
    # A request to us is never from us (04 §8.2): refused as headers, and answered to the Hub, not to ourselves.
    Row("hub relaying for our own party", "PUT", f"{SESSIONS}/NL/OPP/101", routed("hub", OURS, OURS), 400, BAD,
        body=session("NL", "OPP"), check=response_routing(OURS, ("DE", "HUB"))),
    Row("hub broadcast of a Location of our own party", "PUT", "/ocpi/emsp/2.2.1/locations/NL/OPP/LOC1",
        routed("hub", ("DE", "HUB"), OURS), 404, BAD, body=b"{}", check=response_routing(OURS, ("DE", "HUB"))),
    Row("hub relaying to another party than us: 2001, not 4001", "PUT", f"{SESSIONS}/NL/XYZ/101",
        routed("hub", ("NL", "XYZ"), ("NL", "ABC")), 400, BAD, body=session("NL", "XYZ"),
        check=response_routing(OURS, ("NL", "XYZ"))),
    # --- credentials misuse (07 §2-3: 405 MUST) ---
    Row("credentials POST when registered", "POST", "/ocpi/2.2.1/credentials", as_("cpo"), 405, 2000, body=b"{}"),
    Row("credentials PUT with Token A", "PUT", "/ocpi/2.2.1/credentials", as_("invited"), 405, 2000, body=b"{}"),
    Row("credentials DELETE with Token A", "DELETE", "/ocpi/2.2.1/credentials", as_("invited"), 405, 2000),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
async def test_status_codes_and_headers(app_env: AppEnv, row: Row) -> None:  # noqa: F811
    partners = cast(app_env)
    headers = {"Content-Type": "application/json", **row.headers(partners)} if row.body is not None \
        else row.headers(partners)
    async with AsyncTestClient(app=app_env.app) as client:
        response = await client.request(row.method, row.path, headers=headers, content=row.body)
    assert response.status_code == row.http, response.text
    assert response.headers["content-type"] == "application/json"
    assert UUID.match(response.headers["x-request-id"]) and UUID.match(response.headers["x-correlation-id"])
    if row.code is None:
        assert response.content == b""
    else:
        envelope = response.json()
        assert envelope["status_code"] == row.code, envelope
        assert envelope["timestamp"].endswith("Z")
        parse_datetime(envelope["timestamp"])
        assert "Traceback" not in response.text
    if response.status_code == 401:
        # RFC 9110 §15.5.2: a 401 MUST carry a challenge; OCPI's scheme is `Token` (04 §2).
        assert response.headers["www-authenticate"] == "Token", response.headers
    if row.check is not None:
        row.check(response)


async def test_message_ids_are_echoed_or_generated(app_env: AppEnv) -> None:  # noqa: F811
    token = app_env.provision("cpo", ("BE", "BEC", "CPO"))
    async with AsyncTestClient(app=app_env.app) as client:
        given = await client.get("/ocpi/versions", headers={**auth(token), "X-Request-ID": "req-1",
                                                            "X-Correlation-ID": "corr-1"})
        error = await client.get("/ocpi/versions", headers={"X-Request-ID": "req-2", "X-Correlation-ID": "corr-2"})
        absent = await client.get("/ocpi/versions", headers=auth(token))
        unusable = await client.get("/ocpi/versions", headers={**auth(token), "X-Request-ID": "x" * 300})
    assert (given.headers["x-request-id"], given.headers["x-correlation-id"]) == ("req-1", "corr-1")
    assert error.status_code == 401
    assert (error.headers["x-request-id"], error.headers["x-correlation-id"]) == ("req-2", "corr-2")
    assert UUID.match(absent.headers["x-request-id"]) and UUID.match(absent.headers["x-correlation-id"])
    assert absent.headers["x-request-id"] != absent.headers["x-correlation-id"]
    assert UUID.match(unusable.headers["x-request-id"])


@pytest.mark.parametrize("value", [b"req\tone", "r\u00e9q-\u20ac".encode(), b"\x80\x9f\xa0\xff", b"x" * 255],
                         ids=["tab", "utf-8", "obs-text", "255 bytes"])
async def test_message_ids_are_echoed_as_sent(app_env: AppEnv, value: bytes) -> None:  # noqa: F811
    """Any value a header may hold (RFC 9110 §5.5: visible ASCII, space, tab, bytes beyond ASCII) is echoed byte for
    byte (04 §11: the same value); a UTF-8 `€` (E2 82 AC) or a tab was replaced by a generated id. Straight through
    ASGI: httpx, so the TestClient, refuses response header values beyond ASCII."""
    token = app_env.provision("cpo", ("BE", "BEC", "CPO"))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/ocpi/versions", "raw_path": b"/ocpi/versions", "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 1), "server": ("testserver", 80),
             "headers": [(b"authorization", auth(token)["Authorization"].encode()), (b"x-request-id", value),
                         (b"x-correlation-id", value)]}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    app = app_env.app
    async with AsyncTestClient(app=app):
        await app(scope, receive, send)
    start = next(message for message in sent if message["type"] == "http.response.start")
    assert start["status"] == 200
    echoed = dict(start["headers"])
    assert (echoed[b"x-request-id"], echoed[b"x-correlation-id"]) == (value, value)


def test_every_ocpi_status_code_has_a_typed_exception() -> None:
    errors = [status for status in OcpiStatus if not status.is_success]
    assert sorted(STATUS_EXCEPTIONS) == sorted(errors)
    for status, exception in STATUS_EXCEPTIONS.items():
        assert exception("x").ocpi_status == status


# HTTP status per typed exception: 05 §2 and our reading of the rest (see receivers/transport.py OcpiError).
EXPECTED_HTTP = {2000: 400, 2001: 200, 2002: 200, 2003: 404, 2004: 404, 3000: 500, 3001: 200, 3002: 200,
                 3003: 200, 4000: 200, 4001: 200, 4002: 200, 4003: 200}


async def test_typed_exceptions_render_as_envelopes_with_their_http_status(app_env: AppEnv) -> None:  # noqa: F811
    token = app_env.provision("cpo", ("BE", "BEC", "CPO"))

    @get("/raise/{code:int}")
    async def raise_code(code: FromPath[int]) -> None:
        raise STATUS_EXCEPTIONS[OcpiStatus(code)](f"status {code}", data={"debug": code})

    @get("/crash")
    async def crash() -> None:
        raise RuntimeError("secret internals")

    @get("/framework-500")
    async def framework_500() -> None:
        raise InternalServerException("framework detail")

    app = app_env.app
    app.register(Router(path="/test", route_handlers=[raise_code, crash, framework_500]))
    async with AsyncTestClient(app=app) as client:
        for code, http in EXPECTED_HTTP.items():
            response = await client.get(f"/test/raise/{code}", headers=auth(token))
            assert (response.status_code, response.json()["status_code"]) == (http, code)
            assert response.json()["status_message"] == f"status {code}"
            assert response.json()["data"] == {"debug": code}
        for path in ("/test/crash", "/test/framework-500"):
            response = await client.get(path, headers=auth(token))
            assert response.status_code == 500 and response.json()["status_code"] == 3000
            assert response.json()["status_message"] == "internal server error"
            assert "secret internals" not in response.text and "framework detail" not in response.text
            assert response.headers["content-type"] == "application/json"


def test_timestamps_are_utc_with_optional_z_and_offsets_only_under_the_profile() -> None:
    assert parse_timestamp("2015-06-29T20:39:09Z") == parse_timestamp("2015-06-29T20:39:09")
    with pytest.raises(InvalidParameters, match="numeric offsets"):
        parse_timestamp("2015-06-29T20:39:09+00:00")
    with pytest.raises(InvalidParameters, match="numeric offsets"):
        parse_timestamp("2015-06-29T22:39:09+02:00", CompatProfile.from_names("RAW_TOKEN"))
    relaxed = CompatProfile.from_names("DATETIME_OFFSET")
    assert parse_timestamp("2015-06-29T22:39:09+02:00", relaxed) == parse_timestamp("2015-06-29T20:39:09Z")
    assert parse_timestamp("2015-06-29T20:39:09+00:00", relaxed) == parse_timestamp("2015-06-29T20:39:09Z")
    with pytest.raises(InvalidParameters):
        parse_timestamp("29/06/2015", relaxed)


def test_ocpi_errors_keep_message_data_and_headers() -> None:
    error = OcpiError("m", ocpi_status=2002, http_status=200, data={"a": 1}, headers={"X": "y"})
    assert (error.ocpi_status, error.http_status, error.data, error.headers) == (2002, 200, {"a": 1}, {"X": "y"})


@pytest.mark.parametrize("host", ["ocpi.example.com:99999", "ocpi.example.com:abc", "ocpi.example.com:-1"])
async def test_a_host_header_with_an_impossible_port_still_gets_envelopes(app_env: AppEnv, host: str) -> None:  # noqa: F811
    # A Host whose port is no port (granian passes it as sent) made `request.url` raise ValueError: every answer
    # that names the path (404, 405, a framework 400, a crash) and the rejection record of a refused push raised
    # inside the exception handler, so the server answered a bare 500 without an envelope.
    token = app_env.provision("cpo", ("BE", "BEC", "CPO"))

    @get("/crash")
    async def crash() -> None:
        raise RuntimeError("secret internals")

    rejected = FakeSink()
    app = create_app(app_env.settings, sink=app_env.sink, registry_factory=lambda: app_env.registry,
                     rejection_sink=rejected)
    app.register(Router(path="/test", route_handlers=[crash]))
    headers = {**auth(token), "Host": host, "Content-Type": "application/json"}
    async with AsyncTestClient(app=app) as client:
        answers = [
            (await client.get("/ocpi/emsp/2.2.1/nothing", headers=headers), 404, 2000),
            (await client.delete(f"{SESSIONS}/BE/BEC/101", headers=headers), 405, 2000),
            (await client.put(f"{SESSIONS}/BE/BEC/101", headers={**headers, "Content-Length": "x"},
                              content=session()), 400, BAD),
            (await client.put(f"{SESSIONS}/BE/BEC/101", headers=headers, content=b"{}"), 200, BAD),
            (await client.get("/test/crash", headers=headers), 500, 3000),
            (await client.put(f"{SESSIONS}/BE/BEC/101", headers=headers, content=session()), 200, OK),
        ]
        for _ in range(100):
            if len(rejected.records) == 2:
                break
            await asyncio.sleep(0.01)
    for response, http, code in answers:
        assert (response.status_code, response.json()["status_code"]) == (http, code), response.text
        assert "Traceback" not in response.text
    # Both refused pushes (the framework's 400 and the 2001) are recorded, with their path.
    assert [json.loads(value)["path"] for _, _, value in rejected.records] == [f"{SESSIONS}/BE/BEC/101"] * 2


async def asgi_request(app: Any, method: str, path: str, headers: list[tuple[str, str]],
                       events: list[dict[str, Any]]) -> tuple[int, bytes]:
    """One request straight through the ASGI app, header lines as given (granian passes repeated lines apart;
    httpx joins them): (HTTP status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 1), "server": ("testserver", 80),
             "headers": [(name.lower().encode(), value.encode()) for name, value in headers]}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return events.pop(0) if events else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(message for message in sent if message["type"] == "http.response.start")
    return start["status"], b"".join(message.get("body", b"") for message in sent[1:])


async def test_a_client_that_disconnects_mid_body_is_not_our_internal_error(app_env: AppEnv,  # noqa: F811
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    # A partner that gives up mid-body (its own timeout, a dropped connection): Litestar raises a 500 for it, which
    # was logged as an error and recorded in the partner's refused pushes as our 3000 "internal server error".
    token = app_env.provision("cpo", ("BE", "BEC", "CPO"))
    rejected = FakeSink()
    app = create_app(app_env.settings, sink=app_env.sink, registry_factory=lambda: app_env.registry,
                     rejection_sink=rejected)
    body = session()
    headers = [("Authorization", auth(token)["Authorization"]), ("Content-Type", "application/json"),
               ("Content-Length", str(len(body)))]
    events: list[dict[str, Any]] = [{"type": "http.request", "body": body[:50], "more_body": True},
                                    {"type": "http.disconnect"}]
    async with AsyncTestClient(app=app):
        status, _ = await asgi_request(app, "PUT", f"{SESSIONS}/BE/BEC/101", headers, events)
        for _ in range(100):
            if rejected.records:
                break
            await asyncio.sleep(0.01)
    assert status == 400
    assert app_env.sink.records == []  # nothing of a body that never came whole is published
    [(_, _, value)] = rejected.records
    record = json.loads(value)
    assert (record["ocpi_status"], record["http_status"]) == (2000, 400)
    assert "disconnected" in record["reason"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


TO_US = [("OCPI-from-country-code", "BE"), ("OCPI-from-party-id", "BEC"), ("OCPI-to-country-code", "NL")]


@pytest.mark.parametrize(("extra", "http", "code"), [
    # Addressed to us and to someone else at once: was accepted or refused by which of the two came first.
    ([("OCPI-to-party-id", "OPP"), ("OCPI-to-party-id", "XXX")], 400, BAD),
    ([("OCPI-to-party-id", "XXX"), ("OCPI-to-party-id", "OPP")], 400, BAD),
    ([("OCPI-to-party-id", "OPP"), ("OCPI-from-party-id", "EXO")], 400, BAD),
    # The same value twice (a proxy that adds what is there) says one thing: accepted.
    ([("OCPI-to-party-id", "OPP"), ("OCPI-to-party-id", "opp")], 200, OK),
])
async def test_a_routing_header_given_twice_must_say_one_thing(app_env: AppEnv, extra: list[tuple[str, str]],  # noqa: F811
                                                               http: int, code: int) -> None:
    token = app_env.provision("cpo", ("BE", "BEC", "CPO"))
    headers = [*auth(token).items(), ("Content-Type", "application/json"), *TO_US, *extra]
    app = app_env.app
    async with AsyncTestClient(app=app):
        status, body = await asgi_request(app, "PUT", f"{SESSIONS}/BE/BEC/101", headers,
                                          [{"type": "http.request", "body": session()}])
    envelope = json.loads(body)
    assert (status, envelope["status_code"]) == (http, code), body
    if http == 400:
        assert "more than once" in envelope["status_message"]
        assert app_env.sink.records == []


@pytest.mark.parametrize("lines", [[b"XSS", b"X\xdf"], [b"X\xdf", b"XSS"]], ids=["valid first", "valid second"])
def test_a_routing_header_given_twice_is_compared_as_a_cistring(lines: list[bytes]) -> None:
    """Repeated lines say one thing when equal as CiStrings (ASCII case only). They were compared with str.upper(),
    which folds the byte 0xDF (`ß` as latin-1) to `SS`: `XSS` then `Xß` was taken as `XSS`, the other order refused
    (not a party id), the answer depending on the order of the lines."""
    scope = {"headers": [(b"ocpi-from-party-id", line) for line in lines] + [(b"ocpi-from-country-code", b"BE")]}
    with pytest.raises(InvalidRoutingHeaders):
        routing_headers(scope)


@pytest.mark.parametrize("order", ["valid first", "valid second"])
async def test_two_different_authorization_headers_are_refused(app_env: AppEnv, order: str) -> None:  # noqa: F811
    # Authorization is not a list header (RFC 9110 §5.3): two different lines are not one credential. The first was
    # taken, so a valid token followed by another credential was accepted, the other order refused.
    token = app_env.provision("cpo", ("BE", "BEC", "CPO"))
    lines = [("Authorization", auth(token)["Authorization"]), ("Authorization", "Token b3RoZXI=")]
    if order == "valid second":
        lines.reverse()
    app = app_env.app
    async with AsyncTestClient(app=app):
        status, body = await asgi_request(app, "PUT", f"{SESSIONS}/BE/BEC/101",
                                          [*lines, ("Content-Type", "application/json")],
                                          [{"type": "http.request", "body": session()}])
        same_twice, _ = await asgi_request(app, "GET", "/ocpi/versions", [lines[0], lines[0]], [])
    assert (status, json.loads(body)["status_code"]) == (401, 2000), body
    assert "Authorization" in json.loads(body)["status_message"]
    assert app_env.sink.records == []
    assert same_twice == (200 if order == "valid first" else 401)


@pytest.mark.parametrize(("path", "status"), [("/ocpi/versions", 200), ("/ocpi/2.2.1", 200),
                                              ("/ocpi/2.2.1/credentials", 200), (f"{SESSIONS}/BE/BEC/101", 404),
                                              ("/ocpi/emsp/2.2.1/cdrs", 405), ("/ocpi/nothing", 404)])
async def test_head_is_get_without_content(app_env: AppEnv, path: str, status: int) -> None:  # noqa: F811
    # RFC 9110 §9.1: a general-purpose server MUST support HEAD wherever it supports GET, and §9.3.2: the same
    # status and header fields as GET, no content. HEAD was 405 everywhere (with `Allow: GET`), and Litestar wrote
    # the 405's envelope as content after it. Straight through ASGI: httpx drops the content of a HEAD answer.
    token = app_env.provision("cpo", ("BE", "BEC", "CPO"))
    headers = [("Authorization", auth(token)["Authorization"]), ("X-Request-ID", "r-1"), ("X-Correlation-ID", "c-1")]
    app = app_env.app
    async with AsyncTestClient(app=app):
        answers = {}
        for method in ("GET", "HEAD"):
            sent: list[dict[str, Any]] = []
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                     "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                     "client": ("127.0.0.1", 1), "server": ("testserver", 80),
                     "headers": [(name.lower().encode(), value.encode()) for name, value in headers]}

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b""}

            async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
                sent.append(message)

            await app(scope, receive, send)
            start = sent[0]
            answers[method] = (start["status"], dict(start["headers"]),
                               b"".join(message.get("body", b"") for message in sent[1:]))
    (get_status, get_headers, get_body), (head_status, head_headers, head_body) = answers["GET"], answers["HEAD"]
    assert get_status == head_status == status
    assert json.loads(get_body)["status_code"] and head_body == b""
    # The same header fields; Content-Length is GET's (its timestamp may differ by a digit or two).
    assert {k: v for k, v in head_headers.items() if k != b"content-length"} == \
        {k: v for k, v in get_headers.items() if k != b"content-length"}
    assert abs(int(head_headers[b"content-length"]) - len(get_body)) <= 4
    if status == 405:
        assert head_headers[b"allow"] == b"POST"
