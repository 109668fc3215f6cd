-- A CDR may list two Tariffs under one key (country code, party id, id: a CiString id sent in two cases, or one id
-- for two types): cdr_tariffs was keyed by the CDR and that key alone, so the second replaced the first and its
-- JSON was lost. `tariff_occurrence` is how many Tariffs of the same key come before it in the CDR's list, 0 for
-- the first, so each keeps its row; the rows from before, one per key, have 0 there, where the CDR written again
-- (a replay or rebuild) puts its first Tariff of that key and adds the others. A new column without a default
-- expression is the only kind ClickHouse lets the sorting key take.
ALTER TABLE cdr_tariffs ADD COLUMN IF NOT EXISTS tariff_occurrence UInt16,
    MODIFY ORDER BY (country_code, party_id, cdr_id, tariff_country_code, tariff_party_id, tariff_id,
                     tariff_occurrence);
