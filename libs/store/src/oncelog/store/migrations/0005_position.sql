-- Every stored event gets a position for the live tail (GET /events/stream): the id of the
-- transaction that stored it, then a sequence number. A sequence alone is assigned before
-- commit, so concurrent writers make its values visible out of order, and a reader resuming
-- "after the largest value seen" would skip the rows committed late. Transaction ids are
-- assigned in order too, but PostgreSQL says which ones can still change anything: a row whose
-- transaction id is below the snapshot's xmin belongs to a transaction that has ended, so the
-- rows below that horizon never change again, and a reader that exposes only them, in (tx, pos)
-- order, never skips a row and never shows one that could still be rolled back.
-- The id is the top-level transaction's (also inside savepoints), as xid8 read as bigint: an
-- epoch-extended 64-bit id that never wraps, far below 2^63 for any real cluster.
-- Adding the columns rewrites the table once: existing rows take this migration's id.
ALTER TABLE events
    ADD COLUMN tx bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    ADD COLUMN pos bigint GENERATED ALWAYS AS IDENTITY;
CREATE INDEX events_position ON events (tx, pos);
