#!/usr/bin/env bash
# One command down: stops and removes the containers of compose.yaml (project "openhands").
#   deploy/compose/down.sh           # keeps the volumes (NATS streams, Redis data)
#   deploy/compose/down.sh --purge   # also removes the volumes; .secrets/ stays (delete it by hand)
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=lib.sh
. ./lib.sh
pick_compose
# compose checks OH_AUTH_TOKENS even when stopping.
export OH_AUTH_TOKENS=${OH_AUTH_TOKENS:-unused=unused}
if [ "${1:-}" = "--purge" ]; then
  "${COMPOSE[@]}" -p "$PROJECT" -f compose.yaml down -v
else
  "${COMPOSE[@]}" -p "$PROJECT" -f compose.yaml down
fi
