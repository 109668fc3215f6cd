-- The fingerprint of the pseudonymisation key (an HMAC of a fixed text, not the key): pseudonyms are join keys, so
-- every process that writes them must use one key. The first row (earliest recorded_at) is the key in force; a
-- worker or `retention apply` with another key refuses to start (pipeline.retention.check_key).
CREATE TABLE IF NOT EXISTS pseudonym_key
(
    fingerprint  String,
    recorded_at  DateTime64(6, 'UTC'),
    recorded_by  String
)
ENGINE = MergeTree
ORDER BY (recorded_at, fingerprint);
