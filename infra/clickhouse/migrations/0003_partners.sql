-- The partner registry: one row per partner, the highest revision wins. Tokens partners present to us are
-- stored as sha256 hashes only; the token we present to a partner (its Token B/C) must be usable, so it is kept.
CREATE TABLE IF NOT EXISTS partners
(
    partner_id      String,
    revision        UInt64,
    record_json     String,
    updated_at      DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(revision)
ORDER BY partner_id;
