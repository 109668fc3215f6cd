ALTER TABLE cdrs ADD COLUMN IF NOT EXISTS received_at DateTime64(6, 'UTC') DEFAULT last_updated;
ALTER TABLE cdrs ADD COLUMN IF NOT EXISTS pseudonymised Bool DEFAULT false;

-- The charging periods of every CDR, one row per period; dimensions as parallel arrays (type, volume).
CREATE TABLE IF NOT EXISTS cdr_charging_periods
(
    country_code      LowCardinality(String),
    party_id          LowCardinality(String),
    cdr_id            String,
    period_index      UInt16,
    start_date_time   DateTime64(6, 'UTC'),
    tariff_id         Nullable(String),
    dimension_types   Array(LowCardinality(String)),
    dimension_volumes Array(Decimal(18, 4)),
    received_at       DateTime64(6, 'UTC'),
    version           UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(received_at)
ORDER BY (country_code, party_id, cdr_id, period_index);

-- The tariffs a CDR was priced with (full OCPI Tariff JSON), one row per tariff.
CREATE TABLE IF NOT EXISTS cdr_tariffs
(
    country_code        LowCardinality(String),
    party_id            LowCardinality(String),
    cdr_id              String,
    tariff_country_code LowCardinality(String),
    tariff_party_id     LowCardinality(String),
    tariff_id           String,
    currency            LowCardinality(String),
    tariff_type         Nullable(String),
    tariff_json         String,
    received_at         DateTime64(6, 'UTC'),
    version             UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(received_at)
ORDER BY (country_code, party_id, cdr_id, tariff_country_code, tariff_party_id, tariff_id);

-- Credit CDR -> the CDR it credits. status: LINKED, AWAITING_ORIGINAL (within the grace), UNKNOWN_REFERENCE.
CREATE TABLE IF NOT EXISTS credit_links
(
    country_code               LowCardinality(String),
    party_id                   LowCardinality(String),
    credit_cdr_id              String,
    credited_cdr_id            String,
    partner_id                 LowCardinality(String),
    status                     LowCardinality(String),
    credit_cost_excl_vat       Decimal(18, 4),
    credited_cost_excl_vat     Nullable(Decimal(18, 4)),
    amount_matches             Nullable(Bool),
    received_at                DateTime64(6, 'UTC'),
    due_at                     DateTime64(6, 'UTC'),
    version                    UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (country_code, party_id, credit_cdr_id);
