"""`ocpi-pipeline settings`: every value in effect, secrets masked."""

from __future__ import annotations

from click.testing import CliRunner

from pipeline.cli import cli


def settings_output(env: dict[str, str]) -> str:
    result = CliRunner().invoke(cli, ["settings"], env={"COLUMNS": "400", **env})
    assert result.exit_code == 0, result.output
    return result.output


def test_the_clickhouse_password_in_the_dsn_is_masked() -> None:
    output = settings_output({"OCPI_CLICKHOUSE_DSN": "http://default:Sup3r-s3cret@ch.internal:8123",
                              "OCPI_ADMIN_TOKEN": "an-admin-token-of-some-length"})
    assert "Sup3r-s3cret" not in output
    assert "http://default:****@ch.internal:8123" in output
    assert "an-admin-token-of-some-length" not in output


def test_values_are_shown_as_text_not_read_as_markup() -> None:
    # OCPI_PARTY_NAME is free text: rich read '[north]' as a style (it vanished) and '[/b]' as a closing tag (crash).
    output = settings_output({"OCPI_PARTY_NAME": "Charge [north] [/b] Co"})
    assert "Charge [north] [/b] Co" in output


def test_an_admin_token_left_empty_is_not_shown_as_a_value() -> None:
    """Left empty, the admin token is random per run; `settings` showed the one it drew for itself, masked
    (`O3r…(32 chars)`), as if one were configured, and it matched no running instance's."""
    row = next(line for line in settings_output({"OCPI_ADMIN_TOKEN": ""}).splitlines() if "OCPI_ADMIN_TOKEN" in line)
    assert "(random per run)" in row and "chars)" not in row
    row = next(line for line in settings_output({"OCPI_ADMIN_TOKEN": "an-admin-token-of-some-length"}).splitlines()
               if "OCPI_ADMIN_TOKEN" in line)
    assert "an-…(29 chars)" in row
