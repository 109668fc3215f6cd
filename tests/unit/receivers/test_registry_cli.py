"""`ocpi-pipeline partners ...` on the local registry: script-readable output, masking, clean errors.

The handshake commands (register, update, unregister, rotate of a registered partner) run against a real
server and a fake CPO in tests/integration/test_handshake.py; here they only meet their error paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from infra.clickhouse.client import connect
from infra.kafka.embedded import free_port
from infra.runfile import RunningInstance, write_running_instance
from infra.settings import Settings, as_environ
from ocpi.model import Endpoint, InterfaceRole
from pipeline.cli import cli
from receivers.registry import (
    Origin,
    PartnerRegistry,
    PartnerStatus,
    TokenKind,
    TokenState,
    credentials_role,
    hash_token,
)

pytestmark = pytest.mark.clickhouse


class Cli:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = {**as_environ(settings), "OCPI_ADMIN_TOKEN": "test-admin-token"}

    def __call__(self, *args: str, ok: bool = True) -> Result:
        result = CliRunner().invoke(cli, ["partners", *args], env=self.env, catch_exceptions=False)
        assert (result.exit_code == 0) is ok, result.output
        assert "Traceback" not in result.output
        return result

    def registry(self) -> PartnerRegistry:
        client = connect(self.settings.clickhouse_dsn)
        client.database = self.settings.clickhouse.database
        return PartnerRegistry(client)


@pytest.fixture
def run(settings_for: Callable[..., Settings]) -> Cli:
    return Cli(settings_for())


def fields(output: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in output.strip().splitlines())


def test_invite_prints_a_token_a_and_our_versions_url(run: Cli) -> None:
    out = run("invite", "cpo-acme", "--name", "ACME", "--compat", "RAW_TOKEN,datetime_offset")
    assert list(fields(out.output)) == ["partner_id", "token_a", "versions_url"]
    values = fields(out.output)
    assert values["partner_id"] == "cpo-acme"
    assert values["versions_url"] == f"{run.settings.http.base_url}/ocpi/versions"
    partner = run.registry().require("cpo-acme")
    assert partner.status is PartnerStatus.INVITED and partner.name == "ACME"
    assert partner.profile.raw_token and [t.sha256 for t in partner.valid_tokens()] == [hash_token(values["token_a"])]
    again = run("invite", "cpo-acme", ok=False)
    assert "exists already" in again.output
    assert "unknown compatibility relaxation" in run("invite", "other", "--compat", "NOPE", ok=False).output


def test_versions_url_of_a_running_instance(run: Cli, tmp_path: Path) -> None:
    write_running_instance(run.settings.storage.path, RunningInstance(
        pid=os.getpid(), versions_url="http://127.0.0.1:9999/ocpi/versions", admin_url="", clickhouse_url="",
        admin_token="x", kafka_bootstrap=""))
    assert fields(run("invite", "cpo").output)["versions_url"] == "http://127.0.0.1:9999/ocpi/versions"


def test_list_and_show_mask_every_token(run: Cli) -> None:
    registry = run.registry()
    token_a = fields(run("invite", "invited").output)["token_a"]
    partner, token_c = registry.register_direct("bec", "BEC", [credentials_role(country_code="BE", party_id="BEC",
                                                                                role="CPO")])
    partner.outbound_token = "secret-outbound-token-value"
    partner.endpoints = [Endpoint(identifier="credentials", role=InterfaceRole.SENDER, url="http://x/c")]
    registry.save(partner)
    outputs = [run("list").output, run("list", "--format", "json").output, run("show", "bec").output,
               run("show", "bec", "--format", "json").output]
    for output in outputs:
        for secret in (token_a, token_c, "secret-outbound-token-value"):
            assert secret not in output
    listed = {p["partner_id"]: p for p in json.loads(outputs[1])}
    assert listed["bec"]["outbound_token"] == "sec…(27 chars)" and listed["invited"]["status"] == "INVITED"
    shown = outputs[2]
    assert "token_for_partner: sec…(27 chars)" in shown
    assert "endpoint: credentials SENDER http://x/c" in shown
    assert "roles: BE/BEC CPO" in shown and "token: C ACTIVE" in shown
    assert "no partner 'nobody'" in run("show", "nobody", ok=False).output


def test_list_shows_a_partners_own_values_as_they_are(run: Cli) -> None:
    """A party id is a CiString(3) the partner chose at registration, brackets included: rich must not read it as
    markup (`[/]` crashed the listing with a MarkupError, `[b]` vanished)."""
    run("list")  # migrates the store
    registry = run.registry()
    registry.register_direct("odd", "Odd", [credentials_role(country_code="NL", party_id="[/]", role="CPO"),
                                            credentials_role(country_code="NL", party_id="[b]", role="CPO")])
    output = run("list").output
    assert "NL/[/] CPO" in output and "NL/[b] CPO" in output, output


def test_rotate_suspend_resume_compat_delete(run: Cli) -> None:
    old_a = fields(run("invite", "invited").output)["token_a"]
    new_a = fields(run("rotate", "invited").output)["token_a"]
    states = {t.sha256: t.state for t in run.registry().require("invited").inbound_tokens}
    assert states == {hash_token(old_a): TokenState.REVOKED, hash_token(new_a): TokenState.ACTIVE}

    registry = run.registry()
    _, old_token = registry.register_direct("bec", "BEC", [credentials_role(country_code="BE", party_id="BEC",
                                                                            role="CPO")])
    new_token = fields(run("rotate", "bec").output)["token"]
    valid = {t.sha256 for t in run.registry().require("bec").valid_tokens()}
    assert valid == {hash_token(new_token)} and hash_token(old_token) not in valid

    assert fields(run("suspend", "bec").output)["status"] == "SUSPENDED"
    assert "nothing to suspend" in run("suspend", "bec", ok=False).output
    # Provisioned by an operator: rotated locally, no partner answer needed, so also while suspended (docs said not).
    suspended_token = fields(run("rotate", "bec").output)["token"]
    assert {t.sha256 for t in run.registry().require("bec").valid_tokens()} == {hash_token(suspended_token)}
    assert fields(run("resume", "bec").output)["status"] == "REGISTERED"
    assert fields(run("compat", "bec", "DATETIME_OFFSET,RAW_TOKEN").output)["compat"] == "RAW_TOKEN,DATETIME_OFFSET"
    assert run.registry().require("bec").profile.raw_token
    assert fields(run("compat", "bec").output)["compat"] == "strict"
    assert "unknown compatibility relaxation" in run("compat", "bec", "LOOSE", ok=False).output
    assert fields(run("delete", "bec", "--yes").output)["status"] == "DELETED"
    assert "bec" not in run("list").output
    assert "bec" in run("list", "--all").output


def test_handshake_commands_fail_with_one_clear_line(run: Cli) -> None:
    closed = f"http://127.0.0.1:{free_port()}/ocpi/versions"
    failed = run("register", "--versions-url", closed, "--token", "their-token-a", ok=False)
    assert closed in failed.output and "their-token-a" not in failed.output
    assert "Error:" in failed.output and len(failed.output.strip().splitlines()) == 1
    assert run.registry().get("127-0-0-1-" + closed.split(":")[2].split("/")[0]) is None  # nothing stored
    run.registry().register_direct("bec", "BEC", [credentials_role(country_code="BE", party_id="BEC", role="CPO")])
    assert "credentials handshake" in run("update", "bec", ok=False).output
    assert "credentials handshake" in run("unregister", "bec", ok=False).output
    assert "no partner" in run("update", "nobody", ok=False).output


def handshake_partner(run: Cli, status: PartnerStatus) -> None:
    """A partner registered through the handshake (it holds a token for us and we one for it), now `status`."""
    registry = run.registry()
    partner, _ = registry.register_direct("cpo", "CPO", [credentials_role(country_code="NL", party_id="TNM",
                                                                          role="CPO")])
    partner.origin = Origin.US
    partner.outbound_token, partner.versions_url = "their-token-for-us", "http://127.0.0.1:9/ocpi/versions"
    registry.save(partner)
    if status is PartnerStatus.UNREGISTERED:
        registry.unregister(partner)  # a credentials DELETE: the token we held for it is dropped
    else:
        registry.set_status("cpo", status)


@pytest.mark.parametrize("status", [PartnerStatus.SUSPENDED, PartnerStatus.UNREGISTERED])
def test_a_handshake_partner_in_the_wrong_state_is_told_so_truly(run: Cli, status: PartnerStatus) -> None:
    """`update`/`unregister`/`rotate` of a partner registered through the handshake but now suspended or
    unregistered said "SUSPENDED without a credentials handshake" / "nothing to rotate here": false, and no hint
    that a suspended one must be resumed first."""
    run("list")  # migrates the store
    handshake_partner(run, status)
    for command in ("update", "unregister", "rotate"):
        output = run(command, "cpo", ok=False).output
        assert f"is {status.value}" in output and "without a credentials handshake" not in output, output
        assert ("partners resume" in output) is (status is PartnerStatus.SUSPENDED), output


def test_show_gives_a_revoked_token_no_validity_end(run: Cli) -> None:
    """A token retired with a grace and revoked later was shown as `C REVOKED until <end of the grace>`."""
    run("list")
    registry = run.registry()
    partner, _ = registry.register_direct("bec", "BEC", [credentials_role(country_code="BE", party_id="BEC",
                                                                          role="CPO")])
    partner.issue_token(TokenKind.C)
    partner.retire_tokens(keep=[partner.inbound_tokens[-1].sha256], grace_s=30)
    partner.revoke_tokens()
    registry.save(partner)
    lines = [line for line in run("show", "bec").output.splitlines() if line.startswith("token: ")]
    assert len(lines) == 2 and all("REVOKED" in line and "until" not in line for line in lines), lines


def test_dev_says_where_the_first_partner_stands(run: Cli) -> None:
    """`dev` printed "first-cpo is registered already" for a first partner suspended, unregistered or deleted,
    which has no working token."""
    from pipeline.cli.services import FIRST_PARTNER, first_partner_line

    run("list")  # migrates the store
    registry = run.registry()
    assert first_partner_line(registry).startswith(f"Token A ({FIRST_PARTNER}): ")  # invited now
    again = first_partner_line(registry)
    assert again.startswith(f"Token A ({FIRST_PARTNER}): ") and again != first_partner_line(registry)  # reinvited
    registry.set_status(FIRST_PARTNER, PartnerStatus.SUSPENDED)
    assert first_partner_line(registry).startswith(f"{FIRST_PARTNER} is suspended ")
    registry.delete(FIRST_PARTNER)
    line = first_partner_line(registry)
    assert line.startswith(f"{FIRST_PARTNER} is deleted ") and "registered" not in line
