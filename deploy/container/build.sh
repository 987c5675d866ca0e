#!/usr/bin/env bash
# Builds deploy/container/Containerfile offline, from Debian's packages only (no registry):
#   1. localhost/oh-debian:bookworm — a minimal Debian made by mmdebstrap (cached);
#   2. localhost/oh-rust-builder:bookworm — that base plus gcc, with the host's Rust toolchain
#      (rustup) and crate cache mounted in at build time, laid out as the official rust image;
#   3. localhost/openhands-rs:latest — the Containerfile with those two as BUILDER and BASE.
# Needs podman (or buildah), mmdebstrap and a rustup toolchain in $HOME (bash deploy/setup.sh
# --containers installs the first two). Usage: deploy/container/build.sh [TAG]
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${1:-localhost/openhands-rs:latest}
HERE=deploy/container
# shellcheck source=podman-env.sh
. "$HERE/podman-env.sh"
podman_host_settings
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if ! podman image exists localhost/oh-debian:bookworm; then
  echo "== base image: mmdebstrap bookworm (minbase)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mmdebstrap --variant=minbase --include=ca-certificates bookworm "$tmp/base.tar" \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
    "deb $SECURITY bookworm-security main"
  podman import --change 'CMD ["/bin/bash"]' "$tmp/base.tar" localhost/oh-debian:bookworm
fi

if ! podman image exists localhost/oh-rust-builder:bookworm; then
  echo "== builder image: base + gcc (the toolchain is mounted at build time)"
  podman build --network host -t localhost/oh-rust-builder:bookworm -f - . <<'CONTAINERFILE'
FROM localhost/oh-debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CONTAINERFILE
fi

RUSTUP=${RUSTUP_HOME:-$HOME/.rustup}
CARGO=${CARGO_HOME:-$HOME/.cargo}
echo "== $TAG"
mkdir -p "$CARGO/registry"
podman build --network host \
  --volume "$RUSTUP:/usr/local/rustup:ro" \
  --volume "$CARGO/bin:/usr/local/cargo/bin:ro" \
  --volume "$CARGO/registry:/usr/local/cargo/registry" \
  --build-arg BUILDER=localhost/oh-rust-builder:bookworm \
  --build-arg BASE=localhost/oh-debian:bookworm \
  -f "$HERE/Containerfile" -t "$TAG" .
podman image ls "$TAG"
