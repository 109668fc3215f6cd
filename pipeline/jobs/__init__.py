"""Operator jobs around the pipeline: replay (`replay.py`), archive export/read (`archive.py`), rebuild of the
ClickHouse tables (`rebuild.py`) and pull-model catch-up from partners' Sender endpoints (`pull.py`).

Every job is resumable: its progress is a checkpoint file under `OCPI_DATA_DIR/jobs/`, written atomically
after each piece of work that is durable (records acknowledged by Kafka, archive files renamed into place),
and everything a job sends to Kafka carries an event id the pipeline deduplicates on. So an interrupted job
(Ctrl-C, a crash) is rerun with the same command and finishes the work; what was sent between the last
checkpoint and the interruption is sent again, which changes no total.
"""
