-- billable_lines (0016, 0018) looked a credit's line up among the DUPLICATE_CREDIT and CREDIT_OF_CREDIT links by
-- `CC/PID/ID` joined with `/`, which a CiString may hold (a party id too, `ocpi.identity.owner_key_part`): NL/T/M's
-- credit D and NL/T's credit M/D are both `NL/T/M/D`, so a duplicate credit of one party left out a credit of the
-- other, which then billed its CDR as if never credited. The parts are now joined by a NUL character, which no
-- CiString (printable ASCII) holds; the key is still one string.
CREATE OR REPLACE VIEW billable_lines AS
SELECT
    day, partner_id, country_code, party_id, location_id, cdr_id, currency, credit, energy_kwh, cost_excl_vat,
    cost_incl_vat, received_at, version
FROM billing_lines FINAL
WHERE NOT (credit AND concat(country_code, '\0', party_id, '\0', cdr_id) IN (
    SELECT concat(country_code, '\0', party_id, '\0', credit_cdr_id) FROM credit_links FINAL
    WHERE status IN ('DUPLICATE_CREDIT', 'CREDIT_OF_CREDIT')));
