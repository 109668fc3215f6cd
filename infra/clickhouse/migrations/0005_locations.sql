-- Current state of every Location (EVSEs and connectors inside payload_json), the newest version wins.
CREATE TABLE IF NOT EXISTS locations
(
    country_code    LowCardinality(String),
    party_id        LowCardinality(String),
    location_id     String,
    partner_id      LowCardinality(String),
    name            Nullable(String),
    city            String,
    country         LowCardinality(String),
    publish         Bool,
    evse_count      UInt32,
    last_updated    DateTime64(6, 'UTC'),
    payload_json    String,
    event_id        String,
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (country_code, party_id, location_id);
