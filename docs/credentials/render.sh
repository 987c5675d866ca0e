#!/bin/sh
# usage: render.sh NS > roles.conf   (passwords from GATEWAY_PASSWORD, WORKER_PASSWORD, LOADTEST_PASSWORD, ADMIN_PASSWORD)
ns=$1
echo "$ns" | grep -Eq '^[a-z0-9_-]{1,32}$' || { echo "bad namespace" >&2; exit 2; }
sed -e "s/@NS@/$ns/g" \
    -e "s|@GATEWAY_PASSWORD@|${GATEWAY_PASSWORD:?}|" -e "s|@WORKER_PASSWORD@|${WORKER_PASSWORD:?}|" \
    -e "s|@LOADTEST_PASSWORD@|${LOADTEST_PASSWORD:?}|" -e "s|@ADMIN_PASSWORD@|${ADMIN_PASSWORD:?}|" \
    "$(dirname "$0")/nats-roles.conf.tmpl"
