"""The worker warns at start of a retention policy that keeps personal data in clear longer than it says."""

from __future__ import annotations

import logging

import pytest

from infra.settings import load_settings
from pipeline.retention import warnings
from pipeline.worker import warn_of_retention_policy


def test_raw_events_kept_past_the_pseudonymisation_age_are_warned_of_at_start(
        caplog: pytest.LogCaptureFixture) -> None:
    """Raw events keep token uids and contract ids in clear until their TTL: with OCPI_RETENTION_RAW_DAYS above the
    pseudonymisation age only `retention report` said so, which nobody may run; the worker now logs it at start."""
    settings = load_settings({"OCPI_RETENTION_RAW_DAYS": "120", "OCPI_RETENTION_PSEUDONYMISE_DAYS": "90"})
    with caplog.at_level(logging.WARNING, logger="pipeline.worker"):
        warn_of_retention_policy(settings)
    assert [r.getMessage() for r in caplog.records] == [
        "retention: raw events are kept 120 days in clear, longer than the pseudonymisation age (90 days): lower "
        "OCPI_RETENTION_RAW_DAYS"]
    assert warnings(settings)[0] == caplog.records[0].getMessage().removeprefix("retention: ")


def test_a_policy_within_its_ages_starts_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The defaults (30 raw days, 90 in clear) warn of nothing; nor does the embedded broker's lack of retention
    enforcement, which `retention report` names, at every start of `dev` or `demo`."""
    settings = load_settings({})  # embedded: Tansu
    with caplog.at_level(logging.WARNING, logger="pipeline.worker"):
        warn_of_retention_policy(settings)
    assert settings.kafka.is_tansu and caplog.records == []
