ALTER TABLE locations ADD COLUMN IF NOT EXISTS received_at DateTime64(6, 'UTC') DEFAULT last_updated;
ALTER TABLE locations ADD COLUMN IF NOT EXISTS pseudonymised Bool DEFAULT false;

-- Current state of every EVSE; `present` is false once a Location PUT no longer lists it (kept, never deleted).
-- version is the Location's version: an EVSE row changes only together with its Location.
CREATE TABLE IF NOT EXISTS evses
(
    country_code    LowCardinality(String),
    party_id        LowCardinality(String),
    location_id     String,
    evse_uid        String,
    evse_id         Nullable(String),
    status          LowCardinality(String),
    present         Bool,
    capabilities    Array(LowCardinality(String)),
    connector_count UInt16,
    last_updated    DateTime64(6, 'UTC'),
    payload_json    String,
    event_id        String,
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (country_code, party_id, location_id, evse_uid);

-- Current state of every Connector.
CREATE TABLE IF NOT EXISTS connectors
(
    country_code       LowCardinality(String),
    party_id           LowCardinality(String),
    location_id        String,
    evse_uid           String,
    connector_id       String,
    standard           LowCardinality(String),
    format             LowCardinality(String),
    power_type         LowCardinality(String),
    max_voltage        UInt32,
    max_amperage       UInt32,
    max_electric_power Nullable(UInt32),
    tariff_ids         Array(String),
    present            Bool,
    last_updated       DateTime64(6, 'UTC'),
    payload_json       String,
    event_id           String,
    version            UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (country_code, party_id, location_id, evse_uid, connector_id);

-- Every applied EVSE status change (first sighting included, previous_status '').
CREATE TABLE IF NOT EXISTS evse_status_history
(
    country_code    LowCardinality(String),
    party_id        LowCardinality(String),
    location_id     String,
    evse_uid        String,
    event_id        String,
    previous_status LowCardinality(String),
    status          LowCardinality(String),
    changed_at      DateTime64(6, 'UTC'),
    received_at     DateTime64(6, 'UTC'),
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(received_at)
ORDER BY (country_code, party_id, location_id, evse_uid, event_id);
