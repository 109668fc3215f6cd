-- Billing lines per CDR, maintained by a materialized view on every insert into cdrs, sorted for the billing
-- queries (day, partner, location). A CDR row may be inserted more than once (at-least-once, reprocessing,
-- pseudonymisation), so this is a ReplacingMergeTree keyed by the CDR too, read with FINAL: day, partner and
-- location are fixed for a CDR (immutable), so the extra key columns never split one CDR into two lines.
-- A credit CDR reverses: its energy and cost count as -|value| (the spec negates only total_cost).
CREATE TABLE IF NOT EXISTS billing_lines
(
    day                 Date,
    partner_id          LowCardinality(String),
    country_code        LowCardinality(String),
    party_id            LowCardinality(String),
    location_id         String,
    cdr_id              String,
    currency            LowCardinality(String),
    credit              Bool,
    energy_kwh          Decimal(18, 4),
    cost_excl_vat       Decimal(18, 4),
    cost_incl_vat       Nullable(Decimal(18, 4)),
    received_at         DateTime64(6, 'UTC'),
    version             UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(day)
ORDER BY (day, partner_id, country_code, party_id, location_id, cdr_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS billing_lines_mv TO billing_lines AS
SELECT
    toDate(end_date_time) AS day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit,
    if(credit, -abs(total_energy), total_energy) AS energy_kwh,
    if(credit, -abs(total_cost_excl_vat), total_cost_excl_vat) AS cost_excl_vat,
    if(credit, -abs(total_cost_incl_vat), total_cost_incl_vat) AS cost_incl_vat,
    received_at, version
FROM cdrs;

-- Billing per partner, CPO party, location and day (credits netted).
CREATE VIEW IF NOT EXISTS billing_daily AS
SELECT
    day, partner_id, country_code, party_id, location_id, currency,
    count() AS cdrs, countIf(credit) AS credit_cdrs,
    sum(energy_kwh) AS energy_kwh, sum(cost_excl_vat) AS cost_excl_vat, sum(cost_incl_vat) AS cost_incl_vat
FROM billing_lines FINAL
GROUP BY day, partner_id, country_code, party_id, location_id, currency;
