-- The currency of each reconciliation row's subject (the CDR's, the session's): cost deltas are only comparable, and
-- only summed by reports, within one currency. A CDR in another currency than its session is MISMATCH, without a
-- cost delta. Rows written before keep '' until their subject's next change rewrites them.
ALTER TABLE reconciliation ADD COLUMN IF NOT EXISTS currency LowCardinality(String) DEFAULT '' AFTER partner_id;
