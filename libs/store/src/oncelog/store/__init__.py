"""The one owner of oncelog's PostgreSQL store: schema and migrations, the batch writer, the
statistics (every read and write of topic_stats) with their invariants, consumer health."""
