#!/bin/sh
# Start nginx in front of every replica of the compose service $ERC_UPSTREAM (default api:8080),
# and reload it whenever the set of replica addresses changes (docker compose up --scale api=N):
# nginx resolves upstream names only when it loads its configuration.
set -eu
UPSTREAM=${ERC_UPSTREAM:-api:8080}
HOST=${UPSTREAM%:*}
RUNDIR=/tmp/erc-proxy
mkdir -p "$RUNDIR"
addresses() { getent ahosts "$HOST" | awk '{print $1}' | sort -u | tr '\n' ' '; }
until [ -n "$(addresses)" ]; do
  echo "erc-proxy: waiting for $HOST to resolve" >&2
  sleep 1
done
sed -e "s|@SERVERS@|server $UPSTREAM;|" -e "s|@LISTEN@|8080|" -e "s|@RUNDIR@|$RUNDIR|g" \
  /etc/erc/nginx.conf.template > "$RUNDIR/nginx.conf"
nginx -e stderr -c "$RUNDIR/nginx.conf" &
NGINX=$!
trap 'kill -TERM $NGINX 2>/dev/null; wait $NGINX; exit 0' TERM INT
seen=$(addresses)
while kill -0 $NGINX 2>/dev/null; do
  sleep 5 &
  wait $! || true
  now=$(addresses)
  if [ -n "$now" ] && [ "$now" != "$seen" ]; then
    echo "erc-proxy: $HOST is now $now: reloading" >&2
    nginx -e stderr -c "$RUNDIR/nginx.conf" -s reload || true
    seen=$now
  fi
done
wait $NGINX
