#!/usr/bin/env bash
# Local cluster on loopback: nats-server (JetStream, data under .deploy/nats), redis-server,
# G gateways and W workers from the release build.
#
#   deploy/local/cluster.sh start [-g GATEWAYS] [-w WORKERS] [--debug]   (default 2 and 2)
#   deploy/local/cluster.sh stop
#   deploy/local/cluster.sh status
#
# Brokers with credentials (default): unless OH_NATS_URL (OH_REDIS_URL) is given, the script runs
# its own nats-server on 127.0.0.1:${OH_DEPLOY_NATS_PORT:-4223} (redis-server on
# ${OH_DEPLOY_REDIS_PORT:-6380}) with a user per role: random passwords are generated once into
# $STATE/secrets (0700), the permission sets of deploy/auth/ are rendered for OH_NAMESPACE into
# $STATE/nats-auth.conf (included by $STATE/nats.conf) and $STATE/redis-users.acl, and each
# process gets its role's URLs as files
# (OH_NATS_URL_FILE, OH_REDIS_URL_FILE = $STATE/secrets/<role>.nats-url, .redis-url; admin's and
# loadtest's are there too). A running managed broker is given the current namespace's config
# (nats-server reload, ACL LOAD).
# Brokers of your own: where a NATS with JetStream (or a Redis) already answers at OH_NATS_URL
# (OH_REDIS_URL), it is used as given, credentials included; if nothing answers there, one
# without authentication is started at that address.
# Gateways listen on OH_GATEWAY_PORT (3000), +1, ... Every OH_* variable the binaries read
# (OH_AUTH_TOKENS, OH_MAX_SESSIONS, OH_NAMESPACE, ...) passes through.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
STATE=${OH_DEPLOY_DIR:-$ROOT/.deploy}
PIDS=$STATE/pids
LOGS=$STATE/logs
mkdir -p "$PIDS" "$LOGS"
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

