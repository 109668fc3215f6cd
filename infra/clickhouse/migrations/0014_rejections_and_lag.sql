-- Pushes the receivers refused (2xxx/3xxx answers on functional-module pushes), written by pipeline.rejections
-- from the rejections topic. Keyed by the record's own id, so reprocessing rewrites the same rows.
CREATE TABLE IF NOT EXISTS rejections
(
    rejection_id   String,
    partner_id     LowCardinality(String),
    module         LowCardinality(String),
    method         LowCardinality(String),
    path           String,
    ocpi_status    UInt16,
    http_status    UInt16,
    reason         String,
    field_path     String,
    request_id     String,
    correlation_id String,
    rejected_at    DateTime64(6, 'UTC'),
    inserted_at    DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(rejected_at)
ORDER BY (partner_id, module, rejected_at, rejection_id)
TTL toDateTime(rejected_at) + INTERVAL 365 DAY;

-- Ingestion lag = inserted_at - received_at. Filled by the server on insert (the sink never sends it). A raw
-- event written again (a parked PATCH's final outcome, a reprocessed batch) takes the later time.
ALTER TABLE raw_events ADD COLUMN IF NOT EXISTS inserted_at DateTime64(6, 'UTC') DEFAULT now64(6);
