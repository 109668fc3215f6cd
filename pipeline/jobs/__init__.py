"""Operator jobs around the pipeline: replay (`replay.py`), archive export/read (`archive.py`), rebuild of the
ClickHouse tables (`rebuild.py`) and pull-model catch-up from partners' Sender endpoints (`pull.py`).

Every job is resumable: its progress is a checkpoint file under `OCPI_DATA_DIR/jobs/` (an export's is its
archive files), written atomically after each piece of work that is durable (records acknowledged by Kafka,
archive files renamed into place). A replay sends its events with their own event ids, which the pipeline
recognises; a pull reads a page again with new event ids, whose objects are duplicates by content. So an
interrupted job (Ctrl-C, a crash) is rerun with the same command and finishes the work; what was sent between
the last checkpoint and the interruption is sent again, which changes no total.
"""
