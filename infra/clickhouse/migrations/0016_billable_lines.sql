-- What billing counts: the current billing lines (FINAL) but those of credit CDRs whose credit link is
-- DUPLICATE_CREDIT, a second credit for a CDR that another credit cancels already (pipeline.reconcile).
-- billing_lines is filled from cdrs when a CDR is stored (stage 1); whether a credit is a duplicate is decided later,
-- per CPO party (stage 2), and may change (an earlier credit arriving late takes the link over). So the exclusion is
-- made when reading, from the current credit_links row: idempotent, and it follows every change of a link. Writing
-- the decision into billing_lines instead would give that table a second writer racing the materialized view's
-- versions (pseudonymisation rewrites CDR rows, and each rewrite inserts the line again).
-- Duplicates are few: `credit AND ...` keeps the lookup off every other line (short-circuit evaluation), and the key
-- is one string (a tuple of LowCardinality columns is several times slower to look up per line).
-- Values this version adds without a schema change: credit_links.status DUPLICATE_CREDIT; reconciliation.outcome
-- CREDITED (a CDR a credit cancels).
CREATE VIEW IF NOT EXISTS billable_lines AS
SELECT
    day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit, energy_kwh, cost_excl_vat,
    cost_incl_vat, received_at, version
FROM billing_lines FINAL
WHERE NOT (credit AND concat(country_code, '/', party_id, '/', cdr_id) IN (
    SELECT concat(country_code, '/', party_id, '/', credit_cdr_id) FROM credit_links FINAL
    WHERE status = 'DUPLICATE_CREDIT'));

-- Billing per partner, CPO party, location and day (credits netted, duplicate credits left out).
CREATE OR REPLACE VIEW billing_daily AS
SELECT
    day, partner_id, country_code, party_id, location_id, currency,
    count() AS cdrs, countIf(credit) AS credit_cdrs,
    sum(energy_kwh) AS energy_kwh, sum(cost_excl_vat) AS cost_excl_vat, sum(cost_incl_vat) AS cost_incl_vat
FROM billable_lines
GROUP BY day, partner_id, country_code, party_id, location_id, currency;
