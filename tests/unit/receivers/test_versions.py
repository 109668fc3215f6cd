"""Versions module: GET versions and version details, in the shape of the spec's examples, on our base URL."""

from __future__ import annotations

import json
from collections.abc import Callable

import msgspec
import pytest
from litestar import Request, Response, Router, put
from litestar.testing import AsyncTestClient

from ocpi.decode import decode, decode_list
from ocpi.model import Version, VersionDetails
from receivers.transport import ocpi_response
from tests.conftest import EXAMPLES
from tests.unit.receivers.app_support import AppEnv, app_env, auth, make_env  # noqa: F401

pytestmark = pytest.mark.clickhouse

PUBLIC = "https://ocpi.example.com"


def keys(example: str) -> set[str]:
    data = json.loads((EXAMPLES / example).read_text())
    return set(data[0] if isinstance(data, list) else data)


async def test_versions_and_details_on_our_public_url(make_env: Callable[..., AppEnv]) -> None:  # noqa: F811
    env = make_env(OCPI_PUBLIC_URL=PUBLIC)
    _, token_a = env.registry.invite("cpo", "CPO")
    async with AsyncTestClient(app=env.app) as client:
        versions = await client.get("/ocpi/versions", headers=auth(token_a))
        details = await client.get("/ocpi/2.2.1", headers=auth(token_a))
        anonymous = await client.get("/ocpi/2.2.1")
    assert anonymous.status_code == 401
    assert versions.status_code == details.status_code == 200
    data = versions.json()["data"]
    assert data == [{"version": "2.2.1", "url": f"{PUBLIC}/ocpi/2.2.1"}]
    assert [set(v) for v in data] == [keys("versions_info_example.json")]
    assert [item.value for item in decode_list(json.dumps(data), Version)] == [  # type: ignore[union-attr]
        Version(version="2.2.1", url=f"{PUBLIC}/ocpi/2.2.1")]

    body = details.json()["data"]
    assert set(body) == keys("version_details_example.json")
    assert all(set(e) == {"identifier", "role", "url"} for e in body["endpoints"])
    parsed = decode(json.dumps(body), VersionDetails).value
    assert parsed.version == "2.2.1"
    listed = {(e.identifier, e.role.value, e.url) for e in parsed.endpoints}
    assert {("credentials", "SENDER", f"{PUBLIC}/ocpi/2.2.1/credentials"),
            ("sessions", "RECEIVER", f"{PUBLIC}/ocpi/emsp/2.2.1/sessions"),
            ("cdrs", "RECEIVER", f"{PUBLIC}/ocpi/emsp/2.2.1/cdrs")} <= listed
    assert len([e for e in parsed.endpoints if e.identifier == "credentials"]) == 1


async def test_details_list_exactly_the_module_routers_we_serve(app_env: AppEnv) -> None:  # noqa: F811
    token = app_env.provision("cpo", ("BE", "BEC", "CPO"))

    @put("/{country_code:str}/{party_id:str}/{tariff_id:str}")
    async def put_tariff(request: Request) -> Response[bytes]:  # type: ignore[type-arg]
        return ocpi_response()

    app = app_env.app
    app.register(Router(path="/ocpi/emsp/2.2.1/tariffs", route_handlers=[put_tariff],
                        opt={"ocpi_module": "tariffs"}))
    app.register(Router(path="/internal", route_handlers=[], opt={"ocpi_module": "not-a-module"}))
    async with AsyncTestClient(app=app) as client:
        details = msgspec.json.decode((await client.get("/ocpi/2.2.1", headers=auth(token))).content)["data"]
        base = app_env.settings.http.base_url
        assert {"identifier": "tariffs", "role": "RECEIVER", "url": f"{base}/ocpi/emsp/2.2.1/tariffs"} in \
            details["endpoints"]
        # Every listed endpoint is served: a request below its URL reaches a handler (not a 404).
        for endpoint in details["endpoints"]:
            path = endpoint["url"].removeprefix(base)
            served = [route.path for route in app.routes if route.path.startswith(path)]
            assert served, endpoint
        paths = {e["url"].removeprefix(base) for e in details["endpoints"]}
        module_routes = {route.path for route in app.routes
                         if any(h.opt.get("ocpi_module") in {"sessions", "cdrs", "credentials", "tariffs",
                                                             "locations"} for h in route.route_handlers)}
        assert all(any(r.startswith(p) for p in paths) for r in module_routes), (module_routes, paths)
