-- One row per credentials handshake (a partner's POST or PUT on our credentials endpoint) about to save: what it
-- claims (`subject`: the partner, or a party it takes), the state it read (`generation`: the partner's inbound
-- tokens, or the registry's records) and the claim (the hash of the Token C it issues, or the partner's id). Two
-- handshakes that read the same state (two POSTs with one Token A, two PUTs, or two partners taking one party,
-- reaching two receiver processes) insert with the same deduplication token, so the table keeps the first insert
-- that lands and drops the other; both read back which one won, and only that one saves
-- (receivers.registry.PartnerRegistry.claim). A non-replicated MergeTree deduplicates only within this window.
-- Not derived from the topics (a rebuild keeps it).
CREATE TABLE IF NOT EXISTS credential_claims
(
    subject     String,
    generation  String,
    claim       String,
    claimed_at  DateTime64(6, 'UTC')
)
ENGINE = MergeTree
ORDER BY (subject, generation)
SETTINGS non_replicated_deduplication_window = 1000;
