"""The worker's data dir: created owner-only, as `dev` creates it (README: the store, secrets, Faust state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.settings import load_settings
from pipeline import worker


class Started(Exception):
    """The start got past the key check."""


def test_a_worker_creates_its_data_dir_owner_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key check (the generated pseudonymisation key under OCPI_DATA_DIR/secrets) ran first and created the
    data dir with the umask's mode (0755): `private_dir` then found it existing and left it so."""
    data_dir = tmp_path / "new" / "data"
    monkeypatch.setattr(worker, "resolve_bootstrap", lambda _settings: "127.0.0.1:1")
    monkeypatch.setattr(worker, "sink_client", lambda _settings: object())
    monkeypatch.setattr(worker, "check_key", lambda *_args, **_options: None)
    monkeypatch.setattr(worker, "apply_configured_ttls", lambda _settings: None)

    def stop(*_args: Any) -> None:
        raise Started

    monkeypatch.setattr(worker, "drop_state_without_changelog", stop)
    with pytest.raises(Started):
        worker.run_worker(load_settings({"OCPI_DATA_DIR": str(data_dir), "OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1",
                                         "OCPI_CLICKHOUSE_DSN": "http://u:p@127.0.0.1:1"}))
    assert (data_dir / "secrets" / "pseudonym.key").exists()
    assert data_dir.stat().st_mode & 0o777 == 0o700, oct(data_dir.stat().st_mode)


def test_a_second_worker_on_one_data_dir_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers of one app id on one OCPI_DATA_DIR shared one Faust state directory: the second, finding no
    changelog record yet, deleted the first's state under it ("starting from empty state"), and both wrote its
    RocksDB. The second now stops before it touches anything, naming the directory; the first's lock goes with its
    process (a SIGKILLed worker restarts at once)."""
    settings = load_settings({"OCPI_DATA_DIR": str(tmp_path / "data"), "OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1",
                              "OCPI_CLICKHOUSE_DSN": "http://u:p@127.0.0.1:1"})
    monkeypatch.setattr(worker, "resolve_bootstrap", lambda _settings: "127.0.0.1:1")
    monkeypatch.setattr(worker, "check_pseudonym_key", lambda _settings: None)
    monkeypatch.setattr(worker, "apply_configured_ttls", lambda _settings: None)
    dropped: list[Path] = []
    monkeypatch.setattr(worker, "drop_state_without_changelog", lambda *args: dropped.append(args[0]))

    first = worker.lock_state(settings, settings.pipeline.app_id)
    try:
        with pytest.raises(worker.StateInUse, match="another worker"):
            worker.run_worker(settings)
        assert dropped == []
    finally:
        first.close()
    second = worker.lock_state(settings, settings.pipeline.app_id)  # free again once the holder is gone
    second.close()
