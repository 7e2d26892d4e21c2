#!/bin/sh
# Create the cluster and database erc on first start (empty volume), then run PostgreSQL in the
# foreground. Password authentication (scram-sha-256) from the compose network.
set -eu
BIN=/usr/lib/postgresql/15/bin
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${ERC_AUDIT_DB_PASSWORD:-}" ]; then
    echo "erc-postgres: ERC_AUDIT_DB_PASSWORD is empty: set it in docker/erc.env (the API and the" \
         "audit workers log in with it)" >&2
    exit 1
  fi
  pwfile=$(mktemp)
  printf '%s\n' "$ERC_AUDIT_DB_PASSWORD" > "$pwfile"
  "$BIN/initdb" -D "$PGDATA" -U erc --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C
  rm -f "$pwfile"
  printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
  "$BIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses='' -k /tmp" -w start
  "$BIN/createdb" -h /tmp -U erc erc
  "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop
fi
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' -k /tmp
