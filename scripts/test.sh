#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, the gateway's router tests
# (gateway/tests/router.rs: oneshot on the real router) and task tests, and end-to-end tests;
# all but unit tests start their own nats-server and redis-server processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
# The across-machines tests (network namespaces) run or fail here; elsewhere they may skip.
export OH_REQUIRE_NETNS="${OH_REQUIRE_NETNS:-1}"
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== event JSON stays in shared::event"
perl scripts/event-json-lint.pl gateway/src worker/src
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build binaries"
cargo build --workspace --bins
echo "== tests"
# Two cores: end-to-end tests each start NATS, Redis, gateways and workers; two at a time.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets --no-fail-fast -- --test-threads "${OH_TEST_THREADS:-2}" \
  --skip across_machines:: 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "== across machines (tests/tests/partitions.rs): network namespaces, one cluster at a time"
cargo test -p tests --test partitions --no-fail-fast -- --test-threads 1 across_machines:: 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
set -e
# One closing line over every test binary.
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
exit "$status"
