-- The reconciliation columns stage 2 computes, rather than copies from one object, are wider than an OCPI amount:
-- a session's cdr_kwh and cdr_cost_excl_vat sum the CDRs that count for it, and a delta is CDR minus Session of two
-- amounts that may each be up to 10^14 with either sign (`ocpi.types`: 14 integer digits). In Decimal(18, 4) such
-- a row is refused by ClickHouse ("Decimal value is too big"), the sink retries the batch forever and stage 2
-- stops for every party of the partition. Decimal(38, 4) holds any sum or difference of such amounts exactly.
ALTER TABLE reconciliation
    MODIFY COLUMN cdr_kwh Nullable(Decimal(38, 4)),
    MODIFY COLUMN delta_kwh Nullable(Decimal(38, 4)),
    MODIFY COLUMN cdr_cost_excl_vat Nullable(Decimal(38, 4)),
    MODIFY COLUMN delta_cost_excl_vat Nullable(Decimal(38, 4));
