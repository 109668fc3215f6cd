-- The key in force is the first fingerprint recorded (0017). Two first processes with different keys, started at
-- once, could both find the table empty and both read their own row back as the first (the earlier-stamped insert
-- landing after the other's check): two keys in force. Every first insert now carries one deduplication token
-- (pipeline.retention.check_key), so ClickHouse keeps the first of them and drops the others; a non-replicated
-- MergeTree deduplicates only within this window. Idempotent.
ALTER TABLE pseudonym_key MODIFY SETTING non_replicated_deduplication_window = 100;
