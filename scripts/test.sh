#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, router tests and end-to-end tests that
# start their own nats-server and redis-server processes and run the real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build binaries"
cargo build --workspace --bins
echo "== tests"
# Two cores: end-to-end tests each start NATS, Redis, gateways and workers; two at a time.
cargo test --workspace -- --test-threads "${OH_TEST_THREADS:-2}"
