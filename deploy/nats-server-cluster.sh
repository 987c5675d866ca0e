#!/usr/bin/env bash
# Installs a nats-server that is safe for a JetStream *cluster* beside Debian 12's nats-server
# 2.9.10: before 2.9.21, clustered streams did not serialize Nats-Expected-Last-Subject-Sequence
# (nats-server#4320: two concurrent appends with the same expectation could both be stored),
# and that expectation is the fence of every session's event log. Debian 13 (trixie) packages
# 2.10; its .deb depends on libc6 only, so its binary is taken from Debian's archive — the
# signed InRelease checked with Debian's keyring, then the Packages index, then the .deb, each
# by its SHA-256 — and unpacked into $OH_TOOLS_DIR (default /opt/oh-tools). Nothing else on the
# machine changes. Prints the binary's path. Skips the download when it is already there.
set -euo pipefail
dir="${OH_TOOLS_DIR:-/opt/oh-tools}/nats-server-trixie"
bin="$dir/usr/sbin/nats-server"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
mirror="${OH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
arch="$(dpkg --print-architecture)"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
curl -fsS -o "$tmp/InRelease" "$mirror/dists/trixie/InRelease"
gpgv --keyring "$keyring" --output "$tmp/Release" "$tmp/InRelease" 2>/dev/null
index="main/binary-$arch/Packages.xz"
want="$(awk -v f="$index" '$3 == f && length($1) == 64 {print $1}' "$tmp/Release" | tail -1)"
[ -n "$want" ] || { echo "nats-server-cluster: $index not in trixie's Release" >&2; exit 1; }
curl -fsS -o "$tmp/Packages.xz" "$mirror/dists/trixie/$index"
echo "$want  $tmp/Packages.xz" | sha256sum -c --quiet
read -r file sum < <(xz -dc "$tmp/Packages.xz" | awk '
  /^Package: nats-server$/ {p = 1}
  p && /^Filename:/ {f = $2}
  p && /^SHA256:/ {s = $2}
  p && /^$/ {print f, s; exit}')
[ -n "${file:-}" ] || { echo "nats-server-cluster: no nats-server in trixie" >&2; exit 1; }
curl -fsS -o "$tmp/nats-server.deb" "$mirror/$file"
echo "$sum  $tmp/nats-server.deb" | sha256sum -c --quiet
mkdir -p "$dir.new"
dpkg-deb -x "$tmp/nats-server.deb" "$dir.new"
rm -rf "$dir"
mv "$dir.new" "$dir"
"$bin" --version >&2
echo "$bin"
