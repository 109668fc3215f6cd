-- Records the pipeline could not decode or apply: kept whole (hex) with the reason, never dropped silently.
CREATE TABLE IF NOT EXISTS dead_letters
(
    kafka_topic     LowCardinality(String),
    kafka_partition UInt32,
    kafka_offset    UInt64,
    key_hex         String,
    value_hex       String,
    error           String,
    recorded_at     DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (kafka_topic, kafka_partition, kafka_offset);
