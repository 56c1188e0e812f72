-- Each consumer replica reports here whether it holds a batch that keeps failing to commit, so
-- that the API's /ready can say so: a stuck batch is invisible to NATS (the replica keeps it
-- in progress) and to a bare "SELECT 1". A replica refreshes its row every few seconds; a row
-- that has not been refreshed for a while belongs to a replica that is gone and is ignored.
CREATE TABLE IF NOT EXISTS consumer_health (
    consumer_id   text PRIMARY KEY,
    stuck_batches integer NOT NULL DEFAULT 0,
    stuck_since   timestamptz,
    last_error    text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE consumer_health OWNER TO oncelog_owner;
GRANT SELECT, INSERT, UPDATE ON consumer_health TO oncelog_ingest;
GRANT SELECT ON consumer_health TO oncelog_reader;
