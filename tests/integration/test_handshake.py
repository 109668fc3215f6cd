"""The credentials handshake end to end, in both directions, over real HTTP.

Our side is the embedded stack's receivers (granian child process, registry in chDB behind the shim) and the
`ocpi-pipeline partners ...` CLI run as a separate process, exactly as an operator would; the other side is a
fake CPO platform (aiohttp on 127.0.0.1, tests/unit/receivers/fake_partner.py). After each handshake both
sides call each other with the new tokens, Token A is dead, a credentials PUT rotates the tokens, and after
a DELETE the old tokens get 401.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from infra.settings import as_environ
from pipeline.stack import Stack
from receivers.outbound import OcpiClient, PartnerApiError
from receivers.registry import PartnerRegistry, PartnerStatus
from tests.conftest import EXAMPLES
from tests.unit.receivers.fake_partner import FakePartner

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


@pytest.fixture
async def stack(settings_for, broker) -> AsyncIterator[Stack]:  # type: ignore[no-untyped-def]
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu").with_overrides(http={"port": 0})
    running = await Stack(settings, run_worker=False).start()
    children = list(running.children.values())
    yield running
    await running.stop()
    assert all(child.poll() is not None for child in children)


@pytest.fixture
def fake() -> Iterator[FakePartner]:
    partner = FakePartner().start()
    yield partner
    partner.stop()


async def cli(stack: Stack, *args: str, ok: bool = True) -> dict[str, str]:
    """Run `ocpi-pipeline partners ARGS` as its own process against the running stack; its output fields."""
    env = {**os.environ, **as_environ(stack.settings), "OCPI_HTTP_PORT": str(stack.http_port)}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "pipeline", "partners", *args, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert (process.returncode == 0) is ok, (out.decode(), err.decode())
    text = out.decode() if ok else err.decode()
    assert "Traceback" not in text
    return dict(line.split(": ", 1) for line in text.strip().splitlines() if ": " in line)


def registry(stack: Stack) -> PartnerRegistry:
    assert stack.clickhouse is not None
    return PartnerRegistry(stack.clickhouse)


def session_for(country: str, party: str) -> dict[str, object]:
    body = json.loads((EXAMPLES / "session_example_2_short_finished.json").read_text())
    body.update(country_code=country, party_id=party)
    return body  # type: ignore[no-any-return]


async def eventually_status(fake: FakePartner, url: str, token: str, status: int, within: float = 20.0) -> bool:
    """Whether `token` gets `status` within `within` seconds: at the receivers' next directory refresh (every 2 s),
    without a restart. The budget is not the refresh's: on a slow machine the reload from the store and the
    requests themselves take seconds too (3 s was 1 s of margin)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        if (await fake.call("GET", url, token=token)).status_code == status:
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.1)


async def we_can_call(fake: FakePartner, token: str) -> bool:
    async with OcpiClient(token, timeout=10) as client:
        try:
            await client.call("GET", f"{fake.base}/ocpi/cpo/2.2.1/locations")
        except PartnerApiError as exc:
            assert exc.http_status == 401, exc
            return False
    return True


async def test_a_cpo_registers_with_us(stack: Stack, fake: FakePartner) -> None:
    invited = await cli(stack, "invite", "cpo-fake", "--name", "Fake CPO")
    assert invited["versions_url"] == stack.versions_url
    token_a = invited["token_a"]

    answer = await fake.register_with(invited["versions_url"], token_a)
    assert answer["status_code"] == 1000, answer
    token_c = fake.token_for_peer
    assert token_c is not None and token_c != token_a
    assert answer["data"]["url"] == stack.versions_url and answer["data"]["roles"][0]["party_id"] == "OPP"

    partner = registry(stack).require("cpo-fake")
    assert partner.status is PartnerStatus.REGISTERED and partner.version == "2.2.1"
    assert [(r.country_code, r.party_id) for r in partner.roles] == [("NL", "TNM")]
    token_b = partner.outbound_token
    assert token_b is not None and token_b in fake.tokens

    # Both sides call each other with the new tokens; Token A is dead.
    assert await we_can_call(fake, token_b)
    details = await fake.call("GET", f"{stack.base_url}/ocpi/2.2.1")
    assert details.status_code == 200 and details.json()["status_code"] == 1000
    pushed = await fake.call("PUT", f"{stack.base_url}/ocpi/emsp/2.2.1/sessions/NL/TNM/101",
                             json_body=session_for("NL", "TNM"))
    assert pushed.json()["status_code"] == 1000, pushed.text
    assert (await fake.call("GET", stack.versions_url, token=token_a)).status_code == 401
    again = await fake.call("POST", f"{stack.base_url}/ocpi/2.2.1/credentials", json_body=fake.credentials_data("x"))
    assert again.status_code == 405

    # Rotation: the CPO PUTs new credentials; both old tokens die (grace 0), the new ones work.
    rotated = await fake.update()
    assert rotated["status_code"] == 1000, rotated
    new_c = fake.token_for_peer
    assert new_c is not None and new_c != token_c
    assert (await fake.call("GET", stack.versions_url, token=token_c)).status_code == 401
    assert (await fake.call("GET", stack.versions_url)).status_code == 200
    new_b = registry(stack).require("cpo-fake").outbound_token
    assert new_b is not None and new_b != token_b
    assert await we_can_call(fake, new_b) and not await we_can_call(fake, token_b)

    # Unregister: the CPO DELETEs; its token gets 401 from then on.
    deleted = await fake.unregister()
    assert deleted.status_code == 200 and deleted.json()["status_code"] == 1000
    assert (await fake.call("GET", stack.versions_url, token=new_c)).status_code == 401
    assert (await fake.call("PUT", f"{stack.base_url}/ocpi/2.2.1/credentials", token=new_c,
                            json_body=fake.credentials_data("y"))).status_code == 401
    gone = registry(stack).require("cpo-fake")
    assert gone.status is PartnerStatus.UNREGISTERED and gone.outbound_token is None


