-- An event's timestamp must be one every client can read back: PostgreSQL itself holds years
-- up to 294276, but Python's datetime (and so the API) only years 1-9999. The validator refuses
-- anything else first; this keeps the store from taking such a row should one get past it.
-- NOT VALID: rows already stored are not rescanned (they passed the same rule on the way in).
ALTER TABLE events ADD CONSTRAINT events_ts_readable
    CHECK (ts >= timestamptz '0001-01-01 00:00:00+00' AND ts < timestamptz '10000-01-01 00:00:00+00')
    NOT VALID;
