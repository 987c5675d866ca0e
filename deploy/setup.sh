#!/usr/bin/env bash
# Installs what building, running and testing need on a Debian machine, skipping whatever is
# already there: nats-server and redis-server (Debian packages), bubblewrap and util-linux's
# setpriv/prlimit (the sandbox agent code runs in), a C toolchain, Node.js/npm (for the
# JavaScript socket.io-client compatibility test) and Chromium (the web UI test drives it
# headless), the tools of the across-machines tests
# (iproute2 for network namespaces and tc, nftables for partitions, libfaketime for clock
# skew), promtool and docker-compose (offline checks of the deployment files), and Rust via
# rustup; with `--containers`, podman and what building images needs.
# Needs root (or sudo) only when something is missing.
set -euo pipefail

need=()
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v setpriv >/dev/null || need+=(util-linux)
command -v pgrep >/dev/null || need+=(procps)
command -v cc >/dev/null || need+=(build-essential)
command -v curl >/dev/null || need+=(curl ca-certificates)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || need+=(iproute2)
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
command -v faketime >/dev/null || need+=(faketime)
# schemathesis (the API contract test) runs in a Python venv.
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
# The deployment artifacts' offline checks (deploy/validate.sh): promtool for the Prometheus
# configuration and alert rules, docker-compose (the Python one: it validates a compose file
# without a container engine) for the compose file.
command -v promtool >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
# `--containers`: also what building the image and running the compose file need
# (deploy/container/build.sh, deploy/compose/up.sh).
if [ "${1:-}" = --containers ]; then
  command -v podman >/dev/null || need+=(podman)
  command -v runc >/dev/null || need+=(runc)
  command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
  command -v podman-compose >/dev/null || need+=(podman-compose)
  for p in uidmap slirp4netns fuse-overlayfs netavark aardvark-dns iptables; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
fi
if [ "${OH_SKIP_NODE:-0}" != 1 ]; then
  command -v node >/dev/null || need+=(nodejs)
  command -v npm >/dev/null || need+=(npm)
  command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || need+=(chromium)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  # Debian starts packaged services on install; we run our own on chosen ports instead.
  $SUDO systemctl disable --now nats-server redis-server prometheus haproxy >/dev/null 2>&1 || true
fi

# A nats-server for JetStream clusters (>= 2.9.21; Debian 12 has 2.9.10): the across-machines
# tests run their 3-node cluster on it.
bash "$(dirname "$0")/nats-server-cluster.sh" >/dev/null

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    :
  else
    echo "setup: installing Rust (rustup, stable)"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
  fi
fi
