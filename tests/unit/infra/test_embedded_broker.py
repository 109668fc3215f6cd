from __future__ import annotations

import os

import pytest

from infra.kafka.admin import ensure_topics
from infra.kafka.embedded import EmbeddedBroker

pytestmark = pytest.mark.kafka


def test_broker_starts_answers_and_is_stopped_by_pid() -> None:
    broker = EmbeddedBroker().start()
    pid = broker.pid
    assert pid is not None
    try:
        assert ensure_topics(broker.bootstrap, ["a.topic", "b.topic"], 3) == ["a.topic", "b.topic"]
        assert ensure_topics(broker.bootstrap, ["a.topic"], 3) == []
    finally:
        broker.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_binary_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.kafka.embedded import EmbeddedBrokerError

    monkeypatch.setenv("CALF_TANSU_BIN", "/nonexistent/tansu")
    with pytest.raises(EmbeddedBrokerError, match="Tansu broker binary was not found"):
        EmbeddedBroker().start()
