-- Least privilege. Three group roles (NOLOGIN); deployments create login users that are
-- members of one of them (`python -m oncelog.migrate --login ...` does it):
--   oncelog_owner   owns every object; only migrations act as it.
--   oncelog_ingest  the consumer: reads and appends events, duplicates and dead letters, and
--                   upserts its statistics shard rows. It cannot UPDATE or DELETE stored rows,
--                   TRUNCATE or DROP anything.
--   oncelog_reader  the API: reads everything. It also upserts topic_stats, because the HTTP
--                   gateway and the bundled publisher count broker-layer duplicates there, and
--                   may set dead_letters.replayed_at when a dead letter is replayed. Nothing
--                   else is writable.
-- Roles belong to the whole cluster while grants belong to one database, so the roles are
-- created only when missing and the grants are repeated in every database this runs in.
-- Migrations run as a superuser (or a role with CREATEROLE that is a member of oncelog_owner).
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['oncelog_owner', 'oncelog_ingest', 'oncelog_reader'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', name);
            EXCEPTION WHEN duplicate_object THEN
                NULL;  -- another database's migration created it a moment ago
            END;
        END IF;
    END LOOP;
END
$$;

-- Nobody but the owner creates objects (the default before PostgreSQL 15, too).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO oncelog_ingest, oncelog_reader;
GRANT USAGE, CREATE ON SCHEMA public TO oncelog_owner;

ALTER TABLE events OWNER TO oncelog_owner;
ALTER TABLE duplicates OWNER TO oncelog_owner;
ALTER TABLE dead_letters OWNER TO oncelog_owner;
ALTER TABLE topic_stats OWNER TO oncelog_owner;
ALTER TABLE schema_migrations OWNER TO oncelog_owner;

-- Services read the applied versions at start to confirm the schema is current.
GRANT SELECT ON schema_migrations TO oncelog_ingest, oncelog_reader;

GRANT SELECT, INSERT ON events, duplicates, dead_letters TO oncelog_ingest;
GRANT SELECT, INSERT, UPDATE ON topic_stats TO oncelog_ingest;

GRANT SELECT ON events, duplicates, dead_letters, topic_stats TO oncelog_reader;
GRANT INSERT, UPDATE ON topic_stats TO oncelog_reader;
GRANT UPDATE (replayed_at) ON dead_letters TO oncelog_reader;

-- Tables that later migrations create (as this role or as the owner) are readable by the API;
-- a later migration grants the consumer whatever it must write there.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO oncelog_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE oncelog_owner IN SCHEMA public
    GRANT SELECT ON TABLES TO oncelog_reader;
