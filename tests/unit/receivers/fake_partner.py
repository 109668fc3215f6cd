"""A small fake CPO platform (aiohttp, 127.0.0.1, free port) that speaks OCPI 2.2.1 versions and credentials.

It runs in its own thread with its own event loop, so it answers while the test's loop waits (Litestar's
AsyncTestClient runs our app behind a blocking portal, and the integration test's loop serves the chDB
shim). Its Sender-side methods are coroutines the test awaits; they run on the partner's loop.
It is deliberately independent of our code (its own token handling, plain
dicts, the spec's example payloads), so a handshake between it and our server tests both sides for real:
- as the Receiver: it issues a Token A, answers versions/details with it, and handles POST/PUT/DELETE on its
  credentials endpoint, calling the Sender back before answering;
- as the Sender: `register_with()`, `update()` and `unregister()` drive the handshake toward us;
- `call()` makes an authenticated request to us with the token it currently holds for us.
Its versions answer is the spec's `versions_info_example.json` and its details the spec's
`version_details_example.json` (URLs moved to this server; the details keep the example's `"version": "2.2"`),
with the Sessions and CDRs sender endpoints added so that a module is in common with our receivers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from aiohttp import web

from tests.conftest import EXAMPLES

COUNTRY, PARTY = "NL", "TNM"
T = TypeVar("T")


def header(token: str) -> dict[str, str]:
    return {"Authorization": "Token " + base64.b64encode(token.encode()).decode()}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _envelope(status_code: int = 1000, data: Any = None, message: str | None = None, http: int = 200,
              ) -> web.Response:
    body: dict[str, Any] = {"status_code": status_code, "timestamp": _now()}
    if data is not None:
        body["data"] = data
    if message:
        body["status_message"] = message
    return web.json_response(body, status=http)


class FakePartner:
    def __init__(self, *, versions: list[dict[str, str]] | None = None,
                 endpoints: list[dict[str, str]] | None = None, details_status: int = 200,
                 redirect_versions_to: str | None = None) -> None:
        self.redirect_versions_to = redirect_versions_to
        self._versions_override = versions
        self._endpoints_override = endpoints
        self.details_status = details_status
        self.tokens: dict[str, str] = {}  # tokens it accepts -> kind (A, C)
        self.dead_tokens: set[str] = set()
        self.token_for_peer: str | None = None  # what it sends when calling us
        self.peer_versions_url: str | None = None
        self.peer_credentials: dict[str, Any] | None = None
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, token) it received
        self.role = "CPO"  # the role it reports in its credentials
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> FakePartner:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-partner", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = None

    async def _in_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the partner's loop, without blocking the caller's."""
        assert self._loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/ocpi/versions", self._versions)
        app.router.add_get("/ocpi/2.2.1", self._details)
        app.router.add_route("*", "/ocpi/2.2.1/credentials", self._credentials)
        app.router.add_get("/ocpi/cpo/2.2.1/{module}", self._module)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def versions_url(self) -> str:
        return f"{self.base}/ocpi/versions"

    def issue_token_a(self) -> str:
        token = secrets.token_hex(16)
        self.tokens[token] = "A"
        return token

    # --- what it serves -----------------------------------------------------------------------------------

    def versions_data(self) -> list[dict[str, str]]:
        if self._versions_override is not None:
            return self._versions_override
        versions = json.loads((EXAMPLES / "versions_info_example.json").read_text())
        for v in versions:
            v["url"] = v["url"].replace("https://www.server.com", self.base)
        return versions  # type: ignore[no-any-return]

    def details_data(self) -> dict[str, Any]:
        details = json.loads((EXAMPLES / "version_details_example.json").read_text())
        for endpoint in details["endpoints"]:
            url = endpoint["url"].replace("https://example.com", self.base)
            endpoint["url"] = url.replace("/2.2/", "/2.2.1/")
        details["endpoints"] += [
            {"identifier": "sessions", "role": "SENDER", "url": f"{self.base}/ocpi/cpo/2.2.1/sessions"},
            {"identifier": "cdrs", "role": "SENDER", "url": f"{self.base}/ocpi/cpo/2.2.1/cdrs"},
        ]
        if self._endpoints_override is not None:
            details["endpoints"] = self._endpoints_override
        return details  # type: ignore[no-any-return]

    def credentials_data(self, token: str) -> dict[str, Any]:
        return {"token": token, "url": self.versions_url,
                "roles": [{"role": self.role, "party_id": PARTY, "country_code": COUNTRY,
                           "business_details": {"name": "The Fake CPO"}}]}

    def _token(self, request: web.Request) -> str | None:
        value = request.headers.get("Authorization", "")
        if not value.startswith("Token "):
            return None
        try:
            return base64.b64decode(value[6:], validate=True).decode()
        except ValueError:
            return None

    def _auth(self, request: web.Request, *, allow_a: bool) -> str | web.Response:
        token = self._token(request)
        self.requests.append((request.method, request.path, token))
        kind = self.tokens.get(token or "")
        if kind is None or (kind == "A" and not allow_a):
            return _envelope(2000, message="unknown token", http=401)
        assert token is not None
        return token

    async def _versions(self, request: web.Request) -> web.Response:
        token = self._auth(request, allow_a=True)
        if isinstance(token, web.Response):
            return token
        if self.redirect_versions_to:
            raise web.HTTPFound(self.redirect_versions_to)
        return _envelope(data=self.versions_data())

    async def _details(self, request: web.Request) -> web.Response:
        token = self._auth(request, allow_a=True)
        if isinstance(token, web.Response):
            return token
        if self.details_status != 200:
            return web.Response(status=self.details_status, text="<html>broken</html>")
        return _envelope(data=self.details_data())

    async def _module(self, request: web.Request) -> web.Response:
        token = self._auth(request, allow_a=False)
        return token if isinstance(token, web.Response) else _envelope(data=[])

    async def _credentials(self, request: web.Request) -> web.Response:
        token = self._auth(request, allow_a=True)
        if isinstance(token, web.Response):
            return token
        kind = self.tokens[token]
        if request.method == "GET":
            return _envelope(data=self.credentials_data(token))
        if request.method == "POST":
            if kind != "A":
                return _envelope(2000, message="already registered", http=405)
            return await self._accept(request, old=token)
        if kind == "A":
            return _envelope(2000, message="not registered", http=405)
        if request.method == "PUT":
            return await self._accept(request, old=token)
        if request.method == "DELETE":
            self._kill_all()
            self.token_for_peer = None
            return _envelope()
        return _envelope(2000, message="method not allowed", http=405)

    async def _accept(self, request: web.Request, *, old: str) -> web.Response:
        """POST/PUT: call the Sender back with the token it sent, then answer with a new token for it."""
        body = await request.json()
        try:
            async with httpx.AsyncClient(timeout=10, headers=header(body["token"])) as http:
                versions = (await http.get(body["url"])).json()["data"]
                url = next(v["url"] for v in versions if v["version"] == "2.2.1")
                details = (await http.get(url)).json()["data"]
        except Exception as exc:
            return _envelope(3001, message=f"unable to use your API: {exc!r}")
        self.peer_versions_url = body["url"]
        self.peer_credentials = body
        self.peer_endpoints = details["endpoints"]
        self.token_for_peer = body["token"]
        self._kill_all()
        new = secrets.token_hex(16)
        self.tokens[new] = "C"
        return _envelope(data=self.credentials_data(new))

    def _kill_all(self) -> None:
        self.dead_tokens.update(self.tokens)
        self.tokens.clear()

    # --- acting as the Sender toward us --------------------------------------------------------------------

    async def register_with(self, versions_url: str, token_a: str) -> dict[str, Any]:
        """07 §2 steps 1-6 toward `versions_url`; returns the POST's response envelope."""
        return await self._in_loop(self._register_with(versions_url, token_a))

    async def _register_with(self, versions_url: str, token_a: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=20, headers=header(token_a)) as http:
            versions = (await http.get(versions_url)).json()
            url = next(v["url"] for v in versions["data"] if v["version"] == "2.2.1")
            details = (await http.get(url)).json()
            credentials_url = next(e["url"] for e in details["data"]["endpoints"]
                                   if e["identifier"] == "credentials")
            token_b = secrets.token_hex(16)
            self.tokens[token_b] = "C"  # the token we will accept from the peer
            answer = (await http.post(credentials_url, json=self.credentials_data(token_b))).json()
        if answer["status_code"] == 1000:
            self.token_for_peer = answer["data"]["token"]
            self.peer_versions_url = answer["data"]["url"]
            self.peer_credentials_url = credentials_url
        else:
            del self.tokens[token_b]
        return answer  # type: ignore[no-any-return]

    async def update(self) -> dict[str, Any]:
        """A credentials PUT toward the peer with a fresh token for it; switches to the returned token."""
        return await self._in_loop(self._update())

    async def _update(self) -> dict[str, Any]:
        assert self.token_for_peer is not None
        new_b = secrets.token_hex(16)
        self.tokens[new_b] = "C"
        async with httpx.AsyncClient(timeout=20, headers=header(self.token_for_peer)) as http:
            answer = (await http.put(self.peer_credentials_url, json=self.credentials_data(new_b))).json()
        if answer["status_code"] == 1000:
            for token in [t for t in self.tokens if t != new_b]:
                self.dead_tokens.add(token)
                del self.tokens[token]
            self.token_for_peer = answer["data"]["token"]
        return answer  # type: ignore[no-any-return]

    async def unregister(self) -> httpx.Response:
        return await self._in_loop(self._unregister())

    async def _unregister(self) -> httpx.Response:
        assert self.token_for_peer is not None
        async with httpx.AsyncClient(timeout=20, headers=header(self.token_for_peer)) as http:
            return await http.delete(self.peer_credentials_url)

    async def call(self, method: str, url: str, *, token: str | None = None, json_body: Any = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        """An authenticated request to the peer with the token it holds (or `token`)."""
        return await self._in_loop(self._call(method, url, token=token, json_body=json_body, headers=headers))

    async def _call(self, method: str, url: str, *, token: str | None, json_body: Any,
                    headers: dict[str, str] | None) -> httpx.Response:
        token = token if token is not None else self.token_for_peer
        assert token is not None
        request_headers = {**header(token), "X-Request-ID": str(uuid.uuid4()), **(headers or {})}
        async with httpx.AsyncClient(timeout=20) as http:
            return await http.request(method, url, headers=request_headers, json=json_body)
