-- 0022 wrote the line of every CDR stored before billing_lines_mv (0012) that had none, but looked the lines up by
-- `CC/PID/ID` joined with `/`, which a CiString may hold (0024): NL/T's CDR M/D and NL/T/M's CDR D are both
-- `NL/T/M/D`, so a CDR stored before 0012 whose key so equalled a billed CDR's was taken for billed and has no line:
-- nothing billed it, and nothing will (its row is rewritten only by pseudonymisation, which has passed by then).
-- Its line, as billing_lines_v2_mv (0027) makes it, looked up by the NUL-joined key no CiString can make ambiguous.
-- Only a CDR with a `/` in its country code, party id or id can be one (a key without one joins to exactly two
-- slashes, and so does only the same key): the lookup holds the keys of those lines alone; cdrs is scanned once
-- (FINAL), as by 0027. Idempotent: a CDR with a line is left out.
INSERT INTO billing_lines
SELECT
    toDate(end_date_time) AS day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit,
    if(credit, -abs(total_energy), total_energy) AS energy_kwh,
    if(credit, -abs(total_cost_excl_vat), total_cost_excl_vat) AS cost_excl_vat,
    if(credit, -abs(total_cost_incl_vat), total_cost_incl_vat) AS cost_incl_vat,
    received_at, version, home_charging_compensation
FROM cdrs FINAL
WHERE (position(country_code, '/') > 0 OR position(party_id, '/') > 0 OR position(cdr_id, '/') > 0)
    AND concat(country_code, '\0', party_id, '\0', cdr_id) NOT IN (
        SELECT concat(country_code, '\0', party_id, '\0', cdr_id) FROM billing_lines
        WHERE position(country_code, '/') > 0 OR position(party_id, '/') > 0 OR position(cdr_id, '/') > 0);
