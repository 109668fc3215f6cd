"""`ocpi-pipeline demo`: the settings it runs its own stack with."""

from __future__ import annotations

import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from rich.console import Console

from infra.settings import Settings
from pipeline.cli import cli
from pipeline.cli.services import print_summary
from pipeline.demo import DemoSummary, PartyTotals, settled_summary
from pipeline.simulator import Expected, SimulatedCpo, SimulatedParty
from pipeline.stack import Stack, StackError


def test_the_demo_pushes_to_its_own_receivers_whatever_the_public_url(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """The demo runs its own stack on a free port, but kept OCPI_PUBLIC_URL: its simulated CPOs pushed to
    `Stack.base_url`, the production receivers' public address (or the container's, in docker-compose), not to
    the demo's own receivers."""
    settings = _demo_settings(monkeypatch, tmp_path, {"OCPI_PUBLIC_URL": "https://ocpi.example.com",
                                                      "OCPI_HTTP_PORT": "8080"})
    stack = Stack(settings, http_port=40123)
    assert stack.base_url == "http://127.0.0.1:40123"
    assert stack.child_environment()["OCPI_PUBLIC_URL"] == "http://127.0.0.1:40123"


def test_the_demo_checks_no_token_parties_whatever_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """OCPI_TOKEN_PARTIES (the operator's eMSP parties, in its environment or docker-compose's) applied to the demo's
    own stack: the simulated CPOs' CDRs carry tokens of their own eMSP parties (CC/EMS), each then flagged
    CDR_OF_ANOTHER_EMSP, an anomaly the demo counts as a mismatch: it exited 1 on a sound pipeline."""
    settings = _demo_settings(monkeypatch, tmp_path, {"OCPI_TOKEN_PARTIES": "XX/ABC"})
    assert settings.pipeline.token_parties == ""
    assert Stack(settings, http_port=40123).child_environment()["OCPI_TOKEN_PARTIES"] == ""


def _demo_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> Settings:
    """The settings `demo` runs its stack with, in the environment `env`."""
    seen: list[Settings] = []

    async def fake_run_demo(settings: Settings, **_options: Any) -> None:
        seen.append(settings)
        raise StackError("stopped by the test")

    monkeypatch.setattr("pipeline.cli.services.run_demo", fake_run_demo)
    result = CliRunner().invoke(cli, ["demo", "--data-dir", str(tmp_path / "demo")], env=env)
    assert "stopped by the test" in result.output, result.output
    return seen[0]


def test_the_demo_refuses_a_data_dir_that_holds_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The demo checks that ClickHouse holds exactly what its CPOs pushed. Run again with the same `--data-dir`
    (README's examples run `demo --data-dir ./demo-data` in two sections), it pushed the same ids over the first
    run's rows, waited out --timeout and exited 1 with a page of mismatches; and on an operator's data dir it
    would have written its simulated partners and CDRs into the real store."""
    started: list[Settings] = []

    async def fake_run_demo(settings: Settings, **_options: Any) -> None:
        started.append(settings)
        raise StackError("stopped by the test")

    monkeypatch.setattr("pipeline.cli.services.run_demo", fake_run_demo)
    used = tmp_path / "demo"
    (used / "clickhouse").mkdir(parents=True)
    result = CliRunner().invoke(cli, ["demo", "--data-dir", str(used)])
    assert result.exit_code == 1
    assert f"--data-dir {used} is not empty" in result.output, result.output
    assert not started
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["demo", "--data-dir", str(empty)])
    assert "stopped by the test" in result.output, result.output


@pytest.mark.parametrize("args", [["--sessions", "-3"], ["--timeout", "0"], ["--timeout", "-1"], ["--timeout", "nan"],
                                  ["--timeout", "inf"]])
def test_the_demo_refuses_a_negative_count_or_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     args: list[str]) -> None:
    """`demo --sessions -3` started the whole stack, pushed the Locations, showed a progress bar of 0/-3 and
    ended in a page of mismatches; a timeout of 0 or less failed every run the same way. So did nan, which passed
    click.FloatRange (every comparison with it is false): the wait for the rows never polled, and the demo
    reported that ClickHouse did not match, exit 1; inf waited for ever on a stack that did not settle."""
    started: list[Settings] = []

    async def fake_run_demo(settings: Settings, **_options: Any) -> None:
        started.append(settings)
        raise StackError("stopped by the test")

    monkeypatch.setattr("pipeline.cli.services.run_demo", fake_run_demo)
    result = CliRunner().invoke(cli, ["demo", "--data-dir", str(tmp_path / "demo"), *args])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{args[0]}'" in result.output
    assert not started


def _summary(parties: list[PartyTotals]) -> DemoSummary:
    return DemoSummary(sessions=0, cdrs=0, raw_events=0, dead_letters=0, parties=parties, outcomes={},
                       anomalies={}, reconciliation={}, credit_links={}, expected=Expected(), seconds=1.0)


def test_the_billing_summary_never_cuts_a_figure() -> None:
    """On a terminal of 80 columns (rich's width too when the output is piped) the summary showed the cost incl.
    VAT as `2950.13…`: a billing total cut short. At 80 columns figures of the demo's size are printed whole."""
    parties = [PartyTotals("BE", "BEC", "EUR", 150, 166, Decimal("5775.5218"), Decimal("2438.1267"),
                           Decimal("2950.1312")),
               PartyTotals("NL", "TNM", "EUR", 12345, 23456, Decimal("12345.1234"), Decimal("98765.9876"),
                           Decimal("99999.6050"))]
    console = Console(width=80, record=True)
    print_summary(console, _summary(parties))
    text = console.export_text()
    for party in parties:
        for figure in (party.sessions, party.cdrs, party.kwh, party.cost_excl_vat, party.cost_incl_vat):
            assert f" {figure} " in text, (figure, text)


def test_a_figure_too_wide_for_the_terminal_is_folded_not_elided() -> None:
    party = PartyTotals("NL", "TNM", "EUR", 1, 1, Decimal("1.5"), Decimal("987654321.9876"), Decimal("1.2"))
    console = Console(width=40, record=True)
    print_summary(console, _summary([party]))
    text = console.export_text()
    assert "…" not in text
    column = text.splitlines()[text.splitlines().index(next(line for line in text.splitlines() if "NL" in line)):]
    assert "987654321.9876" in "".join(line.split("│")[6].strip() for line in column if line.count("│") == 8)


def test_home_charging_compensation_is_printed_apart_from_the_billing_totals() -> None:
    # Owed to drivers, not charging revenue: its own table, only when the store holds some.
    summary = _summary([PartyTotals("NL", "TNM", "EUR", 1, 1, Decimal("10"), Decimal("3.5"), Decimal("4.2"))])
    console = Console(width=200, record=True)
    print_summary(console, summary)
    assert "Home charging compensation" not in console.export_text()
    summary.compensation.append(PartyTotals("NL", "TNM", "EUR", 0, 2, Decimal("7.0000"), Decimal("1.2500"),
                                            Decimal("1.5100")))
    console = Console(width=200, record=True)
    print_summary(console, summary)
    text = console.export_text()
    home = text[text.index("Home charging compensation"):]
    assert all(figure in home for figure in ("7.0000", "1.2500", "1.5100")), text
    assert "3.5" not in home, text

def test_the_pushes_acknowledged_are_counted_once_each() -> None:
    """A push answered 3000 is sent again, and `Expected.pushes` counts every request: the summary printed
    requests minus refused pushes as acknowledged, so a push acknowledged on its second attempt showed as two
    acknowledged pushes ("3 of 3" for two pushes and a resend)."""
    summary = _summary([])
    summary.expected.pushes, summary.expected.events, summary.expected.rejected = 4, 2, 1  # one resent once
    console = Console(width=200, record=True)
    print_summary(console, summary)
    assert "pushes acknowledged: 2 of 3 (1 resent after a 3000 answer)" in console.export_text()


def test_a_wrong_setting_leaves_no_temporary_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The demo made its temporary data directory before it read the settings: a wrong value stopped it with the
    message naming the variable, and left an empty ocpi-demo-* directory behind on every run."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = CliRunner().invoke(cli, ["demo"], env={"OCPI_TOPIC_PARTITIONS": "abc"})
    assert result.exit_code == 1
    assert "OCPI_TOPIC_PARTITIONS" in result.output, result.output
    assert not list(tmp_path.iterdir())


async def test_a_mismatch_read_while_rows_are_still_landing_is_read_again() -> None:
    """The wait counts some tables only; a current-state row inserted beside them may be visible a moment later.
    One read in that moment failed a good demo: the summary is read again while it mismatches, up to a bound."""
    reads = [_summary([]), _summary([])]
    reads[0].mismatches.append("NL/TNM/S1: status ACTIVE, expected COMPLETED")
    assert (await settled_summary(lambda: reads.pop(0), recheck_s=5.0)).matches_expected
    persisting = _summary([])
    persisting.mismatches.append("a CDR missing")
    assert not (await settled_summary(lambda: persisting, recheck_s=0.6)).matches_expected


def test_a_failed_demo_keeps_the_log_its_message_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A part of the stack that fails (a worker that exits) stops the demo with "see <data dir>/logs/worker.log";
    the demo then removed its temporary data directory, that log with it, before the message was printed. A failed
    run keeps the directory and says where it is; a good run removes it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    async def failing_run_demo(settings: Settings, **_options: Any) -> None:
        log = settings.storage.path / "logs" / "worker.log"
        log.parent.mkdir(parents=True)
        log.write_text("Traceback: the worker's reason\n")
        raise StackError(f"the worker exited with code 1; see {log}")

    monkeypatch.setattr("pipeline.cli.services.run_demo", failing_run_demo)
    result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 1
    [kept] = tmp_path.glob("ocpi-demo-*")
    assert (kept / "logs" / "worker.log").read_text() == "Traceback: the worker's reason\n"
    assert f"see {kept / 'logs' / 'worker.log'}" in result.output, result.output
    assert f"kept in {kept}" in result.output, result.output


def test_a_demo_whose_store_does_not_match_keeps_its_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A run that ends with mismatches exits 1 listing them; its store and logs are what tell why, so they are
    kept (and named) rather than removed with the temporary directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    async def mismatching_run_demo(settings: Settings, **_options: Any) -> DemoSummary:
        (settings.storage.path / "logs").mkdir(parents=True)
        summary = _summary([])
        summary.mismatches.append("1 dead letters: records the pipeline could not process")
        return summary

    monkeypatch.setattr("pipeline.cli.services.run_demo", mismatching_run_demo)
    result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 1
    [kept] = tmp_path.glob("ocpi-demo-*")
    assert f"kept in {kept}" in result.output, result.output

    async def matching_run_demo(settings: Settings, **_options: Any) -> DemoSummary:
        (settings.storage.path / "logs").mkdir(parents=True)
        return _summary([])

    kept.rename(tmp_path / "earlier")
    monkeypatch.setattr("pipeline.cli.services.run_demo", matching_run_demo)
    result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob("ocpi-demo-*"))


def test_receivers_that_exit_while_the_cpos_push_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Receivers that died under the pushes (killed, out of memory) ended the demo in a page of httpx traceback,
    `httpx.ReadError`, which named neither the receivers nor their log (nor the kept data directory): the demo
    says which part exited, and where its log and data are."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stopped: list[bool] = []

    class ReceiversGone:
        clickhouse = object()
        base_url = "http://127.0.0.1:1"

        def __init__(self, settings: Settings) -> None:
            self.log = settings.storage.path / "logs" / "receivers.log"

        async def start(self) -> ReceiversGone:
            self.log.parent.mkdir(parents=True)
            self.log.write_text("killed\n")
            return self

        def check_children(self) -> None:
            raise StackError(f"the receivers exited with code -9; see {self.log}")

        async def stop(self) -> None:
            stopped.append(True)

    async def read_error(*_args: Any) -> Expected:
        raise httpx.ReadError("")

    monkeypatch.setattr("pipeline.demo.Stack", ReceiversGone)
    monkeypatch.setattr("pipeline.demo.provision_demo_partners",
                        lambda _client: {"demo-cpo-nl": ("token", [SimulatedParty("NL", "TNM")])})
    monkeypatch.setattr(SimulatedCpo, "run", read_error)
    result = CliRunner().invoke(cli, ["demo", "--sessions", "1"])
    assert result.exit_code == 1
    [kept] = tmp_path.glob("ocpi-demo-*")
    assert f"the receivers exited with code -9; see {kept / 'logs' / 'receivers.log'}" in result.output, result.output
    assert f"kept in {kept}" in result.output, result.output
    assert stopped == [True]
