"""The job commands' own logic around the jobs (`pipeline/cli/jobs.py`), with the jobs themselves faked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import TopicPartition
from click.testing import CliRunner, Result

import pipeline.cli.jobs
import pipeline.jobs.replay
from pipeline.cli import cli
from pipeline.jobs.replay import ReplayReport


def test_replay_wait_run_again_after_its_wait_was_cut_short_still_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`replay --wait` whose wait timed out (or was interrupted: "the events are in Kafka already"), run again to go
    on waiting: the job is done, so the rerun printed "completed before" and returned, exit 0, without waiting for
    the worker it was asked to wait for."""
    written = {TopicPartition("ocpi.sessions", 0): 12}
    waited: list[dict[TopicPartition, int]] = []

    async def done(*_args: Any, **_kwargs: Any) -> ReplayReport:
        return ReplayReport(job="replay-x", status="already-done", sent=6, written=dict(written))

    async def wait_for_replayed(_settings: Any, _bootstrap: str, targets: dict[TopicPartition, int], *,
                                timeout: float) -> None:
        waited.append(dict(targets))

    monkeypatch.setattr(pipeline.jobs.replay, "replay_kafka", done)
    monkeypatch.setattr(pipeline.jobs.replay, "wait_for_replayed", wait_for_replayed)
    result = CliRunner().invoke(cli, ["replay", "--module", "sessions", "--wait"],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path)})

    assert result.exit_code == 0, (result.output, result.exception)
    assert "completed before" in result.output
    assert waited == [written] and "the pipeline has consumed them" in result.output


