-- Every accepted push as it reached the pipeline (decoded envelope + canonical JSON payload).
-- ReplacingMergeTree on event_id: reprocessing the same Kafka records rewrites identical rows, so totals never change.
CREATE TABLE IF NOT EXISTS raw_events
(
    event_id        String,
    partner_id      LowCardinality(String),
    module          LowCardinality(String),
    operation       LowCardinality(String),
    level           LowCardinality(String),
    country_code    LowCardinality(String),
    party_id        LowCardinality(String),
    object_id       String,
    evse_uid        Nullable(String),
    connector_id    Nullable(String),
    received_at     DateTime64(6, 'UTC'),
    request_id      String,
    correlation_id  String,
    source          LowCardinality(String),
    content_hash    String,
    relaxations     Array(String),
    payload_json    String,
    kafka_topic     LowCardinality(String),
    kafka_partition UInt32,
    kafka_offset    UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (module, country_code, party_id, object_id, event_id);
