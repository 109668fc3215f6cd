-- OCPI_TOKEN_PARTIES names the eMSP parties whose tokens we bill. A CDR of another eMSP's token (anomaly
-- CDR_OF_ANOTHER_EMSP: the CPO sent it to the wrong eMSP) was billed all the same, as the CPO sent it. It is still
-- stored (immutable) and has its billing line, but the line carries the flag and billable_lines, what billing reads,
-- leaves it out: it is disputed with the CPO, not billed. Its credit CDR (the CPO correcting its mistake) has the
-- same token, so the same flag.
--
-- The worker writes the flag as it stores the CDR, judged by the setting of that moment. Rows stored before have it
-- false (never judged): `replay --rebuild` judges them under the current setting.
ALTER TABLE cdrs ADD COLUMN IF NOT EXISTS token_of_another_emsp Bool DEFAULT false;

ALTER TABLE billing_lines ADD COLUMN IF NOT EXISTS token_of_another_emsp Bool DEFAULT false;

-- The line of a CDR as billing_lines_v2_mv (0027) makes it, with the flag; created before the old view is dropped,
-- so no CDR inserted meanwhile goes without a line (one inserted in between gets two of the same key and version,
-- which the backfill below settles).
CREATE MATERIALIZED VIEW IF NOT EXISTS billing_lines_v3_mv TO billing_lines AS
SELECT
    toDate(end_date_time) AS day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit,
    if(credit, -abs(total_energy), total_energy) AS energy_kwh,
    if(credit, -abs(total_cost_excl_vat), total_cost_excl_vat) AS cost_excl_vat,
    if(credit, -abs(total_cost_incl_vat), total_cost_incl_vat) AS cost_incl_vat,
    received_at, version, home_charging_compensation, token_of_another_emsp
FROM cdrs;

DROP VIEW IF EXISTS billing_lines_v2_mv;

-- A flagged CDR stored between the two statements above may have kept the old view's line (no flag) as its current
-- one: written again with the flag (same key and version; ReplacingMergeTree keeps the last inserted of equal
-- versions). Idempotent: a CDR whose current line has the flag is left out. The columns are named, so that a column
-- added later does not break a rerun.
INSERT INTO billing_lines (day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit,
                           energy_kwh, cost_excl_vat, cost_incl_vat, received_at, version,
                           home_charging_compensation, token_of_another_emsp)
SELECT
    toDate(end_date_time) AS day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit,
    if(credit, -abs(total_energy), total_energy) AS energy_kwh,
    if(credit, -abs(total_cost_excl_vat), total_cost_excl_vat) AS cost_excl_vat,
    if(credit, -abs(total_cost_incl_vat), total_cost_incl_vat) AS cost_incl_vat,
    received_at, version, home_charging_compensation, token_of_another_emsp
FROM cdrs FINAL
WHERE token_of_another_emsp AND concat(country_code, '\0', party_id, '\0', cdr_id) NOT IN (
    SELECT concat(country_code, '\0', party_id, '\0', cdr_id) FROM billing_lines FINAL
    WHERE token_of_another_emsp);

-- What billing reads (0016, 0018, 0024, 0027), without the lines of other eMSPs' tokens. Its columns are unchanged.
CREATE OR REPLACE VIEW billable_lines AS
SELECT
    day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit, energy_kwh, cost_excl_vat,
    cost_incl_vat, received_at, version, home_charging_compensation
FROM billing_lines FINAL
WHERE NOT token_of_another_emsp AND NOT (credit AND concat(country_code, '\0', party_id, '\0', cdr_id) IN (
    SELECT concat(country_code, '\0', party_id, '\0', credit_cdr_id) FROM credit_links FINAL
    WHERE status IN ('DUPLICATE_CREDIT', 'CREDIT_OF_CREDIT')));
