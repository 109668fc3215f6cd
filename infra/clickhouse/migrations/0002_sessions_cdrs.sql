-- Current state of every Session: one row per (country_code, party_id, session_id), the newest version wins.
-- Identity columns hold the upper-cased CiString key; the payload keeps the case the CPO sent.
CREATE TABLE IF NOT EXISTS sessions
(
    country_code            LowCardinality(String),
    party_id                LowCardinality(String),
    session_id              String,
    partner_id              LowCardinality(String),
    status                  LowCardinality(String),
    start_date_time         DateTime64(6, 'UTC'),
    end_date_time           Nullable(DateTime64(6, 'UTC')),
    kwh                     Decimal(18, 4),
    auth_method             LowCardinality(String),
    authorization_reference Nullable(String),
    token_uid               String,
    token_type              LowCardinality(String),
    contract_id             String,
    location_id             String,
    evse_uid                String,
    connector_id            String,
    currency                LowCardinality(String),
    total_cost_excl_vat     Nullable(Decimal(18, 4)),
    total_cost_incl_vat     Nullable(Decimal(18, 4)),
    last_updated            DateTime64(6, 'UTC'),
    payload_json            String,
    event_id                String,
    version                 UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (country_code, party_id, session_id);

-- CDRs are immutable: one row per (country_code, party_id, cdr_id).
CREATE TABLE IF NOT EXISTS cdrs
(
    country_code            LowCardinality(String),
    party_id                LowCardinality(String),
    cdr_id                  String,
    partner_id              LowCardinality(String),
    start_date_time         DateTime64(6, 'UTC'),
    end_date_time           DateTime64(6, 'UTC'),
    session_id              Nullable(String),
    auth_method             LowCardinality(String),
    authorization_reference Nullable(String),
    token_uid               String,
    token_type              LowCardinality(String),
    contract_id             String,
    location_id             String,
    evse_uid                String,
    connector_id            String,
    currency                LowCardinality(String),
    total_energy            Decimal(18, 4),
    total_time              Decimal(18, 4),
    total_parking_time      Nullable(Decimal(18, 4)),
    total_cost_excl_vat     Decimal(18, 4),
    total_cost_incl_vat     Nullable(Decimal(18, 4)),
    credit                  Bool,
    credit_reference_id     Nullable(String),
    last_updated            DateTime64(6, 'UTC'),
    payload_json            String,
    event_id                String,
    version                 UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(end_date_time)
ORDER BY (country_code, party_id, cdr_id);
