-- Full sync of Locations (08 §2.1): true once a complete pulled list of its party no longer held the Location (an
-- UNLIST event, `pipeline.locations.unlist`); a later push newer than that list writes the row listed again. The
-- receivers' GET answers an unlisted Location as unknown. Rows from before this column are listed, as they were.
ALTER TABLE locations ADD COLUMN IF NOT EXISTS unlisted Bool DEFAULT false;
