-- billing_lines is filled by billing_lines_mv as CDRs are inserted into cdrs (0012): a CDR stored before 0012 never
-- passed the view, so nothing billed it (the revenue report, billing_daily, the billing dashboard) until its row was
-- next written (pseudonymisation, months later). Its line, as the view makes it, for every CDR without one.
-- Idempotent: a CDR with a line is left out, and a line inserted twice (a worker storing the CDR meanwhile) is the
-- same row of the same version under ReplacingMergeTree. It holds the key of every billing line in memory once
-- (about 100 bytes a line: 150-300 MB for 2 million lines, measured on chDB).
INSERT INTO billing_lines
SELECT
    toDate(end_date_time) AS day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit,
    if(credit, -abs(total_energy), total_energy) AS energy_kwh,
    if(credit, -abs(total_cost_excl_vat), total_cost_excl_vat) AS cost_excl_vat,
    if(credit, -abs(total_cost_incl_vat), total_cost_incl_vat) AS cost_incl_vat,
    received_at, version
FROM cdrs FINAL
WHERE concat(country_code, '/', party_id, '/', cdr_id) NOT IN (
    SELECT concat(country_code, '/', party_id, '/', cdr_id) FROM billing_lines);