SECRETS=$STATE/secrets
NS=${OH_NAMESPACE:-oh}
# Managed (authenticated) brokers unless a URL was given.
NATS_MANAGED=0; [ -z "${OH_NATS_URL:-}" ] && NATS_MANAGED=1
REDIS_MANAGED=0; [ -z "${OH_REDIS_URL:-}" ] && REDIS_MANAGED=1
NATS_PORT=${OH_DEPLOY_NATS_PORT:-4223}
REDIS_PORT=${OH_DEPLOY_REDIS_PORT:-6380}
[ $NATS_MANAGED = 1 ] && OH_NATS_URL=nats://127.0.0.1:$NATS_PORT
[ $REDIS_MANAGED = 1 ] && OH_REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export OH_NATS_URL OH_REDIS_URL
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
  if [ $REDIS_MANAGED = 1 ] && [ -s "$SECRETS/admin.password" ]; then
    REDISCLI_AUTH=$(cat "$SECRETS/admin.password") redis-cli --user admin -h "${hp%:*}" -p "${hp##*:}" ping 2>/dev/null | grep -q PONG
  else
    redis-cli -u "$OH_REDIS_URL" --no-auth-warning ping 2>/dev/null | grep -q PONG
  fi
}
running() { [ -e "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }
password() { # role: its password, generated once (hex, so safe in URLs and sed)
  local f=$SECRETS/$1.password
  [ -s "$f" ] || (umask 077; od -An -N18 -tx1 /dev/urandom | tr -d ' \n' >"$f")
  cat "$f"
}
render() { # template, output: the permission sets of deploy/auth/ for this namespace
  (umask 077; sed -e "s/@NS@/$NS/g" -e "s/@ADMIN_PASSWORD@/$(password admin)/g" \
    -e "s/@GATEWAY_PASSWORD@/$(password gateway)/g" -e "s/@WORKER_PASSWORD@/$(password worker)/g" \
    -e "s/@LOADTEST_PASSWORD@/$(password loadtest)/g" "$1" >"$2")
}
write_secrets() { # role URL files of the managed brokers
  mkdir -p "$SECRETS"; chmod 700 "$SECRETS"
  local role
  for role in admin gateway worker loadtest; do
    (umask 077
     [ $NATS_MANAGED = 1 ] && echo "nats://$role:$(password $role)@127.0.0.1:$NATS_PORT" >"$SECRETS/$role.nats-url"
     [ $REDIS_MANAGED = 1 ] && [ $role != loadtest ] && echo "redis://$role:$(password $role)@127.0.0.1:$REDIS_PORT" >"$SECRETS/$role.redis-url"
     true)
  done
  render "$ROOT/deploy/auth/nats-auth.conf.in" "$STATE/nats-auth.conf"
  # Everything in the file (not in flags), so that a reload keeps JetStream on.
  cat >"$STATE/nats.conf" <<EOF
listen: 127.0.0.1:$NATS_PORT
jetstream { store_dir: "$STATE/nats" }
include ./nats-auth.conf
EOF
  render "$ROOT/deploy/auth/redis-users.acl.in" "$STATE/redis-users.acl"
}
role_env() { # role: the broker settings of a process of that role
  if [ $NATS_MANAGED = 1 ]; then echo "OH_NATS_URL_FILE=$SECRETS/$1.nats-url"; fi
  if [ $REDIS_MANAGED = 1 ]; then echo "OH_REDIS_URL_FILE=$SECRETS/$1.redis-url"; fi
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
  write_secrets
  if [ $NATS_MANAGED = 1 ] && running nats; then
    kill -HUP "$(cat "$PIDS/nats.pid")"
    echo "cluster: nats-server at $OH_NATS_URL reloaded with the users of namespace $NS"
  elif [ $NATS_MANAGED = 1 ]; then
    mkdir -p "$STATE/nats"
    spawn nats nats-server -c "$STATE/nats.conf"
    wait_for "nats-server" nats_js_up
    echo "cluster: started nats-server at $OH_NATS_URL with a user per role (data in $STATE/nats)"
  elif nats_js_up; then
    echo "cluster: using the NATS (JetStream) already at $(hostport "$OH_NATS_URL")"
  else
    local hp; hp=$(hostport "$OH_NATS_URL")
    mkdir -p "$STATE/nats"
    spawn nats nats-server -js -a "${hp%:*}" -p "${hp##*:}" -sd "$STATE/nats"
    wait_for "nats-server" nats_js_up
    echo "cluster: started nats-server at $(hostport "$OH_NATS_URL") (data in $STATE/nats)"
  fi
  if [ $REDIS_MANAGED = 1 ] && running redis; then
    REDISCLI_AUTH=$(password admin) redis-cli --user admin -p "$REDIS_PORT" ACL LOAD >/dev/null
    echo "cluster: redis-server at $OH_REDIS_URL reloaded with the users of namespace $NS"
  elif [ $REDIS_MANAGED = 1 ]; then
    mkdir -p "$STATE/redis"
    spawn redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$STATE/redis" --save "" --appendonly no --aclfile "$STATE/redis-users.acl"
    wait_for "redis-server" redis_up
    echo "cluster: started redis-server at $OH_REDIS_URL with a user per role"
  elif redis_up; then
    echo "cluster: using the Redis already at $(hostport "$OH_REDIS_URL")"
  else
    local hp; hp=$(hostport "$OH_REDIS_URL")
    mkdir -p "$STATE/redis"
    spawn redis redis-server --bind "${hp%:*}" --port "${hp##*:}" --dir "$STATE/redis" --save "" --appendonly no
    wait_for "redis-server" redis_up
    echo "cluster: started redis-server at $(hostport "$OH_REDIS_URL")"
  fi
  if [ "$PROFILE" = release ]; then
    cargo build --release --bins -q
  else
    cargo build --bins -q
  fi
  local bin=$ROOT/target/$PROFILE
  [ -n "${CARGO_TARGET_DIR:-}" ] && bin=$CARGO_TARGET_DIR/$PROFILE
  for i in $(seq 1 "$WORKERS"); do
    # shellcheck disable=SC2046 # role_env prints whole VAR=path words (no spaces in them)
    spawn "worker$i" env $(role_env worker) OH_WORKER_ID="${OH_WORKER_ID_PREFIX:-local}-w$i" "$bin/worker"
  done
  local urls=()
  for i in $(seq 1 "$GATEWAYS"); do
    local port=$((BASE_PORT + i - 1))
    # shellcheck disable=SC2046
    spawn "gateway$i" env $(role_env gateway) OH_GATEWAY_ADDR="127.0.0.1:$port" "$bin/gateway"
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
