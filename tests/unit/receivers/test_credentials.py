"""Credentials module, receiving side: our app in-process, the partner a real HTTP server on 127.0.0.1.

The registration POST makes our app call the fake partner back over real HTTP (with the token the partner
sent), so 3001/3002/3003 come from real failures: a closed port, a broken details page, no common version,
missing endpoints, a redirect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from infra.kafka.embedded import free_port
from ocpi.compat import CompatProfile
from ocpi.decode import decode
from ocpi.model import Credentials
from receivers import credentials as credentials_module
from receivers.outbound import OcpiClient, PartnerApiError
from receivers.registry import PartnerStatus, TokenKind, TokenState, hash_token
from receivers.versions import served_endpoints
from tests.conftest import EXAMPLES
from tests.unit.receivers import fake_partner as fake_partner_module
from tests.unit.receivers.app_support import AppEnv, app_env, auth, concurrent_client, make_env  # noqa: F401
from tests.unit.receivers.fake_partner import FakePartner

pytestmark = pytest.mark.clickhouse

CREDENTIALS = "/ocpi/2.2.1/credentials"


@pytest.fixture
def partner() -> Iterator[FakePartner]:
    fake = FakePartner().start()
    yield fake
    fake.stop()


def registration(fake: FakePartner, example: str = "credentials_example.json", *, token: str | None = None,
                 url: str | None = None) -> dict[str, Any]:
    """The spec's example Credentials with the partner's real versions URL and a token it accepts."""
    body = json.loads((EXAMPLES / example).read_text())
    body["url"] = url or fake.versions_url
    if token is None:
        token = f"token-b-{len(fake.tokens)}"
        fake.tokens[token] = "C"
    body["token"] = token
    return body  # type: ignore[no-any-return]


async def post(app_env: AppEnv, token: str, body: Any) -> tuple[int, dict[str, Any]]:  # noqa: F811
    async with AsyncTestClient(app=app_env.app) as client:
        response = await client.post(CREDENTIALS, headers=auth(token), json=body)
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.json()


@pytest.mark.parametrize("example", ["credentials_example.json", "credentials_example2.json",
                                     "credentials_example3.json", "credentials_example4.json"])
async def test_registration_with_the_spec_examples(app_env: AppEnv, partner: FakePartner,  # noqa: F811
                                                   example: str) -> None:
    _, token_a = app_env.registry.invite("cpo", "CPO")
    body = registration(partner, example)
    async with AsyncTestClient(app=app_env.app) as client:
        response = await client.post(CREDENTIALS, headers=auth(token_a), json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["status_code"] == 1000, answer
        ours = answer["data"]
        # Our answer has the shape of the spec's examples: token, our versions URL, our roles.
        assert set(ours) == {"token", "url", "roles"}
        assert ours["url"] == f"{app_env.settings.http.base_url}/ocpi/versions"
        assert ours["roles"] == [{"role": "EMSP", "business_details": {"name": "ocpi-pipeline"},
                                  "party_id": "OPP", "country_code": "NL"}]
        token_c = ours["token"]
        assert token_c != token_a and len(token_c) <= 64
        # The callback used the partner's token, before we answered.
        assert ("GET", "/ocpi/versions", body["token"]) in partner.requests
        assert ("GET", "/ocpi/2.2.1", body["token"]) in partner.requests
        # Token A is dead everywhere; Token C works, also on functional modules.
        dead = await client.get("/ocpi/versions", headers=auth(token_a))
        assert dead.status_code == 401
        again = await client.post(CREDENTIALS, headers=auth(token_a), json=body)  # a repeated POST: 405 (07 §2)
        assert (again.status_code, again.json()["status_code"]) == (405, 2000)
        alive = await client.get(CREDENTIALS, headers=auth(token_c))
        assert alive.json()["data"]["token"] == token_c
        second = await client.post(CREDENTIALS, headers=auth(token_c), json=body)
        assert (second.status_code, second.json()["status_code"]) == (405, 2000)
    stored = app_env.registry.get("cpo")
    assert stored is not None and stored.status is PartnerStatus.REGISTERED
    assert stored.roles == [r for r in stored.roles] and len(stored.roles) == len(body["roles"])
    assert [(r.country_code, r.party_id, r.role.value) for r in stored.roles] == \
        [(r["country_code"], r["party_id"], r["role"]) for r in body["roles"]]
    assert stored.outbound_token == body["token"]
    assert stored.version == "2.2.1" and stored.versions_url == partner.versions_url
    assert {(e.identifier, e.role.value) for e in stored.endpoints} == \
        {("credentials", "SENDER"), ("locations", "SENDER"), ("sessions", "SENDER"), ("cdrs", "SENDER")}
    kinds = {(t.kind, t.state) for t in stored.inbound_tokens}
    assert kinds == {(TokenKind.A, TokenState.REVOKED), (TokenKind.C, TokenState.ACTIVE)}
    record = app_env.registry._client.query("SELECT record_json FROM partners").result_rows
    assert all(token_c not in row[0] and token_a not in row[0] for row in record), "tokens stored in clear"


async def test_registration_stores_nothing_when_the_partner_cannot_be_called(app_env: AppEnv) -> None:  # noqa: F811
    _, token_a = app_env.registry.invite("cpo", "CPO")
    closed = f"http://127.0.0.1:{free_port()}/ocpi/versions"
    status, answer = await post(app_env, token_a, {**registration_body(), "url": closed})
    assert (status, answer["status_code"]) == (200, 3001)
    assert closed in answer["status_message"]
    stored = app_env.registry.get("cpo")
    assert stored is not None and stored.status is PartnerStatus.INVITED
    async with AsyncTestClient(app=app_env.app) as client:  # Token A still works: the partner may retry
        assert (await client.get("/ocpi/versions", headers=auth(token_a))).status_code == 200


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/ocpi/versions", "http://[::1/ocpi/versions",
                                 "http://exa\u00e9mple..com/ocpi/versions"])
async def test_an_unusable_versions_url_is_invalid_not_a_crash(app_env: AppEnv, url: str) -> None:  # noqa: F811
    """URLs that parse as absolute http(s) but cannot be requested (port, IPv6, IDNA): 2001, not HTTP 500."""
    _, token_a = app_env.registry.invite("cpo", "CPO")
    status, answer = await post(app_env, token_a, {**registration_body(), "url": url})
    assert (status, answer["status_code"]) == (200, 2001), answer
    assert answer["data"]["path"] == "$.url"


def registration_body() -> dict[str, Any]:
    return json.loads((EXAMPLES / "credentials_example.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(("fake_kwargs", "code", "text"), [
    ({"details_status": 500}, 3001, "not an OCPI response envelope"),
    ({"versions": [{"version": "2.1.1", "url": "http://127.0.0.1:9/x"}]}, 3002, "offers 2.1.1"),
    ({"versions": []}, 3002, "no version"),
    ({"versions": [{"version": "2.2.1", "url": "http://127.0.0.1:99999/ocpi/2.2.1"}]}, 3001, "Port out of range"),
    ({"versions": [{"version": "2.2.1", "url": "http://xn--/ocpi/2.2.1"}]}, 3001, "IDNAError"),
    ({"endpoints": [{"identifier": "locations", "role": "SENDER", "url": "http://127.0.0.1:9/l"}]}, 3003,
     "no credentials endpoint"),
    ({"endpoints": [{"identifier": "credentials", "role": "SENDER", "url": "http://127.0.0.1:9/c"},
                    {"identifier": "tokens", "role": "SENDER", "url": "http://127.0.0.1:9/t"}]}, 3003,
     "no module in common"),
    # 06 §2: an endpoint's url is a URL; a relative one would be stored and fail every later call.
    ({"endpoints": [{"identifier": "credentials", "role": "SENDER", "url": "/ocpi/2.2.1/credentials"},
                    {"identifier": "sessions", "role": "SENDER", "url": "/ocpi/2.2.1/sessions"}]}, 3001,
     "'/ocpi/2.2.1/credentials' is not an absolute http(s) URL"),
], ids=["details-broken", "only-2.1.1", "no-versions", "details-bad-port", "details-bad-host",
        "no-credentials-endpoint", "nothing-in-common", "relative-endpoint-urls"])
async def test_registration_errors(app_env: AppEnv, fake_kwargs: dict[str, Any], code: int,  # noqa: F811
                                   text: str) -> None:
    fake = FakePartner(**fake_kwargs).start()
    try:
        _, token_a = app_env.registry.invite("cpo", "CPO")
        status, answer = await post(app_env, token_a, registration(fake))
    finally:
        fake.stop()
    assert (status, answer["status_code"]) == (200, code), answer
    assert text in answer["status_message"]
    assert "data" not in answer
    stored = app_env.registry.get("cpo")
    assert stored is not None and stored.status is PartnerStatus.INVITED


async def test_the_answer_never_echoes_what_the_callback_url_answered(app_env: AppEnv) -> None:  # noqa: F811
    """The Token A holder chooses the URL we call (an internal service, a cloud metadata endpoint): the 3001 it
    gets says what failed, never the body that URL answered (the operator's log has it)."""
    fake = FakePartner(details_status=500).start()
    try:
        _, token_a = app_env.registry.invite("cpo", "CPO")
        status, answer = await post(app_env, token_a, registration(fake))
    finally:
        fake.stop()
    assert (status, answer["status_code"]) == (200, 3001), answer
    assert "not an OCPI response envelope" in answer["status_message"]
    assert "broken" not in answer["status_message"], answer["status_message"]


async def test_a_redirect_is_reported_not_followed(app_env: AppEnv, partner: FakePartner) -> None:  # noqa: F811
    mover = FakePartner(redirect_versions_to=partner.versions_url).start()
    try:
        _, token_a = app_env.registry.invite("cpo", "CPO")
        body = registration(partner)
        mover.tokens[body["token"]] = "C"
        _, answer = await post(app_env, token_a, {**body, "url": mover.versions_url})
    finally:
        mover.stop()
    assert answer["status_code"] == 3001 and "redirect" in answer["status_message"]
    assert partner.versions_url in answer["status_message"]
    assert [path for _m, path, _t in mover.requests] == ["/ocpi/versions"]
    assert not partner.requests, "the redirect was followed"


async def test_invalid_bodies(app_env: AppEnv, partner: FakePartner) -> None:  # noqa: F811
    _, token_a = app_env.registry.invite("cpo", "CPO")
    cases: list[tuple[Any, int, str]] = [
        ({**registration(partner), "roles": []}, 2001, "$.roles"),
        ({**registration(partner), "token": "has space"}, 2001, "$.token"),
        ({**registration(partner), "token": "x" * 65}, 2001, "$.token"),
        ({**registration(partner), "url": "ftp://example.com/versions"}, 2001, "$.url"),
        ({k: v for k, v in registration(partner).items() if k != "url"}, 2001, "$.url"),
    ]
    for body, code, path in cases:
        status, answer = await post(app_env, token_a, body)
        assert (status, answer["status_code"]) == (200, code) and path in answer["status_message"], answer
    dup = registration(partner, "credentials_example2.json")
    dup["roles"].append(dict(dup["roles"][0]))
    assert (await post(app_env, token_a, dup))[1]["status_code"] == 2001
    async with AsyncTestClient(app=app_env.app) as client:
        malformed = await client.post(CREDENTIALS, headers={**auth(token_a), "Content-Type": "application/json"},
                                      content=b"{")
    assert (malformed.status_code, malformed.json()["status_code"]) == (400, 2001)


async def test_a_party_belongs_to_one_connection(app_env: AppEnv, partner: FakePartner) -> None:  # noqa: F811
    app_env.provision("first", ("NL", "EXA", "CPO"))
    _, token_a = app_env.registry.invite("second", "Second")
    status, answer = await post(app_env, token_a, registration(partner))  # claims NL/EXA too
    assert (status, answer["status_code"]) == (200, 2001) and "NL/EXA" in answer["status_message"]
    assert "first" not in answer["status_message"]  # the other partner's id is not disclosed


def slow_callbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every handshake callback takes 0.3 s: long enough for a concurrent request to overtake it."""
    callback = credentials_module._callback

    async def slow_callback(*args: Any) -> Any:
        await asyncio.sleep(0.3)
        return await callback(*args)

    monkeypatch.setattr(credentials_module, "_callback", slow_callback)


async def test_two_registrations_at_once_cannot_both_claim_a_party(app_env: AppEnv, partner: FakePartner,  # noqa: F811
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Both POSTs pass the party check made before their (slow) callbacks; only one may keep NL/EXA."""
    _, first = app_env.registry.invite("first", "First")
    _, second = app_env.registry.invite("second", "Second")
    slow_callbacks(monkeypatch)
    async with concurrent_client(app_env.app) as client:
        answers = await asyncio.gather(
            client.post(CREDENTIALS, headers=auth(first), json=registration(partner)),
            client.post(CREDENTIALS, headers=auth(second), json=registration(partner)))
    assert sorted(a.json()["status_code"] for a in answers) == [1000, 2001]
    holders = [p.partner_id for p in app_env.registry.all() if p.owns("NL", "EXA")]
    assert len(holders) == 1


async def registered(app_env: AppEnv, partner: FakePartner) -> tuple[str, dict[str, Any]]:  # noqa: F811
    _, token_a = app_env.registry.invite("cpo", "CPO")
    body = registration(partner)
    _, answer = await post(app_env, token_a, body)
    assert answer["status_code"] == 1000, answer
    return answer["data"]["token"], body


@pytest.mark.parametrize("grace", ["0", "30"])
async def test_put_rotates_tokens_and_renegotiates(make_env: Callable[..., AppEnv], partner: FakePartner,  # noqa: F811
                                                   grace: str) -> None:
    env = make_env(OCPI_TOKEN_GRACE=grace)
    token_c, _ = await registered(env, partner)
    partner.requests.clear()
    update = registration(partner, "credentials_example2.json")
    async with AsyncTestClient(app=env.app) as client:
        response = await client.put(CREDENTIALS, headers=auth(token_c), json=update)
        assert (response.status_code, response.json()["status_code"]) == (200, 1000), response.text
        new_c = response.json()["data"]["token"]
        assert new_c != token_c
        # 07 §3: versions and details fetched again, with the new token from the body.
        assert [(m, p) for m, p, t in partner.requests if t == update["token"]] == \
            [("GET", "/ocpi/versions"), ("GET", "/ocpi/2.2.1")]
        old = await client.get("/ocpi/versions", headers=auth(token_c))
        assert old.status_code == (401 if grace == "0" else 200)
        assert (await client.get("/ocpi/versions", headers=auth(new_c))).status_code == 200
    stored = env.registry.get("cpo")
    assert stored is not None
    assert stored.outbound_token == update["token"] and len(stored.roles) == 2
    old_state = next(t for t in stored.inbound_tokens if t.sha256 == hash_token(token_c))
    assert old_state.state is (TokenState.REVOKED if grace == "0" else TokenState.RETIRING)


def session_of(country: str, party: str) -> dict[str, Any]:
    body = json.loads((EXAMPLES / "session_example_2_short_finished.json").read_text())
    return {**body, "country_code": country, "party_id": party}


@pytest.mark.parametrize("grace", ["0", "30"])
async def test_roles_changed_by_a_put_decide_the_next_push(make_env: Callable[..., AppEnv], partner: FakePartner,  # noqa: F811
                                                          grace: str) -> None:
    """A PUT's roles apply to the very next request, with the new token and with a replaced one still in its
    grace: a party dropped, or kept only as EMSP, may no longer push; a CPO party added may."""
    env = make_env(OCPI_TOKEN_GRACE=grace)
    token_c, _ = await registered(env, partner)  # NL/EXA, CPO
    ours = {"OCPI-to-country-code": "NL", "OCPI-to-party-id": "OPP"}

    def as_party(token: str, party: str) -> dict[str, str]:
        return {**auth(token), **ours, "OCPI-from-country-code": "NL", "OCPI-from-party-id": party}

    async with AsyncTestClient(app=env.app) as client:
        pushed = await client.put("/ocpi/emsp/2.2.1/sessions/NL/EXA/1", headers=auth(token_c),
                                  json=session_of("NL", "EXA") | {"id": "1"})
        assert pushed.json()["status_code"] == 1000, pushed.text
        update = registration(partner, "credentials_example2.json")  # NL/EXA as CPO and EMSP
        update["roles"] = [update["roles"][1], {**update["roles"][0], "party_id": "EXB"}]  # EXA EMSP, EXB CPO
        response = await client.put(CREDENTIALS, headers=auth(token_c), json=update)
        assert response.json()["status_code"] == 1000, response.text
        tokens = [response.json()["data"]["token"]] + ([token_c] if grace != "0" else [])
        for token in tokens:
            kept_as_emsp = await client.put("/ocpi/emsp/2.2.1/sessions/NL/EXA/2", headers=as_party(token, "EXA"),
                                            json=session_of("NL", "EXA") | {"id": "2"})
            assert (kept_as_emsp.status_code, kept_as_emsp.json()["status_code"]) == (404, 2001), kept_as_emsp.text
            added = await client.put("/ocpi/emsp/2.2.1/sessions/NL/EXB/3", headers=as_party(token, "EXB"),
                                     json=session_of("NL", "EXB") | {"id": "3"})
            assert added.json()["status_code"] == 1000, added.text
        update = registration(partner)
        update["roles"][0]["party_id"] = "EXC"  # EXA and EXB dropped
        response = await client.put(CREDENTIALS, headers=auth(tokens[0]), json=update)
        assert response.json()["status_code"] == 1000, response.text
        token = response.json()["data"]["token"]
        dropped = await client.put("/ocpi/emsp/2.2.1/sessions/NL/EXB/4", headers=auth(token),
                                   json=session_of("NL", "EXB") | {"id": "4"})
        assert (dropped.status_code, dropped.json()["status_code"]) == (404, 2001), dropped.text
        assert (await client.get("/ocpi/emsp/2.2.1/sessions/NL/EXB/3", headers=auth(token))).status_code == 404
    assert [key for _topic, key, _value in env.sink.records] == [b"NL/EXA/1", b"NL/EXB/3"] + (
        [b"NL/EXB/3"] if grace != "0" else [])


async def test_a_token_replaced_while_a_request_waits_is_refused(app_env: AppEnv, partner: FakePartner,  # noqa: F811
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A PUT and a DELETE with Token C, both authenticated before the PUT replaced it: the DELETE (waiting
    for the partner's lock) must not act with the dead token, nor undo the rotation."""
    token_c, _ = await registered(app_env, partner)
    slow_callbacks(monkeypatch)
    async with concurrent_client(app_env.app) as client:
        async def delete_soon() -> httpx.Response:
            await asyncio.sleep(0.1)  # after the PUT took the lock, before it replaced the token
            return await client.delete(CREDENTIALS, headers=auth(token_c))

        async def put_twice() -> list[httpx.Response]:
            return list(await asyncio.gather(
                client.put(CREDENTIALS, headers=auth(token_c), json=registration(partner)),
                client.put(CREDENTIALS, headers=auth(token_c), json=registration(partner))))

        puts, deleted = await asyncio.gather(put_twice(), delete_soon())
        assert sorted(r.status_code for r in puts) == [200, 401]
        assert deleted.status_code == 401
        new_c = next(r for r in puts if r.status_code == 200).json()["data"]["token"]
        assert (await client.get("/ocpi/versions", headers=auth(new_c))).status_code == 200
    stored = app_env.registry.get("cpo")
    assert stored is not None and stored.status is PartnerStatus.REGISTERED


def operator_acts_during_the_callback(monkeypatch: pytest.MonkeyPatch, act: Callable[[], Any]) -> None:
    """`act` (an operator's CLI command, another process) runs while the handshake callback is under way: the
    caller chooses the callback URL, so it decides how long that lasts (up to 2 x OCPI_OUTBOUND_TIMEOUT)."""
    callback = credentials_module._callback

    async def callback_with_operator(*args: Any) -> Any:
        await asyncio.to_thread(act)
        return await callback(*args)

    monkeypatch.setattr(credentials_module, "_callback", callback_with_operator)


@pytest.mark.parametrize("action", ["delete", "suspend"])
async def test_an_operator_stop_during_a_put_is_not_undone(app_env: AppEnv, partner: FakePartner,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch, action: str) -> None:
    """`partners delete` (for a token thought leaked) or `suspend` while the partner's PUT waits for its callback:
    the PUT saved the record it read before, REGISTERED, with a new working Token C for the caller."""
    token_c, _ = await registered(app_env, partner)
    stop = {"delete": lambda: app_env.registry.delete("cpo"),
            "suspend": lambda: app_env.registry.set_status("cpo", PartnerStatus.SUSPENDED)}[action]
    operator_acts_during_the_callback(monkeypatch, stop)
    async with AsyncTestClient(app=app_env.app) as client:
        response = await client.put(CREDENTIALS, headers=auth(token_c), json=registration(partner))
        assert response.status_code == 401 and "data" not in response.json(), response.text
    stored = app_env.registry.get("cpo")
    assert stored is not None
    # Deleted: every token revoked; suspended: its tokens kept as they were (refused until `resume`).
    assert stored.status is (PartnerStatus.DELETED if action == "delete" else PartnerStatus.SUSPENDED)
    assert [t.sha256 for t in stored.valid_tokens()] == ([] if action == "delete" else [hash_token(token_c)])


@pytest.mark.parametrize("action", ["delete", "suspend", "rotate"])
async def test_an_operator_change_during_a_registration_is_not_undone(app_env: AppEnv,  # noqa: F811
                                                                       partner: FakePartner,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       action: str) -> None:
    """The same for a POST: a deleted, suspended or re-invited (`rotate`: the old Token A dies) invitation."""
    _, token_a = app_env.registry.invite("cpo", "CPO")
    fresh: list[str] = []
    change = {"delete": lambda: app_env.registry.delete("cpo"),
              "suspend": lambda: app_env.registry.set_status("cpo", PartnerStatus.SUSPENDED),
              "rotate": lambda: fresh.append(app_env.registry.reinvite("cpo"))}[action]
    operator_acts_during_the_callback(monkeypatch, change)
    status, answer = await post(app_env, token_a, registration(partner))
    assert status == 401 and "data" not in answer, answer
    stored = app_env.registry.get("cpo")
    assert stored is not None
    assert stored.status is {"delete": PartnerStatus.DELETED, "suspend": PartnerStatus.SUSPENDED,
                             "rotate": PartnerStatus.INVITED}[action]
    kept = {"delete": [], "suspend": [token_a], "rotate": fresh}[action]
    assert [t.sha256 for t in stored.valid_tokens()] == [hash_token(t) for t in kept]


def reread_together(monkeypatch: pytest.MonkeyPatch, handshakes: int = 2) -> None:
    """Every handshake waits, once it has read the partner again after its callback (`_as_stored_now`), until the
    others have too: the race of two receiver processes (`serve --workers N`), whose locks are not shared."""
    as_stored_now = credentials_module._as_stored_now
    barrier = asyncio.Barrier(handshakes)

    async def reread_then_wait(*args: Any) -> Any:
        partner = await as_stored_now(*args)
        await barrier.wait()
        return partner

    monkeypatch.setattr(credentials_module, "_as_stored_now", reread_then_wait)


@contextlib.asynccontextmanager
async def two_processes(env: AppEnv) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two receiver apps on one registry: each with its own partner locks and directory, as two processes."""
    async with concurrent_client(env.app) as first, concurrent_client(env.app) as second:
        yield first, second


async def test_two_registrations_with_one_token_a_in_two_processes_issue_one_token_c(
        app_env: AppEnv, partner: FakePartner, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Both POSTs pass every check, in two processes, and read the partner still INVITED after their callbacks:
    only the one that claims the Token A first saves; the other is answered as a second use of a used Token A (it
    would otherwise issue a second Token C and undo the first one, whose holder then gets 401)."""
    _, token_a = app_env.registry.invite("cpo", "CPO")
    reread_together(monkeypatch)
    bodies = [registration(partner), registration(partner)]
    async with two_processes(app_env) as clients:
        answers = await asyncio.gather(*(client.post(CREDENTIALS, headers=auth(token_a), json=body)
                                         for client, body in zip(clients, bodies, strict=True)))
        assert sorted((a.status_code, a.json()["status_code"]) for a in answers) == [(200, 1000), (405, 2000)]
        won = next(i for i, a in enumerate(answers) if a.status_code == 200)
        token_c = answers[won].json()["data"]["token"]
        for client in clients:
            assert (await client.get("/ocpi/versions", headers=auth(token_c))).status_code == 200
    stored = app_env.registry.get("cpo")
    assert stored is not None and stored.status is PartnerStatus.REGISTERED
    assert [t.sha256 for t in stored.valid_tokens()] == [hash_token(token_c)]
    assert stored.outbound_token == bodies[won]["token"]


@pytest.mark.parametrize("grace", ["0", "30"])
async def test_two_updates_in_two_processes_issue_one_token_c(make_env: Callable[..., AppEnv],  # noqa: F811
                                                              partner: FakePartner, monkeypatch: pytest.MonkeyPatch,
                                                              grace: str) -> None:
    """The same for two PUTs with one Token C: the one that claims the tokens it read first saves; the other is
    answered as if that one had replaced its token already (401), and its Token C never works."""
    env = make_env(OCPI_TOKEN_GRACE=grace)
    token_c, _ = await registered(env, partner)
    reread_together(monkeypatch)
    bodies = [registration(partner), registration(partner)]
    async with two_processes(env) as clients:
        answers = await asyncio.gather(*(client.put(CREDENTIALS, headers=auth(token_c), json=body)
                                         for client, body in zip(clients, bodies, strict=True)))
        assert sorted(a.status_code for a in answers) == [200, 401], [a.text for a in answers]
        won = next(i for i, a in enumerate(answers) if a.status_code == 200)
        new_c = answers[won].json()["data"]["token"]
        for client in clients:
            assert (await client.get("/ocpi/versions", headers=auth(new_c))).status_code == 200
    stored = env.registry.get("cpo")
    assert stored is not None and stored.outbound_token == bodies[won]["token"]
    assert [t.sha256 for t in stored.valid_tokens()] == [hash_token(t) for t in (
        [new_c] if grace == "0" else [token_c, new_c])]


async def test_two_registrations_in_two_processes_cannot_both_claim_a_party(app_env: AppEnv,  # noqa: F811
                                                                           partner: FakePartner,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two partners take NL/EXA in two processes at once: both find it free when they check it again after their
    callbacks (each process serialises only its own checks and saves); only the first claim of the party saves,
    the other is answered 2001 and stays invited, its Token A still good for another try."""
    _, first = app_env.registry.invite("first", "First")
    _, second = app_env.registry.invite("second", "Second")
    reread_together(monkeypatch)
    save = app_env.registry.save

    def slow_save(record: Any) -> Any:
        time.sleep(0.3)  # the other process checks the parties before this save lands
        return save(record)

    monkeypatch.setattr(app_env.registry, "save", slow_save)
    async with two_processes(app_env) as clients:
        answers = await asyncio.gather(*(client.post(CREDENTIALS, headers=auth(token), json=registration(partner))
                                         for client, token in zip(clients, [first, second], strict=True)))
    assert sorted(a.json()["status_code"] for a in answers) == [1000, 2001], [a.text for a in answers]
    holders = [p.partner_id for p in app_env.registry.all() if p.owns("NL", "EXA")]
    assert len(holders) == 1
    loser = app_env.registry.require({"first": "second", "second": "first"}[holders[0]])
    assert loser.status is PartnerStatus.INVITED and loser.valid_tokens()


async def test_an_unregistration_in_another_process_is_not_undone_by_a_put(app_env: AppEnv,  # noqa: F811
                                                                           partner: FakePartner,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The partner's DELETE, in another process, lands after its PUT read the partner again (REGISTERED) and before
    that PUT saves: the DELETE is answered 1000, so the PUT may not register the partner again with a new Token C."""
    token_c, _ = await registered(app_env, partner)
    as_stored_now = credentials_module._as_stored_now
    deleted: list[httpx.Response] = []
    async with two_processes(app_env) as (first, second):
        async def reread_then_delete_elsewhere(*args: Any) -> Any:
            record = await as_stored_now(*args)
            deleted.append(await second.delete(CREDENTIALS, headers=auth(token_c)))
            return record

        monkeypatch.setattr(credentials_module, "_as_stored_now", reread_then_delete_elsewhere)
        put = await first.put(CREDENTIALS, headers=auth(token_c), json=registration(partner))
        assert deleted[0].json()["status_code"] == 1000, deleted[0].text
        assert put.status_code == 401 and "data" not in put.json(), put.text
    stored = app_env.registry.get("cpo")
    assert stored is not None and stored.status is PartnerStatus.UNREGISTERED and not stored.valid_tokens()


async def test_a_registration_another_process_completed_meanwhile_is_a_used_token_a(
        app_env: AppEnv, partner: FakePartner, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A POST whose callback ends after another process registered the partner with the same Token A: 405, as
    for a second POST in one process, not a 401 that blames an operator."""
    _, token_a = app_env.registry.invite("cpo", "CPO")

    def registered_elsewhere() -> None:
        record = app_env.registry.get("cpo")
        assert record is not None
        record.status = PartnerStatus.REGISTERED
        record.revoke_tokens(kinds=[TokenKind.A])
        record.issue_token(TokenKind.C)
        app_env.registry.save(record)

    operator_acts_during_the_callback(monkeypatch, registered_elsewhere)
    status, answer = await post(app_env, token_a, registration(partner))
    assert (status, answer["status_code"]) == (405, 2000) and "data" not in answer, answer


async def test_put_failure_keeps_the_old_registration(app_env: AppEnv, partner: FakePartner) -> None:  # noqa: F811
    token_c, first = await registered(app_env, partner)
    closed = f"http://127.0.0.1:{free_port()}/ocpi/versions"
    async with AsyncTestClient(app=app_env.app) as client:
        response = await client.put(CREDENTIALS, headers=auth(token_c), json={**registration(partner), "url": closed})
        assert response.json()["status_code"] == 3001
        assert (await client.get("/ocpi/versions", headers=auth(token_c))).status_code == 200
    stored = app_env.registry.get("cpo")
    assert stored is not None and stored.outbound_token == first["token"]


async def test_delete_unregisters_and_kills_every_token(app_env: AppEnv, partner: FakePartner) -> None:  # noqa: F811
    token_c, _ = await registered(app_env, partner)
    async with AsyncTestClient(app=app_env.app) as client:
        response = await client.delete(CREDENTIALS, headers=auth(token_c))
        assert (response.status_code, response.json()["status_code"]) == (200, 1000)
        assert "data" not in response.json()
        for method in ("GET", "PUT", "DELETE"):
            after = await client.request(method, CREDENTIALS, headers=auth(token_c))
            assert after.status_code == 401
    stored = app_env.registry.get("cpo")
    assert stored is not None and stored.status is PartnerStatus.UNREGISTERED
    assert stored.outbound_token is None and not stored.valid_tokens()
    # A fresh invitation starts over.
    _, token_a = app_env.registry.invite("cpo", "CPO again")
    _, answer = await post(app_env, token_a, registration(partner))
    assert answer["status_code"] == 1000


async def test_every_credentials_405_says_which_methods_the_caller_may_use(app_env: AppEnv,  # noqa: F811
                                                                           partner: FakePartner) -> None:
    """07 §3's 405s (POST when registered, PUT/DELETE when not) are HTTP 405s: RFC 9110 requires an Allow header
    (as our other 405s have), here the methods open to the caller in its state."""
    _, token_a = app_env.registry.invite("other", "Other")
    token_c, _ = await registered(app_env, partner)
    async with AsyncTestClient(app=app_env.app) as client:
        for method, token, allowed in (("PUT", token_a, "GET, HEAD, POST"), ("DELETE", token_a, "GET, HEAD, POST"),
                                       ("POST", token_c, "DELETE, GET, HEAD, PUT")):
            response = await client.request(method, CREDENTIALS, headers=auth(token), json=registration(partner))
            assert (response.status_code, response.headers.get("allow")) == (405, allowed), (method, response.text)


async def test_get_answers_our_credentials_with_the_callers_token(app_env: AppEnv) -> None:  # noqa: F811
    token = app_env.provision("cpo", ("BE", "BEC", "CPO"))
    _, token_a = app_env.registry.invite("new", "New")
    async with AsyncTestClient(app=app_env.app) as client:
        registered_answer = (await client.get(CREDENTIALS, headers=auth(token))).json()
        invited_answer = (await client.get(CREDENTIALS, headers=auth(token_a))).json()
    assert registered_answer["data"]["token"] == token and invited_answer["data"]["token"] == token_a
    assert registered_answer["data"]["url"].endswith("/ocpi/versions")


async def test_a_partner_answer_with_invalid_utf8_is_a_partner_error_not_a_crash() -> None:
    """msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 in a JSON string."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"status_code": 1000, "status_message": "\xff", "data": []}')

    async with OcpiClient("token", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(PartnerApiError, match="not an OCPI response envelope"):
            await client.versions("http://partner.test/ocpi/versions")


async def test_a_partner_answer_nested_too_deeply_is_a_partner_error_not_a_crash() -> None:
    """msgspec raises RecursionError, not DecodeError, for JSON nested deeper than it parses: during a
    credentials POST that was an HTTP 500 to the registering partner instead of 3001."""
    deep = b"[" * 5000 + b"]" * 5000

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"status_code": 1000, "timestamp": "2024-01-01T00:00:00Z", "data": ['
                              + deep + b"]}")

    async with OcpiClient("token", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(PartnerApiError, match="nests too deeply"):
            await client.versions("http://partner.test/ocpi/versions")


def hub_claim(body: dict[str, Any]) -> dict[str, Any]:
    """The registration with its first role made a HUB (a Hub reports itself)."""
    body["roles"][0]["role"] = "HUB"
    return body


async def test_only_a_connection_agreed_as_a_hub_may_claim_the_role(app_env: AppEnv,  # noqa: F811
                                                                    partner: FakePartner) -> None:
    # A Hub acts for any party it names in the routing headers: an invited CPO that made itself one could push
    # (and have billed) Sessions and CDRs of parties another connection holds, and read their objects.
    _, token_a = app_env.registry.invite("cpo", "CPO")
    status, answer = await post(app_env, token_a, hub_claim(registration(partner)))
    assert (status, answer["status_code"]) == (200, 2001) and "HUB" in answer["status_message"]
    assert answer["data"]["path"] == "$.roles", answer  # as every other 2001 names its field
    stored = app_env.registry.get("cpo")
    assert stored is not None and stored.status is PartnerStatus.INVITED and not stored.is_hub

    _, hub_token_a = app_env.registry.invite("hub", "Hub", hub=True)  # `partners invite --hub`
    body = hub_claim(registration(partner))
    body["roles"] = body["roles"][:1]
    body["roles"][0]["party_id"] = "HBX"
    status, answer = await post(app_env, hub_token_a, body)
    assert answer["status_code"] == 1000, answer
    hub = app_env.registry.get("hub")
    assert hub is not None and hub.is_hub


async def test_a_registered_partner_cannot_become_a_hub_by_an_update(app_env: AppEnv,  # noqa: F811
                                                                      partner: FakePartner) -> None:
    token_c, _ = await registered(app_env, partner)
    async with AsyncTestClient(app=app_env.app) as client:
        response = await client.put(CREDENTIALS, headers=auth(token_c),
                                    json=hub_claim(registration(partner, "credentials_example2.json")))
    assert response.json()["status_code"] == 2001 and "HUB" in response.json()["status_message"]
    stored = app_env.registry.get("cpo")
    assert stored is not None and not stored.is_hub
    assert (await post(app_env, token_c, {}))[0] == 405  # and still registered with its old roles


async def test_a_partner_answer_trickled_byte_by_byte_ends_at_the_outbound_timeout() -> None:
    """OCPI_OUTBOUND_TIMEOUT is what an outgoing call may take, in all: httpx's timeout only bounds each wait for
    a chunk, so a callback URL (the registering partner's choice) that sends its answer a byte at a time, each
    within the timeout, held the credentials POST open for as long as it kept sending."""
    stop = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
            while not stop.is_set():
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        async with OcpiClient("token", timeout=0.5) as client:
            with pytest.raises(PartnerApiError, match="within the timeout"):
                await asyncio.wait_for(client.versions(f"http://127.0.0.1:{port}/ocpi/versions"), 10)
        assert loop.time() - started < 3
    finally:
        stop.set()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("stamp", "compat"), [
    ("2024-05-01T10:00:00.1234567Z", "DATETIME_EXCESS_PRECISION"),  # .NET's "o" format: 7 digits, 28 chars
    ("2024-05-01T12:00:00.1234567+02:00", "DATETIME_OFFSET,DATETIME_EXCESS_PRECISION"),
])
async def test_a_partners_envelope_timestamp_is_read_with_its_datetime_relaxations(stamp: str, compat: str) -> None:
    """The envelope `timestamp` is a DateTime like any other: a partner whose profile relaxes its DateTimes
    (DATETIME_EXCESS_PRECISION exists for .NET's 7 fraction digits) sends its envelopes the same way. Only the
    offset relaxation was applied to envelopes, so such a partner's every answer was "not OCPI": its
    registration (3001) and ours with it failed whatever its profile said."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"status_code": 1000, "timestamp": stamp,
                                         "data": [{"version": "2.2.1", "url": "http://partner.test/2.2.1"}]})

    profile = CompatProfile.from_names(compat)
    async with OcpiClient("token", profile=profile, transport=httpx.MockTransport(handler)) as client:
        versions = await client.versions("http://partner.test/ocpi/versions")
    assert [v.version for v in versions] == ["2.2.1"]
    async with OcpiClient("token", transport=httpx.MockTransport(handler)) as strict:  # strict: refused
        with pytest.raises(PartnerApiError, match="envelope timestamp"):
            await strict.versions("http://partner.test/ocpi/versions")


async def test_our_handshake_requests_follow_the_transport_rules() -> None:
    """04 §2, §7, §11 and 06 §3 for the calls we make (no unit test looked at the wire before): the header is
    `Token base64(token)` (standard alphabet, padded, no trailing newline; the raw token only for RAW_TOKEN), every
    request has its own X-Request-ID and an X-Correlation-ID, configuration modules carry no routing headers, a body
    has its Content-Type and the raw token (not Base64); the highest mutual version is chosen (2.2.1 of 2.1.1,
    2.2.1 and an unknown 2.3.0) and unknown module identifiers are skipped, not fatal."""
    seen: list[httpx.Request] = []
    ok = {"status_code": 1000, "timestamp": "2024-05-01T10:00:00Z"}
    credentials = {"token": "theirs", "url": "http://partner.test/ocpi/versions",
                   "roles": [{"role": "CPO", "party_id": "TNM", "country_code": "NL",
                              "business_details": {"name": "T"}}]}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/ocpi/versions":
            return httpx.Response(200, json={**ok, "data": [
                {"version": "2.1.1", "url": "http://partner.test/2.1.1"},
                {"version": "2.2.1", "url": "http://partner.test/2.2.1"},
                {"version": "2.3.0", "url": "http://partner.test/2.3.0"}]})
        if request.url.path == "/2.2.1":
            return httpx.Response(200, json={**ok, "data": {"version": "2.2.1", "endpoints": [
                {"identifier": "nltnm-tokens", "role": "SENDER", "url": "http://partner.test/x"},
                {"identifier": "credentials", "role": "RECEIVER", "url": "http://partner.test/2.2.1/credentials"},
                {"identifier": "cdrs", "role": "SENDER", "url": "http://partner.test/2.2.1/cdrs"}]}})
        return httpx.Response(200, json={**ok, "data": credentials})

    async with OcpiClient("example-token", transport=httpx.MockTransport(handler)) as client:
        discovery = await client.discover("http://partner.test/ocpi/versions")
        ours = {**credentials, "token": "ours/+="}
        await client.credentials("POST", discovery.credentials_url, decode(json.dumps(ours), Credentials).value)
    assert (discovery.version, discovery.details_url) == ("2.2.1", "http://partner.test/2.2.1")
    assert [e.identifier for e in discovery.endpoints] == ["credentials", "cdrs"]
    assert [(r.method, r.url.path) for r in seen] == [("GET", "/ocpi/versions"), ("GET", "/2.2.1"),
                                                     ("POST", "/2.2.1/credentials")]
    for request in seen:
        assert request.headers["authorization"] == "Token ZXhhbXBsZS10b2tlbg=="
        assert request.headers.get("x-correlation-id")
        assert not [name for name in request.headers if name.lower().startswith("ocpi-")]
    assert len({r.headers["x-request-id"] for r in seen}) == len(seen)
    post = seen[-1]
    assert post.headers["content-type"] == "application/json"
    assert json.loads(post.content)["token"] == "ours/+="
    assert "content-type" not in seen[0].headers

    async with OcpiClient("example-token", profile=CompatProfile.from_names("RAW_TOKEN"),
                          transport=httpx.MockTransport(handler)) as raw:
        await raw.versions("http://partner.test/ocpi/versions")
    assert seen[-1].headers["authorization"] == "Token example-token"


@pytest.fixture
def our_side() -> Iterator[FakePartner]:
    """Stands in for our receivers when we start a handshake: answers the partner's callback (versions, details)
    whatever the token."""
    fake = FakePartner().start()
    fake._auth = lambda request, *, allow_a: "any"  # type: ignore[method-assign]
    yield fake
    fake.stop()


def initiator(app_env: AppEnv, our_side: FakePartner) -> credentials_module.Initiator:  # noqa: F811
    ours = served_endpoints(app_env.app, app_env.settings.http.base_url)
    return credentials_module.Initiator(app_env.registry, app_env.settings, ours=ours,
                                        our_versions_url=our_side.versions_url)


def refuse_delete(fake: FakePartner) -> None:
    """The partner answers every credentials DELETE with an error."""
    accept = fake._auth

    def auth_or_refuse(request: Any, *, allow_a: bool) -> Any:
        if request.method == "DELETE":
            return fake_partner_module._envelope(3000, message="try again later", http=500)
        return accept(request, allow_a=allow_a)

    fake._auth = auth_or_refuse  # type: ignore[method-assign]


async def test_a_registration_the_partner_did_not_undo_is_not_reported_undone(app_env: AppEnv,  # noqa: F811
                                                                              partner: FakePartner,
                                                                              our_side: FakePartner) -> None:
    """`partners register` (no --hub) toward a partner that answers as a Hub undoes the registration with a
    credentials DELETE; when the partner refused that DELETE the operator was told "the registration was undone"
    though the partner still held it."""
    partner.role = "HUB"
    refuse_delete(partner)
    with pytest.raises(credentials_module.HandshakeError) as raised:
        await initiator(app_env, our_side).register(versions_url=partner.versions_url,
                                                    token_a=partner.issue_token_a(), partner_id="hub")
    message = str(raised.value)
    assert "was undone" not in message, message
    assert "did not confirm" in message and "HTTP 500" in message, message
    stored = app_env.registry.get("hub")
    assert stored is not None and stored.status is PartnerStatus.DELETED and not stored.valid_tokens()


def operator_acts_during_the_partners_callback(our_side: FakePartner, act: Callable[[], Any]) -> None:
    """`act` (an operator's CLI command, another process) runs when the partner first calls us back, i.e. while
    our credentials POST/PUT is open at the partner."""
    accept = our_side._auth
    done: list[bool] = []

    def act_then_accept(request: Any, *, allow_a: bool) -> Any:
        if not done:
            done.append(True)
            act()
        return accept(request, allow_a=allow_a)

    our_side._auth = act_then_accept  # type: ignore[method-assign]


@pytest.mark.parametrize("action", ["delete", "suspend"])
async def test_an_operator_stop_during_our_update_is_not_undone(app_env: AppEnv, partner: FakePartner,  # noqa: F811
                                                                our_side: FakePartner, action: str) -> None:
    """`partners delete` (a token thought leaked) or `suspend` while `partners update`/`rotate` waits for the
    partner's answer: the update saved the record it had read before, REGISTERED, with a new working token for the
    partner (a deleted partner came back)."""
    ours = initiator(app_env, our_side)
    await ours.register(versions_url=partner.versions_url, token_a=partner.issue_token_a(), partner_id="cpo")
    stop = {"delete": lambda: app_env.registry.delete("cpo"),
            "suspend": lambda: app_env.registry.set_status("cpo", PartnerStatus.SUSPENDED)}[action]
    operator_acts_during_the_partners_callback(our_side, stop)
    if action == "delete":
        with pytest.raises(credentials_module.HandshakeError, match="DELETED"):
            await ours.update("cpo")
    else:
        await ours.update("cpo")
    stored = app_env.registry.get("cpo")
    assert stored is not None
    if action == "delete":
        assert stored.status is PartnerStatus.DELETED and not stored.valid_tokens() and not stored.outbound_token
    else:  # still suspended, with the tokens the update exchanged (the partner holds only those now)
        assert stored.status is PartnerStatus.SUSPENDED
        assert stored.outbound_token is not None and list(partner.tokens) == [stored.outbound_token]
        assert [t.kind for t in stored.valid_tokens()] == [TokenKind.B]
        assert partner.peer_credentials is not None
        assert stored.valid_tokens()[0].sha256 == hash_token(partner.peer_credentials["token"])


async def test_an_operator_delete_during_our_registration_is_not_undone(app_env: AppEnv,  # noqa: F811
                                                                         partner: FakePartner,
                                                                         our_side: FakePartner) -> None:
    """The same for `partners register`: a partner deleted while our POST is open was saved back REGISTERED."""
    operator_acts_during_the_partners_callback(our_side, lambda: app_env.registry.delete("cpo"))
    with pytest.raises(credentials_module.HandshakeError, match="DELETED"):
        await initiator(app_env, our_side).register(versions_url=partner.versions_url,
                                                    token_a=partner.issue_token_a(), partner_id="cpo")
    stored = app_env.registry.get("cpo")
    assert stored is not None
    assert stored.status is PartnerStatus.DELETED and not stored.valid_tokens() and not stored.outbound_token


async def test_a_partner_answering_with_an_unusable_versions_url_stays_reachable(app_env: AppEnv,  # noqa: F811
                                                                                 partner: FakePartner,
                                                                                 our_side: FakePartner) -> None:
    """The versions URL in the partner's credentials answer is where every later update starts. A relative one
    (not callable) was stored as it came, so `partners update`/`rotate` could never work again with that partner;
    the URL we reached it at is kept instead (we refuse such a URL in a partner's own POST/PUT, 2001)."""
    answer = partner.credentials_data
    partner.credentials_data = lambda token: {**answer(token), "url": "/ocpi/versions"}  # type: ignore[method-assign]
    ours = initiator(app_env, our_side)
    registered_partner = await ours.register(versions_url=partner.versions_url, token_a=partner.issue_token_a(),
                                             partner_id="cpo")
    assert registered_partner.versions_url == partner.versions_url
    updated = await ours.update("cpo")  # failed: "'/ocpi/versions' is not an absolute http(s) URL"
    assert updated.versions_url == partner.versions_url
    assert updated.outbound_token is not None and list(partner.tokens) == [updated.outbound_token]


def test_a_party_held_through_another_connection_is_refused_naming_its_field() -> None:
    """A 2001 carries the field's path in `data` (a push's, a decode's, the URL's here): the party check's named
    `$.roles` in its message only."""
    import msgspec

    from ocpi.model import CredentialsRole as Role
    from receivers.credentials import _party_held

    role = msgspec.convert({"role": "CPO", "party_id": "TNM", "country_code": "NL",
                            "business_details": {"name": "x"}}, Role)
    refusal = _party_held(role)
    assert refusal.data == {"path": "$.roles",
                            "reason": "party NL/TNM is registered with us through another connection"}


def accept_then(fake: FakePartner, after: Callable[[Any], Any]) -> None:
    """The partner applies every credentials PUT (calls us back, stores our new token, drops the old one), then
    `after(answer)` decides what reaches us: an answer we cannot use, or none in time."""
    accept = fake._accept

    async def accept_then_after(request: Any, *, old: str) -> Any:
        answer = await accept(request, old=old)
        return await after(answer) if request.method == "PUT" else answer

    fake._accept = accept_then_after  # type: ignore[method-assign]


@pytest.mark.parametrize("outcome", ["unusable-answer", "no-answer-in-time"])
async def test_a_put_the_partner_may_have_applied_keeps_the_token_it_now_uses(app_env: AppEnv,  # noqa: F811
                                                                             partner: FakePartner,
                                                                             our_side: FakePartner,
                                                                             outcome: str) -> None:
    """`partners update`/`rotate`: the partner took our new token (it called us back with it and dropped the old
    one), but its answer did not reach us usable. The new token was revoked as if the PUT had been refused, so every
    push of the partner, made with the only token it now holds for us, was refused (401) from then on."""
    ours = initiator(app_env, our_side)
    await ours.register(versions_url=partner.versions_url, token_a=partner.issue_token_a(), partner_id="cpo")
    before = app_env.registry.require("cpo").outbound_token

    async def unusable(answer: Any) -> Any:
        return fake_partner_module._envelope(data={"token": "x" * 65, "url": partner.versions_url, "roles": []})

    async def too_late(answer: Any) -> Any:
        await asyncio.sleep(app_env.settings.partners.outbound_timeout_s + 1)
        return answer

    accept_then(partner, {"unusable-answer": unusable, "no-answer-in-time": too_late}[outcome])
    with pytest.raises(credentials_module.HandshakeError, match="may have") as raised:
        await ours.update("cpo")
    assert "update" in str(raised.value)
    stored = app_env.registry.require("cpo")
    assert partner.token_for_peer is not None
    # The token the partner now calls us with still works, and so does the one it held before (it may not have
    # applied the PUT, as far as we know); nothing else changed.
    assert {t.sha256 for t in stored.valid_tokens()} >= {hash_token(partner.token_for_peer)}
    assert len(stored.valid_tokens()) == 2
    assert stored.status is PartnerStatus.REGISTERED and stored.outbound_token == before


async def test_a_put_the_partner_refused_revokes_the_token_it_never_took(app_env: AppEnv,  # noqa: F811
                                                                        partner: FakePartner,
                                                                        our_side: FakePartner) -> None:
    """The other side of the rule above: a PUT the partner answered with an error left it with its old token, so
    the new one, never taken, is revoked."""
    ours = initiator(app_env, our_side)
    await ours.register(versions_url=partner.versions_url, token_a=partner.issue_token_a(), partner_id="cpo")
    held = partner.token_for_peer
    accept = partner._accept

    async def refuse(request: Any, *, old: str) -> Any:
        if request.method == "PUT":
            return fake_partner_module._envelope(3001, message="unable to use your API")
        return await accept(request, old=old)

    partner._accept = refuse  # type: ignore[method-assign]
    with pytest.raises(credentials_module.HandshakeError, match="3001"):
        await ours.update("cpo")
    stored = app_env.registry.require("cpo")
    assert held is not None and [t.sha256 for t in stored.valid_tokens()] == [hash_token(held)]


async def test_a_repeated_post_with_the_spent_token_a_is_already_registered(app_env: AppEnv,  # noqa: F811
                                                                           partner: FakePartner) -> None:
    """07 §2/§3: a POST from a client that is already registered MUST be answered 405. A partner whose
    registration answer was lost retries with its Token A: it got 401 ("unknown token", as if the token were
    wrong), though a POST overlapping the registration got 405. The spent Token A still works nowhere else, and
    says nothing once the registration is gone."""
    _, token_a = app_env.registry.invite("cpo", "CPO")
    body = registration(partner)
    status, answer = await post(app_env, token_a, body)
    assert (status, answer["status_code"]) == (200, 1000), answer
    token_c = answer["data"]["token"]
    async with AsyncTestClient(app=app_env.app) as client:
        again = await client.post(CREDENTIALS, headers=auth(token_a), json=registration(partner))
        assert (again.status_code, again.json()["status_code"]) == (405, 2000), again.text
        assert again.headers["allow"] == "DELETE, GET, HEAD, PUT"
        assert "already registered" in again.json()["status_message"] and "data" not in again.json()
        for method, path in (("GET", "/ocpi/versions"), ("GET", CREDENTIALS), ("PUT", CREDENTIALS),
                             ("DELETE", CREDENTIALS), ("GET", "/ocpi/emsp/2.2.1/sessions/NL/EXA/1")):
            assert (await client.request(method, path, headers=auth(token_a))).status_code == 401, (method, path)
        assert (await client.post(CREDENTIALS, headers=auth("never-issued"), json=body)).status_code == 401
        assert (await client.delete(CREDENTIALS, headers=auth(token_c))).json()["status_code"] == 1000
        gone = await client.post(CREDENTIALS, headers=auth(token_a), json=registration(partner))
        assert gone.status_code == 401, gone.text
    stored = app_env.registry.get("cpo")
    assert stored is not None and stored.status is PartnerStatus.UNREGISTERED


async def test_a_registration_the_partner_may_have_accepted_is_reported_so(app_env: AppEnv,  # noqa: F811
                                                                          partner: FakePartner,
                                                                          our_side: FakePartner) -> None:
    """`partners register`: the partner accepted our POST (its Token A is spent, it holds our token) but its answer
    did not reach us usable. We hold no token for it, so the registration is dropped here; the operator was told
    only what failed, and a retry with the same Token A was then refused with nothing explaining why."""
    accept = partner._accept

    async def accept_then_unusable(request: Any, *, old: str) -> Any:
        await accept(request, old=old)
        return fake_partner_module._envelope(data={"token": "x" * 65, "url": partner.versions_url, "roles": []})

    partner._accept = accept_then_unusable  # type: ignore[method-assign]
    token_a = partner.issue_token_a()
    with pytest.raises(credentials_module.HandshakeError, match="may have accepted") as raised:
        await initiator(app_env, our_side).register(versions_url=partner.versions_url, token_a=token_a,
                                                    partner_id="cpo")
    assert "new Token A" in str(raised.value)
    assert token_a not in partner.tokens and partner.token_for_peer is not None  # it did register us
    stored = app_env.registry.get("cpo")
    assert stored is not None and stored.status is PartnerStatus.DELETED and not stored.valid_tokens()


async def test_an_unregistration_the_partner_may_have_applied_is_reported_so(app_env: AppEnv,  # noqa: F811
                                                                            partner: FakePartner,
                                                                            our_side: FakePartner) -> None:
    """`partners unregister`: the partner applied our credentials DELETE (it dropped our token) but its answer did
    not come in time. Nothing changes here, as for a refused DELETE, but the operator was told only what failed:
    the next `unregister` is then refused (our token is gone there) with nothing explaining why."""
    ours = initiator(app_env, our_side)
    await ours.register(versions_url=partner.versions_url, token_a=partner.issue_token_a(), partner_id="cpo")
    kill_all = partner._kill_all

    def drop_then_stall() -> None:  # the partner's own loop, in its own thread: only its answer waits
        kill_all()
        time.sleep(app_env.settings.partners.outbound_timeout_s + 1)

    partner._kill_all = drop_then_stall  # type: ignore[method-assign]
    with pytest.raises(credentials_module.HandshakeError, match="may have applied"):
        await ours.unregister("cpo")
    assert not partner.tokens  # it did drop us: our token for it is dead there
    stored = app_env.registry.require("cpo")
    assert stored.status is PartnerStatus.REGISTERED and stored.valid_tokens()