async def test_we_register_with_a_cpo(stack: Stack, fake: FakePartner) -> None:
    their_token_a = fake.issue_token_a()
    registered = await cli(stack, "register", "--versions-url", fake.versions_url, "--token", their_token_a,
                           "--id", "fake-cpo")
    assert registered["status"] == "REGISTERED" and registered["roles"] == "NL/TNM CPO"
    assert registered["version"] == "2.2.1"

    partner = registry(stack).require("fake-cpo")
    token_c = partner.outbound_token  # what the CPO issued to us
    token_b = fake.token_for_peer  # what we issued to the CPO (it called us back with it during our POST)
    assert token_c is not None and token_b is not None
    assert token_c not in str(registered) and registered["token_for_partner"].endswith("chars)")
    assert fake.peer_versions_url == stack.versions_url
    assert ("GET", "/ocpi/versions", their_token_a) in fake.requests

    # Both sides call each other with the new tokens; their Token A is dead.
    assert await we_can_call(fake, token_c)
    assert not await we_can_call(fake, their_token_a)
    assert (await fake.call("GET", stack.versions_url)).status_code == 200
    pushed = await fake.call("PUT", f"{stack.base_url}/ocpi/emsp/2.2.1/sessions/NL/TNM/7",
                             json_body={**session_for("NL", "TNM"), "id": "7"})
    assert pushed.json()["status_code"] == 1000, pushed.text

    # Rotation from our side: `partners update` PUTs new credentials; old tokens die on both sides.
    updated = await cli(stack, "update", "fake-cpo")
    assert updated["status"] == "REGISTERED"
    new_b = fake.token_for_peer
    new_c = registry(stack).require("fake-cpo").outbound_token
    assert new_b not in (None, token_b) and new_c not in (None, token_c)
    # Changed by another process (the CLI): the receivers see it at their next refresh (<= 2 s).
    assert await eventually_status(fake, stack.versions_url, token_b, 401)
    assert (await fake.call("GET", stack.versions_url)).status_code == 200
    assert new_c is not None and await we_can_call(fake, new_c) and not await we_can_call(fake, token_c)

    shown = await cli(stack, "show", "fake-cpo")
    assert new_c not in json.dumps(shown) and shown["token_for_partner"].endswith("chars)")

    # Unregister from our side: the CPO forgets our token, and its token for us gets 401.
    gone = await cli(stack, "unregister", "fake-cpo")
    assert gone["status"] == "UNREGISTERED"
    assert fake.token_for_peer is None and not await we_can_call(fake, new_c)
    assert new_b is not None and await eventually_status(fake, stack.versions_url, new_b, 401)


async def test_registering_with_a_hub_needs_the_operators_hub_flag(stack: Stack, fake: FakePartner) -> None:
    """A Hub acts for any party it names in the routing headers: a partner whose credentials say HUB is registered
    only with `--hub`; without it the registration is undone on both sides."""
    fake.role = "HUB"
    refused = await cli(stack, "register", "--versions-url", fake.versions_url, "--token", fake.issue_token_a(),
                        "--id", "fake-hub", ok=False)
    assert "HUB" in str(refused) and "--hub" in str(refused)
    gone = registry(stack).get("fake-hub")
    assert gone is not None and gone.status is PartnerStatus.DELETED and not gone.is_hub
    assert fake.token_for_peer is None  # undone at the partner too (our credentials DELETE)

    hub = await cli(stack, "register", "--versions-url", fake.versions_url, "--token", fake.issue_token_a(),
                    "--id", "fake-hub", "--hub")
    assert hub["status"] == "REGISTERED" and registry(stack).require("fake-hub").is_hub


async def test_register_reports_a_partner_that_cannot_reach_us(stack: Stack, fake: FakePartner) -> None:
    """The CPO's callback goes to a versions URL where nothing listens: it answers 3001 and we say why."""
    their_token_a = fake.issue_token_a()
    env_url = "http://127.0.0.1:9/ocpi/versions"  # port 9 (discard): nothing answers
    failed = await cli_with_public_url(stack, env_url, "register", "--versions-url", fake.versions_url,
                                       "--token", their_token_a, "--id", "unreachable")
    assert "3001" in failed and "OCPI_PUBLIC_URL" in failed
    partner = registry(stack).get("unreachable")
    assert partner is None or partner.status is PartnerStatus.DELETED
    assert their_token_a in fake.tokens  # the CPO did not register us: its Token A still works


async def cli_with_public_url(stack: Stack, public: str, *args: str) -> str:
    """The CLI without the run file's URL: it tells the partner OCPI_PUBLIC_URL (here a dead one)."""
    env = {**os.environ, **as_environ(stack.settings), "OCPI_HTTP_PORT": str(stack.http_port),
           "OCPI_PUBLIC_URL": public.removesuffix("/ocpi/versions")}
    env["OCPI_DATA_DIR"] = env["OCPI_DATA_DIR"] + "-elsewhere"  # no run file there: OCPI_PUBLIC_URL counts
    assert stack.clickhouse_url
    env["OCPI_CLICKHOUSE_DSN"] = stack.clickhouse_url  # the same store, through the stack's shim
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "pipeline", "partners", *args, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 1
    return err.decode()
