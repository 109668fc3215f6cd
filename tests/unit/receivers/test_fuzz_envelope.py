"""Property test over every route: random methods, paths, headers, tokens and bodies.

Whatever arrives, the answer is never an HTTP 5xx (nothing in this setup is one the spec assigns: the sink
always acknowledges), always JSON, always a valid OCPI envelope (`status_code` a 4-digit int, `timestamp` an
OCPI DateTime written with `Z`), and always echoes message ids. `database=None`: no example database is
written into the working tree.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import TestClient

from infra.kafka.embedded import free_port
from ocpi.datetime import parse_datetime
from tests.conftest import EXAMPLES
from tests.unit.receivers.app_support import AppEnv, app_env, make_env  # noqa: F401

pytestmark = pytest.mark.clickhouse

CLOSED = f"http://127.0.0.1:{free_port()}/ocpi/versions"  # nothing listens: callbacks fail fast (3001)
_PARAM = re.compile(r"\{[^}]+\}")


class World:
    """The app under test, its route templates and the tokens that mean something to it."""

    def __init__(self, env: AppEnv, app: Litestar) -> None:
        self.env = env
        self.tokens: dict[str, str] = {}
        self.provision()
        # Each route with the methods it serves: most requests use one of those, so they get past routing.
        self.routes = sorted((route.path, tuple(sorted(set(getattr(route, "methods", ())) - {"OPTIONS"})))
                             for route in app.routes)

    def provision(self) -> None:
        """(Re)issue every partner's token: a fuzzed credentials DELETE may have unregistered one."""
        env = self.env
        self.tokens = {
            "cpo": env.provision("cpo", ("BE", "BEC", "CPO")),
            "platform": env.provision("platform", ("NL", "EXO", "CPO"), ("NL", "PFC", "CPO")),
            "hub": env.provision("hub", ("DE", "HUB", "HUB")),
            "raw": env.provision("raw", ("FR", "RAW", "CPO"), compat=("RAW_TOKEN",)),
            "invited": env.registry.invite("invited", "Invited")[1] if "invited" not in self.tokens
            else self.tokens["invited"],
        }


@pytest.fixture
def world(app_env: AppEnv) -> Iterator[tuple[World, TestClient[Litestar]]]:  # noqa: F811
    app = app_env.app
    with TestClient(app=app, raise_server_exceptions=False) as client:
        yield World(app_env, app), client


SEGMENT = st.one_of(st.sampled_from(["BE", "BEC", "NL", "EXO", "PFC", "XYZ", "101", "be", "bec"]),
                    st.text(min_size=0, max_size=12))
CODE_LIKE = st.one_of(st.sampled_from(["BE", "NL", "DE", "be", "B1", "", "NLD"]), st.text(max_size=5))
PARTY_LIKE = st.one_of(st.sampled_from(["BEC", "EXO", "PFC", "HUB", "XYZ", "OPP", "bec", "B-C"]), st.text(max_size=5))
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def session_body(country: str, party: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((EXAMPLES / "session_example_2_short_finished.json").read_text())
    body.update(country_code=country, party_id=party)
    return body


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=4),
                    max_leaves=12)


@st.composite
def bodies(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.sampled_from(["none", "bytes", "json", "session", "credentials", "broken-session"]))
    if kind == "none":
        return None
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    if kind == "credentials":
        example = draw(st.sampled_from(["credentials_example.json", "credentials_example4.json"]))
        body = json.loads((EXAMPLES / example).read_text())
        body.update(url=CLOSED, token=draw(st.text(alphabet="abc123-_", min_size=1, max_size=70)))
        return json.dumps(body).encode()
    body = session_body(draw(SEGMENT), draw(SEGMENT))
    if kind == "broken-session":
        key = draw(st.sampled_from(sorted(body)))
        body[key] = draw(JSON)
    return json.dumps(body).encode()


@st.composite
def requests(draw: st.DrawFn, world: World) -> tuple[str, str, dict[str, str], bytes | None]:
    any_method = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "FOO"])
    if draw(st.integers(0, 9)) < 8:
        template, methods = draw(st.sampled_from(world.routes))
        path = _PARAM.sub(lambda _m: quote(draw(SEGMENT), safe="") or "x", template)
        path += draw(st.sampled_from(["", "", "", "", "/", "/extra", "?offset=-1&limit=abc"]))
        method = draw(st.sampled_from(methods)) if draw(st.integers(0, 9)) < 8 else draw(any_method)
    else:
        segments = [quote(draw(SEGMENT), safe="") for _ in range(draw(st.integers(0, 6)))]
        if segments and not segments[0]:
            segments[0] = "x"  # "//…" is not a path the test client can send (httpx reads it as an authority)
        path = "/" + "/".join(segments)
        method = draw(any_method)
    headers: dict[str, str] = {}
    auth = draw(st.sampled_from(["valid", "valid", "valid", "none", "raw", "random", "garbage"]))
    if auth == "valid":
        token = world.tokens[draw(st.sampled_from(["cpo", "cpo", *sorted(world.tokens)]))]
        headers["Authorization"] = "Token " + base64.b64encode(token.encode()).decode()
    elif auth == "raw":
        headers["Authorization"] = "Token " + world.tokens[draw(st.sampled_from(sorted(world.tokens)))]
    elif auth == "random":
        headers["Authorization"] = "Token " + base64.b64encode(draw(st.binary(max_size=40))).decode()
    elif auth == "garbage":
        headers["Authorization"] = draw(HEADER_TEXT)
    for name, values in (("OCPI-from-country-code", CODE_LIKE), ("OCPI-from-party-id", PARTY_LIKE),
                         ("OCPI-to-country-code", CODE_LIKE), ("OCPI-to-party-id", PARTY_LIKE)):
        if draw(st.integers(0, 3)) == 0:
            value = draw(values)
            if value.isprintable() and value.isascii() and value == value.strip():
                headers[name] = value
    for name in ("X-Request-ID", "X-Correlation-ID", "Content-Type"):
        if draw(st.booleans()):
            headers[name] = draw(st.one_of(HEADER_TEXT.map(str.strip), st.just("application/json")))
    return method, path, headers, draw(bodies())


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_answer_is_an_envelope(world: tuple[World, TestClient[Litestar]], data: st.DataObject) -> None:
    state, client = world
    method, path, headers, body = data.draw(requests(state))
    response = client.request(method, path, headers=headers, content=body)
    if method == "DELETE" and response.status_code == 200:
        state.provision()
    assert response.status_code < 500, (method, path, headers, response.text)
    assert response.headers["content-type"] == "application/json", response.headers
    assert response.headers.get("x-request-id") and response.headers.get("x-correlation-id")
    if method == "HEAD":
        assert response.content == b""
        return
    envelope = response.json()
    assert isinstance(envelope, dict), envelope
    assert type(envelope["status_code"]) is int and 1000 <= envelope["status_code"] <= 4999, envelope
    assert isinstance(envelope["timestamp"], str) and envelope["timestamp"].endswith("Z")
    parse_datetime(envelope["timestamp"])
    assert set(envelope) <= {"data", "status_code", "status_message", "timestamp"}
    assert "status_message" not in envelope or isinstance(envelope["status_message"], str)
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        assert envelope["status_code"] >= 2000, envelope
