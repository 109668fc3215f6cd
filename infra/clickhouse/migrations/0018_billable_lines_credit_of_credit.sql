-- What billing counts leaves out a credit that names a credit CDR (credit_links.status CREDIT_OF_CREDIT) as well
-- as a second credit of a CDR (DUPLICATE_CREDIT): OCPI credits a CDR, and linked, the first CDR would be refunded
-- twice. Why a view decides when reading, not a flag in billing_lines: see 0016.
CREATE OR REPLACE VIEW billable_lines AS
SELECT
    day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit, energy_kwh, cost_excl_vat,
    cost_incl_vat, received_at, version
FROM billing_lines FINAL
WHERE NOT (credit AND concat(country_code, '/', party_id, '/', cdr_id) IN (
    SELECT concat(country_code, '/', party_id, '/', credit_cdr_id) FROM credit_links FINAL
    WHERE status IN ('DUPLICATE_CREDIT', 'CREDIT_OF_CREDIT')));

-- incl_vat is optional in OCPI: the sum covers the lines that give it, lines_without_incl_vat counts the others,
-- as the revenue report and the billing dashboard do.
CREATE OR REPLACE VIEW billing_daily AS
SELECT
    day, partner_id, country_code, party_id, location_id, currency,
    count() AS cdrs, countIf(credit) AS credit_cdrs,
    sum(energy_kwh) AS energy_kwh, sum(cost_excl_vat) AS cost_excl_vat, sum(cost_incl_vat) AS cost_incl_vat,
    countIf(billable_lines.cost_incl_vat IS NULL) AS lines_without_incl_vat
FROM billable_lines
GROUP BY day, partner_id, country_code, party_id, location_id, currency;
