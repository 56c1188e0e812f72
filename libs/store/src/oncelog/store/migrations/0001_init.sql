-- Stored events: one row per (topic, event_id), ever. Topics and ids compare byte-wise (C
-- collation) so prefix searches for NATS wildcards can use the btree indexes.
CREATE TABLE events (
    topic       text COLLATE "C" NOT NULL,
    event_id    text COLLATE "C" NOT NULL,
    ts          timestamptz NOT NULL,
    source      text NOT NULL,
    payload     jsonb NOT NULL,
    stream_seq  bigint NOT NULL,
    received_at timestamptz NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, event_id)
);
CREATE INDEX events_topic_ts ON events (topic, ts, event_id);
CREATE INDEX events_ts ON events (ts, topic, event_id);

-- Every duplicate the store layer dropped, keyed by the stream sequence that carried it, so a
-- redelivery of an already-counted duplicate is recognised and never counted twice.
CREATE TABLE duplicates (
    stream_seq        bigint PRIMARY KEY,
    topic             text COLLATE "C" NOT NULL,
    event_id          text COLLATE "C" NOT NULL,
    received_at       timestamptz NOT NULL,
    first_received_at timestamptz NOT NULL,
    same_payload      boolean NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX duplicates_key ON duplicates (topic, event_id);

-- Messages that could not become events, with the bytes (or their first 64 KiB) and the reason.
CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_seq  bigint UNIQUE,
    subject     text NOT NULL,
    topic       text COLLATE "C" NOT NULL,
    headers     jsonb NOT NULL DEFAULT '{}',
    raw         bytea NOT NULL,
    raw_size    integer NOT NULL,
    reason      text NOT NULL,
    received_at timestamptz NOT NULL,
    dead_at     timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz
);
CREATE INDEX dead_letters_topic ON dead_letters (topic, id);

-- Exact counters, updated in the transaction that writes the rows they count. Each writer adds
-- to its own shard row, so replicas never queue on one hot row; readers sum the shards.
CREATE TABLE topic_stats (
    topic             text COLLATE "C" NOT NULL,
    shard             smallint NOT NULL,
    received          bigint NOT NULL DEFAULT 0,
    stored            bigint NOT NULL DEFAULT 0,
    store_duplicates  bigint NOT NULL DEFAULT 0,
    broker_duplicates bigint NOT NULL DEFAULT 0,
    dead_lettered     bigint NOT NULL DEFAULT 0,
    redelivered       bigint NOT NULL DEFAULT 0,
    conflicting       bigint NOT NULL DEFAULT 0,
    first_ts          timestamptz,
    last_ts           timestamptz,
    last_stored_at    timestamptz,
    PRIMARY KEY (topic, shard)
);
