-- Default retention (README, "Retention"); the worker and `ocpi-pipeline retention apply` re-apply the configured
-- values. Ages count from when we received the data (received_at), never from the OCPI timestamps: a CDR for an
-- old session, or a late credit, must not expire the moment it arrives.
-- Raw data: 30 days. Histories and anomalies: 365 days. Billing records: 7 years.
ALTER TABLE raw_events MODIFY TTL toDateTime(received_at) + INTERVAL 30 DAY;
ALTER TABLE dead_letters MODIFY TTL toDateTime(recorded_at) + INTERVAL 30 DAY;
ALTER TABLE session_status_history MODIFY TTL toDateTime(received_at) + INTERVAL 365 DAY;
ALTER TABLE evse_status_history MODIFY TTL toDateTime(received_at) + INTERVAL 365 DAY;
ALTER TABLE anomalies MODIFY TTL toDateTime(observed_at) + INTERVAL 365 DAY;
ALTER TABLE sessions MODIFY TTL toDateTime(received_at) + INTERVAL 7 YEAR;
ALTER TABLE cdrs MODIFY TTL toDateTime(received_at) + INTERVAL 7 YEAR;
ALTER TABLE cdr_charging_periods MODIFY TTL toDateTime(received_at) + INTERVAL 7 YEAR;
ALTER TABLE cdr_tariffs MODIFY TTL toDateTime(received_at) + INTERVAL 7 YEAR;
ALTER TABLE credit_links MODIFY TTL toDateTime(received_at) + INTERVAL 7 YEAR;
ALTER TABLE billing_lines MODIFY TTL toDateTime(received_at) + INTERVAL 7 YEAR;
ALTER TABLE reconciliation MODIFY TTL toDateTime(event_time) + INTERVAL 7 YEAR;
