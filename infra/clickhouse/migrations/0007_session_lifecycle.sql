-- Sessions: when the last applied event arrived (idle detection) and whether personal data was pseudonymised.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS received_at DateTime64(6, 'UTC') DEFAULT last_updated;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS pseudonymised Bool DEFAULT false;

-- Every applied status change of a Session (an illegal one that was applied is marked ILLEGAL).
-- Keyed by the event that caused it, so reprocessing rewrites the same rows.
CREATE TABLE IF NOT EXISTS session_status_history
(
    country_code    LowCardinality(String),
    party_id        LowCardinality(String),
    session_id      String,
    event_id        String,
    previous_status LowCardinality(String),
    status          LowCardinality(String),
    transition      LowCardinality(String),
    last_updated    DateTime64(6, 'UTC'),
    received_at     DateTime64(6, 'UTC'),
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(received_at)
ORDER BY (country_code, party_id, session_id, event_id);
