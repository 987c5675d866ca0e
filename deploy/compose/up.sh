#!/usr/bin/env bash
# One command up: renders credentials into .secrets/ (once; kept across runs), copies a
# nats-server >= 2.10 into bin/, builds localhost/oh-nats, oh-redis and oh-proxy from
# localhost/oh-debian:bookworm, and starts compose.yaml (project "openhands").
#
#   deploy/compose/up.sh            # docker compose, docker-compose or podman-compose
#   OH_COMPOSE=podman-compose deploy/compose/up.sh
#
# Needs the images localhost/oh-debian:bookworm (a Debian 12 base) and
# localhost/openhands-rs:latest (gateway, worker, loadtest) to exist already.
# Optional: OH_AUTH_TOKENS (else one token is generated into .secrets/auth-tokens),
# OH_LLM_BASE_URL, OH_LLM_MODEL, OH_LLM_API_KEY (written to .secrets/worker/llm-api-key),
# OH_AGENT, OH_COMPOSE_PORT (default 8080), NATS_SERVER_BIN (path of a nats-server >= 2.10).
set -euo pipefail
cd "$(dirname "$0")"
HERE=$PWD
ROOT=$(cd ../.. && pwd)
# shellcheck source=lib.sh
. ./lib.sh
pick_compose
echo "up: using ${COMPOSE[*]} ($ENGINE)"

if [ "$ENGINE" = podman ] && ! podman image exists localhost/openhands-rs:latest; then
  # Offline build from Debian's packages (also makes localhost/oh-debian:bookworm).
  bash "$ROOT/deploy/container/build.sh"
fi
for img in localhost/oh-debian:bookworm localhost/openhands-rs:latest; do
  if ! "$ENGINE" image inspect "$img" >/dev/null 2>&1; then
    echo "up: image $img is missing." >&2
    case "$img" in
      *oh-debian*) echo "  e.g.: debootstrap --variant=minbase bookworm /tmp/rootfs && tar -C /tmp/rootfs -c . | $ENGINE import - $img" >&2 ;;
      *) echo "  build the project's image first (it holds /usr/local/bin/gateway, worker, loadtest)" >&2 ;;
    esac
    exit 1
  fi
done

# nats-server >= 2.10 (Debian 12's is 2.9.10).
nats_ok() { # path: is it a nats-server >= 2.10?
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p')
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}
nats_bin=${NATS_SERVER_BIN:-$(command -v nats-server || true)}
if [ -z "$nats_bin" ] || ! nats_ok "$nats_bin"; then
  # deploy/nats-server-cluster.sh installs Debian trixie's nats-server (2.10) beside the
  # system one, checked against Debian's signatures, and prints its path.
  nats_bin=$(bash "$ROOT/deploy/nats-server-cluster.sh")
fi
nats_ok "$nats_bin" || { echo "up: $nats_bin is not a nats-server >= 2.10" >&2; exit 1; }
mkdir -p bin
install -m 0755 "$nats_bin" bin/nats-server
echo "up: nats-server $(bin/nats-server --version | sed 's/.* //') from $nats_bin"

# Credentials. .secrets/ is 0700 (only its owner on the host gets in); the files inside are
# world-readable so that the containers' users (nats, redis, oh) can read their bind mounts.
S=$HERE/.secrets
mkdir -p "$S/passwords" "$S/nats" "$S/redis" "$S/gateway" "$S/worker" "$S/admin"
chmod 0700 "$S"
chmod 0700 "$S/passwords" "$S/admin"
chmod 0755 "$S/nats" "$S/redis" "$S/gateway" "$S/worker"
password() { # role: its password (hex, URL-safe), generated once
  local f=$S/passwords/$1
  [ -s "$f" ] || (umask 077; od -An -N18 -tx1 /dev/urandom | tr -d ' \n' >"$f")
  cat "$f"
}
NS=oh
render() { # template, output
  sed -e "s/@NS@/$NS/g" -e "s/@ADMIN_PASSWORD@/$(password admin)/g" \
    -e "s/@GATEWAY_PASSWORD@/$(password gateway)/g" -e "s/@WORKER_PASSWORD@/$(password worker)/g" \
    -e "s/@LOADTEST_PASSWORD@/$(password loadtest)/g" "$1" >"$2"
  chmod 0644 "$2"
}
render "$ROOT/deploy/auth/nats-auth.conf.in" "$S/nats/nats-auth.conf"
render "$ROOT/deploy/auth/redis-users.acl.in" "$S/redis/users.acl"
url_files() { # role, dir
  printf 'nats://%s:%s@nats-1:4222,nats://nats-2:4222,nats://nats-3:4222\n' "$1" "$(password "$1")" >"$2/nats-url"
  printf 'redis://%s:%s@redis:6379\n' "$1" "$(password "$1")" >"$2/redis-url"
  chmod 0644 "$2/nats-url" "$2/redis-url"
}
url_files gateway "$S/gateway"
url_files worker "$S/worker"
url_files admin "$S/admin"
chmod 0600 "$S/admin/"*
# The worker refuses an empty key file: "none" when no key is given (unused without an LLM).
printf '%s\n' "${OH_LLM_API_KEY:-none}" >"$S/worker/llm-api-key"
chmod 0644 "$S/worker/llm-api-key"
if [ -z "${OH_AUTH_TOKENS:-}" ]; then
  [ -s "$S/auth-tokens" ] || (umask 077; printf '%s=dev\n' "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >"$S/auth-tokens")
  OH_AUTH_TOKENS=$(cat "$S/auth-tokens")
fi
export OH_AUTH_TOKENS

for c in nats redis proxy; do
  echo "up: building localhost/oh-$c:latest"
  "$ENGINE" build -q -t "localhost/oh-$c:latest" -f "Containerfile.$c" . >/dev/null
done

"${COMPOSE[@]}" -p "$PROJECT" -f compose.yaml up -d
port=${OH_COMPOSE_PORT:-8080}
echo "up: waiting for the proxy on http://127.0.0.1:$port/readyz"
for _ in $(seq 1 90); do
  if curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" 2>/dev/null; then
    echo "up: ready at http://127.0.0.1:$port (token: the part before '=' of $S/auth-tokens, or your OH_AUTH_TOKENS)"
    exit 0
  fi
  sleep 2
done
echo "up: not ready after 180 s; see: ${COMPOSE[*]} -p $PROJECT logs" >&2
exit 1
