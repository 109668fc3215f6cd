"""The embedded stack's pieces that need no broker: the shim URL handed to the children and the run file."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.clickhouse.client import chdb_path, connect
from infra.clickhouse.shim import ChdbEngine, ClickHouseShim
from infra.runfile import RunningInstance, read_running_instance, write_running_instance
from infra.settings import load_settings, private_dir
from pipeline import stack as stack_module
from pipeline.stack import Stack, StackError


@pytest.mark.clickhouse
async def test_the_shim_url_works_with_any_admin_token(chdb_dsn: str) -> None:
    # OCPI_ADMIN_TOKEN is free text: `openssl rand -base64 32` gives '/' and '+'; '%', '#', '?', '@' are as likely.
    token = "ab/cd+ef==#g?h%41i@j:k"
    connect(chdb_dsn)  # this process holds the engine, as `dev` does
    shim = await ClickHouseShim(ChdbEngine(chdb_path(chdb_dsn)), token).start()

    def use() -> list[int]:
        url = shim.dsn
        # The worker and the receivers get the URL as OCPI_CLICKHOUSE_DSN (the password comes from it);
        # `query` and `partners` read it from the run file and send the token as the password.
        from_dsn = connect(url, compress=False).query("SELECT 1").result_rows[0][0]
        with_password = connect(url, password=token, compress=False).query("SELECT 2").result_rows[0][0]
        return [from_dsn, with_password]

    try:
        assert await asyncio.to_thread(use) == [1, 2]
    finally:
        await shim.stop()


@pytest.fixture
def other_instance(tmp_path: Path) -> Iterator[RunningInstance]:
    """The run file of another `dev` holding `tmp_path` (a live process of ours stands in for it)."""
    process = subprocess.Popen(["sleep", "60"])
    try:
        instance = RunningInstance(pid=process.pid, versions_url="http://127.0.0.1:1/ocpi/versions",
                                   admin_url="http://127.0.0.1:1", clickhouse_url="http://ocpi:t@127.0.0.1:2",
                                   admin_token="t", kafka_bootstrap="127.0.0.1:3")
        write_running_instance(tmp_path, instance)
        yield instance
    finally:
        process.kill()
        process.wait()


async def test_a_second_stack_on_a_data_dir_in_use_refuses_to_start(tmp_path: Path,
                                                                    other_instance: RunningInstance) -> None:
    # Kafka configured (no embedded broker) at a closed port: nothing of ours would be left running either way.
    settings = load_settings({"OCPI_DATA_DIR": str(tmp_path), "OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    with pytest.raises(StackError, match=f"pid {other_instance.pid}"):
        await Stack(settings, run_worker=False, run_receivers=False).start()
    assert read_running_instance(tmp_path) == other_instance


async def test_stopping_a_stack_that_did_not_start_leaves_the_other_instances_run_file(
        tmp_path: Path, other_instance: RunningInstance) -> None:
    # What a second `dev` did after chDB refused it the store: its clean-up removed the first one's run file,
    # and `query`/`partners` then tried to open the store the first one holds.
    await Stack(load_settings({"OCPI_DATA_DIR": str(tmp_path)})).stop()
    assert read_running_instance(tmp_path) == other_instance


async def test_a_stack_refuses_a_port_another_server_listens_on_with_so_reuseport(tmp_path: Path) -> None:
    # granian listens with SO_REUSEPORT, so a second `dev` on the same OCPI_HTTP_PORT (another data dir) started
    # its own granian next to the first one's: the kernel then split the partners' connections between the two
    # instances, each with its own tokens, Kafka and store.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        settings = load_settings({"OCPI_DATA_DIR": str(tmp_path), "OCPI_HTTP_PORT": str(port),
                                  "OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
        with pytest.raises(StackError, match=f"127.0.0.1:{port} is in use"):
            await Stack(settings).start()


def test_serve_refuses_a_port_another_server_listens_on_with_so_reuseport(monkeypatch: pytest.MonkeyPatch) -> None:
    # `serve` starts granian directly (no Stack): next to a `dev` or another `serve` on the port, its SO_REUSEPORT
    # bind succeeded and the two split the partners' connections.
    from click.testing import CliRunner

    from pipeline.cli.services import serve

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setenv("OCPI_HTTP_PORT", str(port))
        monkeypatch.setenv("OCPI_HTTP_HOST", "127.0.0.1")
        monkeypatch.setattr("granian.server.Server.serve", lambda _server: pytest.fail("granian was started"))
        result = CliRunner().invoke(serve, [])
    assert result.exit_code == 1 and f"127.0.0.1:{port} is in use" in result.output


async def test_ctrl_c_while_the_receivers_start_does_not_wait_out_the_grace_period(tmp_path: Path) -> None:
    # Ctrl-C in `demo`/`dev` while granian was still starting: a SIGTERM that reaches granian while it spawns its
    # worker is lost (its worker "refused to gracefully stop", granian waits for it forever), so `stop` waited its
    # 20 s grace before it SIGKILLed: "Aborted!" came 22 s after Ctrl-C. Receivers that never answered have no
    # push in flight to finish. Here a child that ignores SIGTERM stands for granian in that state.
    import sys
    import time

    from infra.process import spawn

    log = tmp_path / "child.log"
    child = spawn([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print('deaf', flush=True); time.sleep(60)"], env={}, log_path=log)
    while "deaf" not in log.read_text():
        await asyncio.sleep(0.05)
    stack = Stack(load_settings({"OCPI_DATA_DIR": str(tmp_path)}), children={"receivers": child})
    started = time.monotonic()
    await stack.stop()
    assert child.poll() is not None and time.monotonic() - started < 10


async def test_the_data_dir_a_stack_creates_is_its_owners_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                ) -> None:
    """The data dir holds the embedded store (the partners' records with the tokens we call them with, in clear;
    token uids and contract ids until pseudonymised), the Faust state and the logs: created readable by every
    local user (umask 022), the run file's 0600 protected nothing those files do not give away."""
    data_dir = tmp_path / "new" / "data"

    def no_broker(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no broker in this test")

    monkeypatch.setattr(stack_module, "ensure_topics", no_broker)  # the start stops after creating the data dir
    settings = load_settings({"OCPI_DATA_DIR": str(data_dir), "OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    with pytest.raises(RuntimeError, match="no broker"):
        await Stack(settings, run_worker=False, run_receivers=False).start()
    assert data_dir.stat().st_mode & 0o777 == 0o700, oct(data_dir.stat().st_mode)


def test_the_worker_and_the_embedded_store_create_their_directories_owner_only(tmp_path: Path) -> None:
    created = private_dir(tmp_path / "data" / "faust")
    assert created.is_dir() and created.stat().st_mode & 0o777 == 0o700
    # and the data dir it created on the way (`migrate` on a fresh one: the store is OCPI_DATA_DIR/clickhouse)
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o750)
    private_dir(existing)  # an operator's own directory keeps the mode it was given
    assert existing.stat().st_mode & 0o777 == 0o750


def test_an_embedded_broker_that_exited_stops_dev(tmp_path: Path) -> None:
    """`dev` checks its children every second and stops, naming the one that exited; its embedded broker was not
    among them: Tansu gone (killed, out of memory), nobody starts it again, and `dev` ran on with every push
    answered 3000 and nothing said."""
    from infra.kafka.embedded import EmbeddedBroker

    dead = subprocess.Popen(["sh", "-c", "exit 137"])
    dead.wait()
    broker = EmbeddedBroker(port=1)
    broker.process = dead
    stack = Stack(load_settings({"OCPI_DATA_DIR": str(tmp_path)}), broker=broker)
    with pytest.raises(StackError) as stopped:
        stack.check_children()
    assert "embedded Kafka broker exited with code 137" in str(stopped.value)
    assert "tansu.log" in str(stopped.value)
