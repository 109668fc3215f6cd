-- A dead letter was keyed by its Kafka coordinates alone. Offsets are not unique over time: the embedded broker
-- keeps its records in memory and numbers every partition from 0 again after a restart (ClickHouse keeps its
-- tables), as does a topic deleted and created again. The next dead letter at the same topic/partition/offset
-- then replaced the first one. `record_hash` (the row builder's hash of the record's key and value) tells them
-- apart and stays the same for a record read again, so at-least-once still writes one row per record.
-- Rows from before have 0 there. A new column without a default expression is the only kind ClickHouse lets
-- the sorting key take.
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS record_hash UInt64,
    MODIFY ORDER BY (kafka_topic, kafka_partition, kafka_offset, record_hash);
