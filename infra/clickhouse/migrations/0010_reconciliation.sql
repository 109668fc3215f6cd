-- Sessions reconciled with CDRs: one current row per subject (a completed Session, or a CDR).
-- outcome for a SESSION: AWAITING_CDR, MISSING_CDR, MATCHED, NOT_BILLABLE (status INVALID);
-- for a CDR: AWAITING_SESSION, NO_SESSION, MATCHED, MISMATCH (deltas beyond tolerance), CREDIT (see credit_links).
-- method: SESSION_ID, AUTHORIZATION_REFERENCE or TOKEN_LOCATION_START. Deltas are CDR minus Session.
-- version: 2 x the reconciliation state's sequence; a deadline sweep writes 2 x sequence + 1, so it supersedes the
-- AWAITING_* row it promotes and is superseded by the next real change.
CREATE TABLE IF NOT EXISTS reconciliation
(
    country_code        LowCardinality(String),
    party_id            LowCardinality(String),
    subject             LowCardinality(String),
    subject_id          String,
    partner_id          LowCardinality(String),
    outcome             LowCardinality(String),
    method              LowCardinality(String),
    session_id          Nullable(String),
    cdr_ids             Array(String),
    session_kwh         Nullable(Decimal(18, 4)),
    cdr_kwh             Nullable(Decimal(18, 4)),
    delta_kwh           Nullable(Decimal(18, 4)),
    session_cost_excl_vat Nullable(Decimal(18, 4)),
    cdr_cost_excl_vat   Nullable(Decimal(18, 4)),
    delta_cost_excl_vat Nullable(Decimal(18, 4)),
    delta_start_s       Nullable(Decimal(18, 6)),
    delta_end_s         Nullable(Decimal(18, 6)),
    late                Bool,
    due_at              Nullable(DateTime64(6, 'UTC')),
    event_time          DateTime64(6, 'UTC'),
    version             UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (country_code, party_id, subject, subject_id);
