#!/bin/sh
# The stand-in PostgreSQL image's entrypoint: the subset of the official image's that compose.yaml
# relies on. On an empty PGDATA it runs initdb as POSTGRES_USER with POSTGRES_PASSWORD and
# POSTGRES_INITDB_ARGS, lets every host connect with scram-sha-256, creates POSTGRES_DB, and
# then starts `postgres` with the command's arguments, listening on every address.
set -eu

if [ "${1:-}" != postgres ]; then
    exec "$@"
fi

# Started as root: own the data directory, then run this script again as postgres.
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown -R postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
    user=${POSTGRES_USER:-postgres}
    database=${POSTGRES_DB:-$user}
    secret=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$secret"
    # POSTGRES_INITDB_ARGS is a list of words, as in the official image.
    # shellcheck disable=SC2086
    initdb --username="$user" --pwfile="$secret" --pgdata="$PGDATA" ${POSTGRES_INITDB_ARGS:-}
    rm -f "$secret"
    printf '\n# Added by the entrypoint: every other host, with a password.\nhost all all all scram-sha-256\n' \
        >> "$PGDATA/pg_hba.conf"
    printf "\nlisten_addresses = '*'\n" >> "$PGDATA/postgresql.conf"
    if [ "$database" != postgres ]; then
        # A private socket and no TCP: nothing (not even the healthcheck) sees this server.
        socket=$(mktemp -d)
        pg_ctl --pgdata="$PGDATA" --wait --silent \
            --options="-c listen_addresses='' -c unix_socket_directories=$socket" start
        # psql quotes the name (:"db") only in what it reads, not in --command.
        echo 'CREATE DATABASE :"db";' | psql --no-psqlrc --quiet --set=ON_ERROR_STOP=1 \
            --host="$socket" --username="$user" --dbname=postgres --set=db="$database"
        pg_ctl --pgdata="$PGDATA" --wait --silent --mode=fast stop
        rmdir "$socket"
    fi
fi

exec "$@"
