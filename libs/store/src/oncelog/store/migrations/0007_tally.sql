-- The HTTP gateway's counts of broker duplicates (see docs/architecture.md#broker-duplicates).
-- The gateway publishes each request's counts to the tally stream and answers once the broker
-- has them; the API's applier adds them to topic_stats and records each count's id here in
-- the same transaction, then acks. A count delivered again (the ack was lost, the applier
-- died after its commit) finds its id and adds nothing.
--
-- Ids of counts the stream no longer holds can never come again: the applier forgets the ids
-- below the stream's first sequence.
CREATE TABLE tally_applied (
    id         uuid PRIMARY KEY,
    stream_seq bigint NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tally_applied_stream_seq ON tally_applied (stream_seq);
ALTER TABLE tally_applied OWNER TO oncelog_owner;

-- The API (oncelog_reader) applies the counts; nobody else writes here.
GRANT SELECT, INSERT, DELETE ON tally_applied TO oncelog_reader;
