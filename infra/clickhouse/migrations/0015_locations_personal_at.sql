-- When the `publish_allowed_to` in a locations row's payload_json was received (a Location PUT, or a Location PATCH
-- that set it): personal data, pseudonymised that long after (pipeline.retention). Not the row's received_at: an
-- EVSE or Connector update writes a new row with the same `publish_allowed_to` and would postpone it. Rows from
-- before this column count from their received_at, as they did.
ALTER TABLE locations ADD COLUMN IF NOT EXISTS personal_at DateTime64(6, 'UTC') DEFAULT received_at;
