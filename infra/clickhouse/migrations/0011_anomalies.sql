-- Everything unusual the pipeline saw, one row per (kind, object, event): stale updates, illegal transitions,
-- orphaned PATCHes, invalid merges, idle sessions, CDR conflicts, unknown credit references, ...
-- Keyed by the event (or, for a deadline, the event it waited on), so reprocessing rewrites the same rows.
CREATE TABLE IF NOT EXISTS anomalies
(
    kind         LowCardinality(String),
    module       LowCardinality(String),
    country_code LowCardinality(String),
    party_id     LowCardinality(String),
    object_id    String,
    sub_id       String,
    event_id     String,
    partner_id   LowCardinality(String),
    detail       String,
    observed_at  DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(observed_at)
ORDER BY (kind, country_code, party_id, object_id, sub_id, event_id);
