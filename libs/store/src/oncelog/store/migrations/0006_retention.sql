-- Retention (see docs/operations.md#retention): old events expire while the statistics stay
-- exact and deduplication keeps its horizon.
--
-- oncelog_retention  the retention service: deletes expired events, dead letters and
--                    duplicates-log rows, records the keys of expired events, and adds to its
--                    own statistics shard. The consumer (oncelog_ingest) still cannot DELETE
--                    or UPDATE anything stored; only the narrow function below undoes its own
--                    inserts of keys that expired.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'oncelog_retention') THEN
        BEGIN
            CREATE ROLE oncelog_retention NOLOGIN;
        EXCEPTION WHEN duplicate_object THEN
            NULL;  -- another database's migration created it a moment ago
        END;
    END IF;
END
$$;

-- Rows that left the events table and dead letters that left theirs, counted in the
-- transaction that deletes them: rows == stored - expired, dead letter rows == dead_lettered -
-- dead_expired. `stored` and `dead_lettered` keep counting everything ever stored.
ALTER TABLE topic_stats
    ADD COLUMN expired bigint NOT NULL DEFAULT 0,
    ADD COLUMN dead_expired bigint NOT NULL DEFAULT 0;

-- The one rule naming an event's key in the horizon table: 128 bits of md5 over topic, a
-- space and the event id. A topic holds no space, so the text is injective; a collision of
-- two keys is as likely as a random 128-bit one (negligible at any real volume).
CREATE FUNCTION event_key(topic text, event_id text) RETURNS uuid
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN md5(topic || ' ' || event_id)::uuid;
ALTER FUNCTION event_key(text, text) OWNER TO oncelog_owner;

-- The dedup horizon: the key of every expired event stored within DEDUP_HORIZON_DAYS, with
-- the stream sequence that stored it (so a redelivery of that very message is recognised) and
-- when it was stored (the horizon counts from there). About a fifth of a small event's bytes.
CREATE TABLE expired_keys (
    key        uuid PRIMARY KEY,
    stream_seq bigint NOT NULL,
    stored_at  timestamptz NOT NULL
);
CREATE INDEX expired_keys_stored_at ON expired_keys (stored_at);
ALTER TABLE expired_keys OWNER TO oncelog_owner;

-- A duplicate of an expired event cannot be compared with a payload that is gone: unknown.
ALTER TABLE duplicates ALTER COLUMN same_payload DROP NOT NULL;

-- A consumer whose insert of key K raced the expiry of K (its INSERT waited on the deleted
-- row, then succeeded once the retention transaction committed) sees K in expired_keys in its
-- next statement and undoes the insert here. The function deletes only rows that the calling
-- transaction itself stored and whose key is recorded as expired: nothing any other
-- transaction stored, and nothing a live event needs.
CREATE FUNCTION undo_expired_inserts(topics text[], event_ids text[]) RETURNS bigint
    LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    BEGIN ATOMIC
        WITH gone AS (
            DELETE FROM public.events e
            USING unnest(topics, event_ids) AS k(topic, event_id)
            WHERE e.topic = k.topic AND e.event_id = k.event_id
              AND e.tx = pg_current_xact_id()::text::bigint
              AND EXISTS (SELECT FROM public.expired_keys x
                          WHERE x.key = public.event_key(e.topic, e.event_id))
            RETURNING 1
        )
        SELECT count(*) FROM gone;
    END;
ALTER FUNCTION undo_expired_inserts(text[], text[]) OWNER TO oncelog_owner;
REVOKE EXECUTE ON FUNCTION undo_expired_inserts(text[], text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION undo_expired_inserts(text[], text[]) TO oncelog_ingest;

GRANT USAGE ON SCHEMA public TO oncelog_retention;
GRANT SELECT ON schema_migrations TO oncelog_retention;
GRANT SELECT, DELETE ON events, duplicates, dead_letters TO oncelog_retention;
GRANT SELECT, INSERT, UPDATE, DELETE ON expired_keys TO oncelog_retention;
GRANT SELECT, INSERT, UPDATE ON topic_stats TO oncelog_retention;
GRANT SELECT ON expired_keys TO oncelog_ingest, oncelog_reader;
