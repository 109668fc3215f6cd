-- A CDR with `home_charging_compensation` true (OCPI 2.2.1, 10 §4.1.1) is for a session on the driver's home
-- charger, whose energy cost is compensated TO the driver: billing counted it as charging revenue. The flag becomes a
-- column of `cdrs` and of every billing line, and the billing views keep it apart.
--
-- cdrs: a default expression from the CDR as sent, so rows stored before (their parts lack the column) read it from
-- their payload_json, as does every insert that leaves the column out (a worker of an earlier version running on
-- while this migrates); the worker writes it itself. Absent (or not a boolean) is false, as in OCPI.
ALTER TABLE cdrs ADD COLUMN IF NOT EXISTS home_charging_compensation Bool
    DEFAULT JSONExtractBool(payload_json, 'home_charging_compensation');

ALTER TABLE billing_lines ADD COLUMN IF NOT EXISTS home_charging_compensation Bool DEFAULT false;

-- The line of a CDR as billing_lines_mv (0012) makes it, with the flag. A released view is not edited: this one
-- takes over, created before the old one is dropped so that no CDR inserted meanwhile goes without a line (one
-- inserted in between gets two of the same key and version, which the backfill below settles).
CREATE MATERIALIZED VIEW IF NOT EXISTS billing_lines_v2_mv TO billing_lines AS
SELECT
    toDate(end_date_time) AS day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit,
    if(credit, -abs(total_energy), total_energy) AS energy_kwh,
    if(credit, -abs(total_cost_excl_vat), total_cost_excl_vat) AS cost_excl_vat,
    if(credit, -abs(total_cost_incl_vat), total_cost_incl_vat) AS cost_incl_vat,
    received_at, version, home_charging_compensation
FROM cdrs;

DROP VIEW IF EXISTS billing_lines_mv;

-- The existing lines of compensation CDRs, written again with the flag: the same key and version as the line they
-- replace, and ReplacingMergeTree keeps the last inserted of equal versions. Idempotent: a CDR whose current line
-- has the flag is left out, so a rerun after a failure inserts only what is still missing. Reads every CDR's
-- payload_json once (the rows stored before compute the flag from it); holds in memory only the keys of the lines
-- that have the flag (few: compensation CDRs), where the lines without it would be every other CDR's.
INSERT INTO billing_lines
SELECT
    toDate(end_date_time) AS day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit,
    if(credit, -abs(total_energy), total_energy) AS energy_kwh,
    if(credit, -abs(total_cost_excl_vat), total_cost_excl_vat) AS cost_excl_vat,
    if(credit, -abs(total_cost_incl_vat), total_cost_incl_vat) AS cost_incl_vat,
    received_at, version, home_charging_compensation
FROM cdrs FINAL
WHERE home_charging_compensation AND concat(country_code, '\0', party_id, '\0', cdr_id) NOT IN (
    SELECT concat(country_code, '\0', party_id, '\0', cdr_id) FROM billing_lines FINAL
    WHERE home_charging_compensation);

-- What billing reads (0016, 0018, 0024), with the flag.
CREATE OR REPLACE VIEW billable_lines AS
SELECT
    day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit, energy_kwh, cost_excl_vat,
    cost_incl_vat, received_at, version, home_charging_compensation
FROM billing_lines FINAL
WHERE NOT (credit AND concat(country_code, '\0', party_id, '\0', cdr_id) IN (
    SELECT concat(country_code, '\0', party_id, '\0', credit_cdr_id) FROM credit_links FINAL
    WHERE status IN ('DUPLICATE_CREDIT', 'CREDIT_OF_CREDIT')));

-- A day's home charging compensation is its own row, apart from the charging revenue of the same location. The
-- flag is the last column, as in billable_lines: a reader that takes the columns by position keeps its places.
CREATE OR REPLACE VIEW billing_daily AS
SELECT
    day, partner_id, country_code, party_id, location_id, currency,
    count() AS cdrs, countIf(credit) AS credit_cdrs,
    sum(energy_kwh) AS energy_kwh, sum(cost_excl_vat) AS cost_excl_vat, sum(cost_incl_vat) AS cost_incl_vat,
    countIf(billable_lines.cost_incl_vat IS NULL) AS lines_without_incl_vat, home_charging_compensation
FROM billable_lines
GROUP BY day, partner_id, country_code, party_id, location_id, currency, home_charging_compensation;
