#!/usr/bin/env bash
# Local cluster on loopback: nats-server (JetStream, data under .deploy/nats), redis-server,
# G gateways and W workers from the release build.
#
#   deploy/local/cluster.sh start [-g GATEWAYS] [-w WORKERS] [--debug]   (default 2 and 2)
#   deploy/local/cluster.sh stop
#   deploy/local/cluster.sh status
#
# Where a NATS with JetStream (or a Redis) already answers at OH_NATS_URL (OH_REDIS_URL), it is
# used instead of starting another. Gateways listen on OH_GATEWAY_PORT (3000), +1, ...
# Every OH_* variable the binaries read (OH_AUTH_TOKENS, OH_MAX_SESSIONS, OH_NAMESPACE, ...)
# passes through.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
STATE=${OH_DEPLOY_DIR:-$ROOT/.deploy}
PIDS=$STATE/pids
LOGS=$STATE/logs
mkdir -p "$PIDS" "$LOGS"
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

export OH_NATS_URL=${OH_NATS_URL:-nats://127.0.0.1:4222}
export OH_REDIS_URL=${OH_REDIS_URL:-redis://127.0.0.1:6379}
GATEWAYS=2
WORKERS=2
PROFILE=release
BASE_PORT=${OH_GATEWAY_PORT:-3000}

hostport() { local u=${1#*://}; u=${u#*@}; echo "${u%%/*}"; }
nats_js_up() {
  local hp; hp=$(hostport "$OH_NATS_URL")
  local line=""
  # The server greets every connection with one INFO line, which says whether JetStream is on.
  { exec 3<>"/dev/tcp/${hp%:*}/${hp##*:}"; } 2>/dev/null || return 1
  read -r -t 2 line <&3 || true
  exec 3<&-
  [[ "$line" == INFO* && "$line" == *'"jetstream":true'* ]]
}
redis_up() {
  local hp; hp=$(hostport "$OH_REDIS_URL")
  redis-cli -h "${hp%:*}" -p "${hp##*:}" ping 2>/dev/null | grep -q PONG
}
wait_for() { # desc, command...
  local desc=$1; shift
  for _ in $(seq 1 100); do "$@" && return 0; sleep 0.1; done
  echo "cluster: $desc did not come up (see $LOGS)" >&2
  return 1
}
spawn() { # name, command...
  local name=$1; shift
  nohup "$@" >"$LOGS/$name.log" 2>&1 &
  echo $! >"$PIDS/$name.pid"
}

start() {
  if nats_js_up; then
    echo "cluster: using the NATS (JetStream) already at $OH_NATS_URL"
  else
    local hp; hp=$(hostport "$OH_NATS_URL")
    mkdir -p "$STATE/nats"
    spawn nats nats-server -js -a "${hp%:*}" -p "${hp##*:}" -sd "$STATE/nats"
    wait_for "nats-server" nats_js_up
    echo "cluster: started nats-server at $OH_NATS_URL (data in $STATE/nats)"
  fi
  if redis_up; then
    echo "cluster: using the Redis already at $OH_REDIS_URL"
  else
    local hp; hp=$(hostport "$OH_REDIS_URL")
    mkdir -p "$STATE/redis"
    spawn redis redis-server --bind "${hp%:*}" --port "${hp##*:}" --dir "$STATE/redis" --save "" --appendonly no
    wait_for "redis-server" redis_up
    echo "cluster: started redis-server at $OH_REDIS_URL"
  fi
  if [ "$PROFILE" = release ]; then
    cargo build --release --bins -q
  else
    cargo build --bins -q
  fi
  local bin=$ROOT/target/$PROFILE
  [ -n "${CARGO_TARGET_DIR:-}" ] && bin=$CARGO_TARGET_DIR/$PROFILE
  for i in $(seq 1 "$WORKERS"); do
    OH_WORKER_ID=${OH_WORKER_ID_PREFIX:-local}-w$i spawn "worker$i" "$bin/worker"
  done
  local urls=()
  for i in $(seq 1 "$GATEWAYS"); do
    local port=$((BASE_PORT + i - 1))
    OH_GATEWAY_ADDR=127.0.0.1:$port spawn "gateway$i" "$bin/gateway"
    urls+=("http://127.0.0.1:$port")
  done
  for u in "${urls[@]}"; do
    wait_for "gateway $u" curl -sf -o /dev/null "$u/readyz"
  done
  echo "cluster: $WORKERS worker(s), $GATEWAYS gateway(s) running; logs in $LOGS"
  for u in "${urls[@]}"; do echo "  $u"; done
}

stop() {
  local any=0
  for f in "$PIDS"/*.pid; do
    [ -e "$f" ] || continue
    local pid; pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; any=1; fi
  done
  # Workers hand their sessions back within OH_DRAIN_TIMEOUT_S; give everyone time to exit.
  for f in "$PIDS"/*.pid; do
    [ -e "$f" ] || continue
    local pid; pid=$(cat "$f")
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$f"
  done
  [ $any = 1 ] && echo "cluster: stopped" || echo "cluster: nothing running"
}

status() {
  for f in "$PIDS"/*.pid; do
    [ -e "$f" ] || continue
    local pid; pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then echo "$(basename "$f" .pid): running (pid $pid)"; else echo "$(basename "$f" .pid): dead"; fi
  done
}

cmd=${1:-start}; shift || true
while [ $# -gt 0 ]; do
  case $1 in
    -g) GATEWAYS=$2; shift 2 ;;
    -w) WORKERS=$2; shift 2 ;;
    --debug) PROFILE=debug; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case $cmd in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [-g N] [-w N] [--debug] | stop | status" >&2; exit 2 ;;
esac