@pytest.mark.parametrize("timeout", ["nan", "inf", "0", "-5"])
def test_a_replay_timeout_that_cannot_end_or_cannot_wait_is_refused_before_anything_runs(
        timeout: str, tmp_path: Path) -> None:
    """nan passed (every comparison with it is false: the wait never timed out), and so did 0 or less."""
    result = CliRunner().invoke(cli, ["replay", "--wait", "--timeout", timeout],
                                env={"OCPI_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 2, result.output
    assert "finite number of seconds" in result.output


@pytest.mark.parametrize("name", ["../elsewhere", "/var/x", "a/b", ".hidden", "", "two words"])
def test_a_job_name_that_is_not_a_plain_name_is_refused_before_anything_runs(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--job names the job's files under OCPI_DATA_DIR/jobs/replay/ (checkpoint, lock, ids sent): `--job ../x` put them
    in another directory, `--job /var/x` anywhere on the disk (an absolute name replaces the directory), and `--job
    a/b` in a subdirectory no other run looks in; `--job ""` was taken for no name. A name is letters, digits, '.',
    '_' and '-', not starting with '.'."""
    ran: list[str] = []

    async def replay_kafka(*_args: Any, **_kwargs: Any) -> ReplayReport:
        ran.append("replay")
        return ReplayReport(job="x", status="done")

    monkeypatch.setattr(pipeline.jobs.replay, "replay_kafka", replay_kafka)
    result = CliRunner().invoke(cli, ["replay", "--job", name],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Invalid value for '--job'" in result.output and not ran
    result = CliRunner().invoke(cli, ["replay", "--job", "restore-2024.05_a"],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0, (result.output, result.exception)
    assert ran == ["replay"]


def test_an_export_that_found_records_gone_before_they_were_archived_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offsets Kafka's retention removed before an export archived them are lost to the archive for good (a rerun
    goes on after them). The export said so in yellow and exited 0, so a scheduled export never alerted anyone; it
    now writes what it could and exits 1, naming the ranges."""
    import pipeline.jobs.archive

    async def lost(*_args: Any, **_kwargs: Any) -> pipeline.jobs.archive.ExportResult:
        result = pipeline.jobs.archive.ExportResult()
        result.records["cdrs"] = 5
        result.lost.append("ocpi.cdrs/0 offsets 10-19")
        return result

    monkeypatch.setattr(pipeline.jobs.archive, "export_from_kafka", lost)
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "archive"), "--module", "cdrs"],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 1, (result.output, result.exception)
    assert "ocpi.cdrs/0 offsets 10-19" in result.output and "cdrs" in result.output


def test_an_export_from_clickhouse_that_could_not_archive_some_raw_events_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `raw_events` row is an event the pipeline accepted (a CDR billed, say); one that cannot be rebuilt as an
    OcpiEvent today (stored under rules of an earlier version) is not archived, by this run or any rerun. The
    export counted it among "undecodable records skipped" and exited 0: a scheduled export never alerted anyone,
    and the archive meant to outlive the TTL lacked it when the TTL took the row."""
    import pipeline.jobs.archive

    class Client:
        def close(self) -> None:
            pass

    def undecodable(*_args: Any, **_kwargs: Any) -> pipeline.jobs.archive.ExportResult:
        result = pipeline.jobs.archive.ExportResult()
        result.records["cdrs"] = 5
        result.undecodable = 2
        return result

    monkeypatch.setattr(pipeline.jobs.archive, "export_from_clickhouse", undecodable)
    monkeypatch.setattr(pipeline.cli.jobs, "connect_for", lambda *_a, **_k: Client())
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "archive"), "--module", "cdrs", "--source",
                                      "clickhouse"], env={"OCPI_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 1, (result.output, result.exception)
    assert "2 raw events" in result.output


def refused_before_replaying(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    """Run a command line (`{tmp}` is `tmp_path`); assert it is a usage error (exit 2) that replayed nothing."""
    ran: list[str] = []

    async def replay(*_args: Any, **_kwargs: Any) -> ReplayReport:
        ran.append("replay")
        return ReplayReport(job="x", status="done")

    monkeypatch.setattr(pipeline.jobs.replay, "replay_kafka", replay)
    monkeypatch.setattr(pipeline.jobs.replay, "replay_archive", replay)
    result = CliRunner().invoke(cli, [a.format(tmp=tmp_path) for a in args],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 2 and not ran, (result.output, result.exception, ran)
    return result


@pytest.mark.parametrize("args", [
    ["replay", "--since", ""],
    ["replay", "--until", " "],
    ["replay", "--from-archive", "{tmp}", "--since", ""],
    ["pull", "--partner", "cpo-be", "--module", "cdrs", "--since", ""],
    ["pull", "--partner", "cpo-be", "--module", "cdrs", "--until", ""],
    ["replay", "--rebuild", "--since", ""],
])
def test_an_empty_time_is_refused_not_taken_for_none(args: list[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`--since ""` (a script's unset variable, `--since "$SINCE"`) was taken for no --since: the replay replayed
    every event the topics hold, the pull went on from where the pulls ended, as if asked, and `replay --rebuild`
    took it for no selection and rebuilt."""
    result = refused_before_replaying(args, tmp_path, monkeypatch)
    assert "is not a time" in result.output or "it takes no selection" in result.output


@pytest.mark.parametrize("args", [
    ["replay", "--partner", ""],
    ["replay", "--partner", " "],
    ["replay", "--from-archive", "{tmp}", "--partner", ""],
    ["replay", "--dry-run", "--partner", ""],
])
def test_an_empty_partner_is_refused_not_taken_for_a_partner_id(args: list[str], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`replay --partner ""` (a script's unset variable, `--partner "$PARTNER"`) selected the events of partner id "",
    which no event has: the replay sent nothing and exited 0, as if the partner's events had been replayed."""
    result = refused_before_replaying(args, tmp_path, monkeypatch)
    assert "Invalid value for '--partner'" in result.output


@pytest.mark.parametrize("source", ["kafka", "clickhouse"])
@pytest.mark.parametrize("directory", ["", " "])
def test_an_empty_export_directory_is_refused_not_taken_for_the_current_one(
        directory: str, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`export ""` (a script's unset variable, `export "$ARCHIVE"`) was taken for `.`: the archive went into whatever
    directory the command ran in."""
    import pipeline.jobs.archive

    ran: list[Path] = []

    async def from_kafka(_settings: Any, _bootstrap: str, into: Path, *_args: Any,
                         **_kwargs: Any) -> pipeline.jobs.archive.ExportResult:
        ran.append(into)
        return pipeline.jobs.archive.ExportResult()

    monkeypatch.setattr(pipeline.jobs.archive, "export_from_kafka", from_kafka)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["export", directory, "--source", source],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path / "data"),
                                     "OCPI_CLICKHOUSE_DSN": "http://default:x@127.0.0.1:1"})
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Invalid value for 'DIRECTORY'" in result.output and not ran
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["data"])
    if source == "kafka":  # the current directory, asked for as such, is still an archive's directory
        result = CliRunner().invoke(cli, ["export", "."], env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1",
                                                               "OCPI_DATA_DIR": str(tmp_path / "data")})
        assert result.exit_code == 0, (result.output, result.exception)
        assert ran == [Path()]


@pytest.mark.parametrize("limit", ["0", "-3"])
@pytest.mark.parametrize("schedule", [[], ["--schedule", "60"]])
def test_a_pull_limit_below_one_is_refused_before_anything_connects(limit: str, schedule: list[str], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`pull --limit 0` was refused by the job, after the command had connected to the store and the partner
    registry; with --schedule every round failed so, "next round as scheduled", for ever."""
    import infra.clickhouse.client
    import pipeline.cli.jobs

    def connect_for(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("connected before refusing the limit")

    monkeypatch.setattr(pipeline.cli.jobs, "connect_for", connect_for)
    monkeypatch.setattr(infra.clickhouse.client, "connect_for", connect_for)
    result = CliRunner().invoke(cli, ["pull", "--partner", "cpo-be", "--module", "cdrs", "--limit", limit, *schedule],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Invalid value for '--limit'" in result.output


@pytest.mark.parametrize("args", [["--wait"], ["--no-wait"], ["--wait", "--dry-run"]])
def test_rebuild_refuses_wait_it_cannot_honour(args: list[str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`replay --rebuild --wait` (or --no-wait) was accepted and ignored: a rebuild waits for its own worker, always,
    and has no replayed records for the live worker to consume. The option is refused with --rebuild, as the
    selection options are."""
    import pipeline.jobs.rebuild

    ran: list[str] = []

    async def rebuild(*_args: Any, **_kwargs: Any) -> Any:
        ran.append("rebuild")
        raise AssertionError("rebuilt")

    monkeypatch.setattr(pipeline.jobs.rebuild, "rebuild", rebuild)
    monkeypatch.setattr(pipeline.jobs.rebuild, "source_targets", rebuild)
    result = CliRunner().invoke(cli, ["replay", "--rebuild", *args],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 2, (result.output, result.exception)
    assert "--wait" in result.output and not ran


def test_a_pull_splay_without_a_schedule_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pull --splay 30` without --schedule was accepted and ignored: one pull ran at once, with no delay."""
    import infra.clickhouse.client
    import pipeline.cli.jobs

    def connect_for(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("connected before refusing --splay")

    monkeypatch.setattr(pipeline.cli.jobs, "connect_for", connect_for)
    monkeypatch.setattr(infra.clickhouse.client, "connect_for", connect_for)
    result = CliRunner().invoke(cli, ["pull", "--partner", "cpo-be", "--module", "cdrs", "--splay", "30"],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 2, (result.output, result.exception)
    assert "--splay" in result.output and "--schedule" in result.output


@pytest.mark.parametrize(("args", "named"), [
    (["--module", "locations", "--full", "--since", "1d"], "--since"),
    (["--module", "sessions", "--full"], "Sessions"),
    (["--module", "cdrs", "--no-full-sync"], "Locations"),
])
def test_full_sync_options_that_mean_nothing_are_refused(args: list[str], named: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`--full` reads a list without date_from (none with --since; Sessions have none), and full sync is of
    Locations only: refused before anything connects, not ignored."""
    import infra.clickhouse.client
    import pipeline.cli.jobs

    def connect_for(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("connected before refusing the options")

    monkeypatch.setattr(pipeline.cli.jobs, "connect_for", connect_for)
    monkeypatch.setattr(infra.clickhouse.client, "connect_for", connect_for)
    result = CliRunner().invoke(cli, ["pull", "--partner", "cpo-be", *args],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 2, (result.output, result.exception)
    assert named in result.output


def test_a_rebuild_whose_migration_fails_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`replay --rebuild` migrates its fresh database: a migration ClickHouse refused there (a user without the
    CREATE DATABASE grant) ended in a MigrationError traceback."""
    import pipeline.jobs.rebuild
    from infra.clickhouse.migrations import MigrationError

    async def rebuild(*_args: Any, **_kwargs: Any) -> Any:
        raise MigrationError("cannot read or create the migration ledger `ocpi_rebuild_1`.schema_migrations: "
                             "Code: 497. ACCESS_DENIED")

    monkeypatch.setattr(pipeline.jobs.rebuild, "rebuild", rebuild)
    result = CliRunner().invoke(cli, ["replay", "--rebuild"],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.output.strip().splitlines()[-1].startswith("Error: cannot read or create the migration ledger")
