"""Resuming a replay (`pipeline/jobs/replay.py`): with a log of sent ids whose last line was cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.jobs.replay import ReplayReport, Selection, _Run


def test_a_sent_log_whose_last_line_was_cut_does_not_merge_it_with_the_next_id(
        settings_for: Any, tmp_path: Path) -> None:
    """Power lost (or the disk full) while a batch's ids were appended to `<job>.sent`: the rerun appended the next
    ids right after the cut one, merging the first of them with it, so that event was no longer known as sent
    (its copies later in the topics were sent again)."""
    settings = settings_for()
    log = tmp_path / "job.sent"
    log.write_text("id-1\nid-2\nid-3-cut-mid")
    run = _Run(settings, Selection(modules=("sessions",)), ReplayReport(job="j", status="resumed-done"))
    run.attach(log, resume=True, record=True)
    assert run.seen == {"id-1", "id-2"}  # the cut line is no id: its batch was never checkpointed, it goes again
    run._batch_ids.append("id-4")
    run.record_sent()

    assert log.read_text() == "id-1\nid-2\nid-4\n"
    again = _Run(settings, Selection(modules=("sessions",)), ReplayReport(job="j", status="resumed-done"))
    again.attach(log, resume=True, record=True)
    assert again.seen == {"id-1", "id-2", "id-4"}
