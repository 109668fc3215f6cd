-- What the pipeline decided for every raw event (APPLIED, DUPLICATE, STALE, PARKED, ORPHANED, INVALID, REJECTED,
-- CONFLICT), with the reason. raw_events has no version column: a parked PATCH is written again with its final
-- outcome, and ReplacingMergeTree keeps the row inserted last (replays insert in the same order).
ALTER TABLE raw_events ADD COLUMN IF NOT EXISTS outcome LowCardinality(String) DEFAULT '';
ALTER TABLE raw_events ADD COLUMN IF NOT EXISTS outcome_detail String DEFAULT '';
